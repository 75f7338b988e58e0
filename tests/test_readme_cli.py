"""The LightningCLI advice of the README and docs/getting-started.md, run through ``examples/digits.py``: a second
``--config`` replaces the callbacks list, ``callbacks+:`` and ``--trainer.callbacks+=`` append to it, and
``--trainer.callbacks.help`` documents every argument of the callback, as the docs' excerpt of it shows."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_xgrad import XGradCallback

from .toolkit import EXAMPLES, load_example

GETTING_STARTED = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"

# args given while sys.argv holds pytest's own: intended here
pytestmark = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter is intended.*")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
BASE = "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
XGRAD_ENTRY = "    - class_path: lightning_xgrad.XGradCallback\n      init_args:\n        steps: 2\n"


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    return load_example("digits")


def _callbacks(digits: ModuleType, *args: str) -> list[type]:
    config = EXAMPLES / "configs" / "digits_adamw.yaml"
    cli = digits.cli_main(["--config", str(config), *QUIET, *args], run=False)
    return [type(c) for c in cli.trainer.callbacks if isinstance(c, (LearningRateMonitor, XGradCallback))]


def test_a_second_config_replaces_the_callbacks_list(digits: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "xgrad.yaml").write_text("trainer:\n  callbacks:\n" + XGRAD_ENTRY)
    found = _callbacks(digits, "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "xgrad.yaml"))
    assert found == [XGradCallback]


def test_callbacks_plus_in_a_second_config_appends(digits: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "xgrad.yaml").write_text("trainer:\n  callbacks+:\n" + XGRAD_ENTRY)
    found = _callbacks(digits, "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "xgrad.yaml"))
    assert found == [LearningRateMonitor, XGradCallback]


def test_the_flag_appends_to_a_config_with_callbacks(digits: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    flags = ["--trainer.callbacks+=lightning_xgrad.XGradCallback", "--trainer.callbacks.steps=2"]
    found = _callbacks(digits, "--config", str(tmp_path / "base.yaml"), *flags)
    assert found == [LearningRateMonitor, XGradCallback]


def test_callbacks_help_lists_every_argument_with_its_documentation(
    digits: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        digits.cli_main(["fit", "--trainer.callbacks.help", "lightning_xgrad.XGradCallback"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    parameters = [name for name in inspect.signature(XGradCallback.__init__).parameters if name != "self"]
    assert parameters
    for name in parameters:
        assert f"--trainer.callbacks.{name}" in text
    assert "the paper's s). (type: int, default: 1)" in text  # the docstring's words, then type and default


def test_the_documented_help_excerpt_and_table_list_every_argument() -> None:
    """docs/getting-started.md quotes the usage lines of ``--trainer.callbacks.help`` and has a table of the
    arguments: both name every argument of the callback, in the signature's order (an argument added to the callback
    and not to the docs fails here)."""
    usage = re.search(r"^usage: digits\.py (.*?)\n\n", GETTING_STARTED.read_text(), re.MULTILINE | re.DOTALL)
    assert usage is not None, "docs/getting-started.md no longer quotes the usage of --trainer.callbacks.help"
    parameters = [name for name in inspect.signature(XGradCallback.__init__).parameters if name != "self"]
    assert re.findall(r"\[--trainer\.callbacks\.(\w+)", usage.group(1)) == parameters
    table = re.findall(r"^\| `(\w+): ", GETTING_STARTED.read_text(), re.MULTILINE)  # the table of the arguments
    assert table == parameters
