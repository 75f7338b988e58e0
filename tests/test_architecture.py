"""The package's import graph is one-way, as CONTRIBUTING.md's "Architecture" draws it, checked by parsing imports.

Layers, bottom to top: helpers (``_internal/``, ``protocols``) <- building blocks (the snapshot, the state-dict hook,
the prediction metrics, CProp's statistics) <- rules and optimizers (``rules/``, ``optim/``) <- the companion methods'
optimizers and rules (``cprop/``, ``heavy_ball/``) <- per-optimizer drivers (the predictor and its plan, CProp's
tracker) <- callbacks <- the package's namespaces. A module imports from lower layers only, or from its own unit (the
modules of one unit belong together). Private names are imported within their own folder only, everything below the
callbacks is Lightning-free, and every module of the package is placed in a layer here (a new module must say where
it belongs). Importing the Lightning-free parts does not import Lightning: the namespaces are lazy.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "lightning_xgrad"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: bottom to top: (layer, {unit: modules}); a module name ending in ".*" stands for a folder (a subpackage)
LAYERS: list[tuple[str, dict[str, set[str]]]] = [
    ("helpers", {"helpers": {"_internal.*", "protocols"}}),
    (
        "building blocks",
        {
            "snapshot": {"prediction.snapshot"},
            "state_dict_hook": {"prediction.state_dict_hook"},
            "quality": {"prediction.quality"},
            "cprop statistics": {"cprop.statistics"},
        },
    ),
    ("rules and optimizers", {"rules": {"rules.*"}, "optim": {"optim.*"}}),
    (
        "companion methods",
        {"cprop optimizers": {"cprop.optim", "cprop.functional", "cprop.rules"}, "heavy_ball": {"heavy_ball.*"}},
    ),
    (
        "per-optimizer drivers",
        {
            "prediction": {
                "prediction.arguments",
                "prediction.edits",
                "prediction.plan",
                "prediction.predictor",
                "prediction.step_guard",
            },
            "cprop tracker": {"cprop.tracker"},
        },
    ),
    (
        "callbacks",
        {
            "callback": {"callback", "callback_checks", "callback_metrics", "callback_predictors"},
            "cprop callback": {"cprop.callback"},
        },
    ),
    ("tools", {"sweep": {"sweep.*"}}),
    ("namespace", {"namespace": {"__init__", "prediction", "cprop"}}),
]
#: the layers that must not import Lightning (all but the callbacks and the namespace, which imports them lazily)
LIGHTNING_FREE = {
    "helpers",
    "building blocks",
    "rules and optimizers",
    "companion methods",
    "per-optimizer drivers",
    "tools",
}
LIGHTNING_PACKAGES = {"lightning", "pytorch_lightning", "lightning_fabric"}
#: units that import nothing else of the package (the sweep tool runs training programs; it does not train)
STANDALONE = {"sweep"}


def _module_name(path: Path) -> str:
    """``rules.adam`` for ``lightning_xgrad/rules/adam.py``; ``rules`` for ``rules/__init__.py``; ``__init__`` for the
    package's own ``__init__.py``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
#: the modules that are packages (an ``__init__.py``): their relative imports start from themselves
PACKAGES = {module for module, path in MODULES.items() if path.name == "__init__.py"}


def _place(module: str) -> tuple[int, str, str] | None:
    """(layer index, layer, unit) of a module of the package."""
    for index, (layer, units) in enumerate(LAYERS):
        for unit, members in units.items():
            for member in members:
                if module == member or (member.endswith(".*") and module.split(".")[0] == member[:-2]):
                    return index, layer, unit
    return None


def _folder(module: str) -> str:
    """The folder (dotted, relative to the package; '' at its top) that ``module`` lives in, and that its relative
    imports start from."""
    if module == "__init__":
        return ""
    return module if module in PACKAGES else module.rpartition(".")[0]


def _resolve(dotted: str) -> str:
    """The package module a dotted name relative to the package names: the longest prefix that is a module."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return "__init__"


def _inside(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _imports(module: str) -> list[tuple[str | None, str, str | None, int]]:
    """Per imported name: (the package module it comes from, or None outside the package; the module as written;
    the name imported from it, None for ``import x``; the line)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str | None, str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name[len(PACKAGE) + 1 :]) if _inside(alias.name) else None
                found.append((target, alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            if node.level == 0:
                if not _inside(written):
                    found.extend((None, written, alias.name, node.lineno) for alias in node.names)
                    continue
                dotted = written[len(PACKAGE) + 1 :]
            else:
                base = _folder(module).split(".") if _folder(module) else []
                base = base[: len(base) - (node.level - 1)]
                dotted = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # ``from . import x`` imports the submodule x where there is one
                submodule = f"{dotted}.{alias.name}" if dotted else alias.name
                target = submodule if submodule in MODULES else _resolve(dotted)
                found.append((target, written, alias.name, node.lineno))
    return found


def test_every_module_is_placed_in_one_layer() -> None:
    unplaced = [module for module in MODULES if _place(module) is None]
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def _violations() -> list[str]:
    problems = []
    for module in MODULES:
        place = _place(module)
        assert place is not None, module
        layer_index, layer, unit = place
        for target, written, name, line in _imports(module):
            where = f"{module} (line {line}): {written}" + (f" import {name}" if name else "")
            if target is None:
                if layer in LIGHTNING_FREE and written.split(".")[0] in LIGHTNING_PACKAGES:
                    problems.append(f"{where}: the {layer} layer must not import Lightning")
                continue
            target_place = _place(target)
            assert target_place is not None, target
            target_index, target_layer, target_unit = target_place
            if target_unit != unit and (target_index >= layer_index or unit in STANDALONE):
                problems.append(f"{where}: {layer} ({unit}) may not import from {target_layer} ({target_unit})")
            if _folder(target) != _folder(module) and target not in PACKAGES | {"__init__"}:
                private_name = name is not None and name.startswith("_") and not name.startswith("__")
                private_module = any(part.startswith("_") for part in target.split(".")[1:])
                if private_name or private_module:
                    problems.append(f"{where}: a private name of another folder")
    return problems


def test_the_import_graph_is_one_way_and_private_names_stay_in_their_folder() -> None:
    problems = _violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("heavy_ball.rules", "from ..cprop.optim import CPropAdam", "may not import from"),
        ("heavy_ball.rules", "from .._internal.chunks import _slices", "a private name of another folder"),
        ("prediction.predictor", "from ..rules.adam import _on_accelerator", "a private name of another folder"),
        ("prediction.predictor", "from ..callback import XGradCallback", "may not import from"),
        ("cprop.callback", "from ..callback import XGradCallback", "may not import from"),
        ("cprop.callback", "from lightning_xgrad import callback", "may not import from"),
        ("cprop.statistics", "from .optim import CPropSGD", "may not import from"),
        ("prediction.snapshot", "import lightning.pytorch as pl", "must not import Lightning"),
        ("_internal.chunks", "from ..prediction.snapshot import ParameterSnapshot", "may not import from"),
        ("sweep.cli", "from ..prediction.predictor import OptimizerPredictor", "may not import from"),
    ],
)
def test_the_check_catches_what_it_must(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, source: str, expected: str
) -> None:
    """The check itself: each of these imports, added to the module, is reported."""
    path = tmp_path / "module.py"
    path.write_text(MODULES[module].read_text() + "\n" + source + "\n")
    monkeypatch.setitem(MODULES, module, path)
    problems = _violations()
    assert any(expected in problem and module in problem for problem in problems), problems


def test_optimizers_rules_and_the_predictor_import_without_lightning() -> None:
    """``import lightning_xgrad.optim`` (and the rules, the predictor, the companion methods' optimizers,
    ``OptimizerPredictor`` from the namespace) costs
    torch alone: Lightning is imported by the callbacks only, on first use. In a fresh interpreter."""
    probe = (
        "import sys\n"
        "import lightning_xgrad.optim, lightning_xgrad.rules, lightning_xgrad.prediction.predictor\n"
        "from lightning_xgrad import OptimizerPredictor, PredictionRule, register_rule\n"
        "from lightning_xgrad.optim import AdaM3\n"
        "from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam\n"
        "from lightning_xgrad.cprop import CPropSGD, statistics\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(LIGHTNING_PACKAGES)!r})))\n"
        "from lightning_xgrad import XGradCallback\n"
        "print('lightning' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT.parent), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.splitlines() == ["[]", "True"]  # ... and the callback does bring Lightning in
