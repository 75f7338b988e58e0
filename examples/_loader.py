"""An example program as a module, as its script sees itself: for the tests and the benchmarks, which call its
functions (``build_cli``, ``train``, ``main``) in-process instead of running it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: this folder: the example programs, their configs and their helpers
EXAMPLES = Path(__file__).resolve().parent


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py``, executed as a fresh module (its folder on sys.path for the helpers beside it) and
    registered in ``sys.modules`` as ``example_<name>``: string annotations (``from __future__ import annotations``)
    resolve through the module's name, so LightningCLI checks a ``Literal`` argument as it does in the script."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
