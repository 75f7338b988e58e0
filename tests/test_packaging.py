"""What installing the package gives a user: declared dependencies that match the imports, floors that the compat
stacks test, the license in the wheel, quiet examples, and a Makefile that reinstalls when the torch choice changes.
(The README's links are checked with the docs, in test_docs.py.)"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .test_compat import compat_tool
from .toolkit import make_dry_run

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _distributions_imported_by(folder: Path) -> set[str]:
    """The installed distributions that the code under ``folder`` imports at top level or inside functions, less the
    standard library and the repository's own modules."""
    local = {p.stem for p in REPO.glob("*/*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}
    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | local | {"__future__"}
    providers = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in modules if m not in providers)
    assert not unknown, f"imports that no installed distribution provides: {unknown}"
    return {canonicalize_name(dist) for m in modules for dist in providers[m]}


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


#: imports of the package that are optional (guarded by ``except ImportError``), and the extra that declares each
OPTIONAL_IMPORTS = {"matplotlib": "sweep"}


def test_core_dependencies_are_exactly_what_the_package_imports() -> None:
    optional = {canonicalize_name(name) for name in OPTIONAL_IMPORTS}
    assert _declared(PROJECT["dependencies"]) == _distributions_imported_by(REPO / "lightning_xgrad") - optional
    for name, extra in OPTIONAL_IMPORTS.items():
        assert canonicalize_name(name) in _declared(PROJECT["optional-dependencies"][extra])


def test_examples_extra_declares_every_import_of_the_examples_and_benchmarks() -> None:
    declared = _declared(PROJECT["dependencies"]) | _declared(PROJECT["optional-dependencies"]["examples"])
    for folder in ("examples", "benchmarks"):
        missing = _distributions_imported_by(REPO / folder) - declared
        assert not missing, f"{folder}/ imports {sorted(missing)}, which neither the core nor [examples] declares"


def test_floors_are_the_oldest_releases_the_compat_stacks_test() -> None:
    """pyproject.toml admits torch and Lightning from the floor stack's releases on (tools/compat.py), and the torch
    `make test` pins lies between the floor and the newest stack."""
    floor, newest = compat_tool().STACKS["floor"], compat_tool().STACKS["newest"]
    requirements = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    assert str(requirements["torch"].specifier) == f">={floor.torch.rsplit('.', 1)[0]}"
    assert str(requirements["lightning"].specifier) == f">={floor.lightning.rsplit('.', 1)[0]}"
    assert PROJECT["requires-python"] == f">={floor.python}"
    ci_torch = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert ci_torch is not None, "the Makefile no longer pins the torch release CI installs"
    assert Version(floor.torch) <= Version(ci_torch.group(1)) <= Version(newest.torch)


def test_wheel_carries_the_apache_license(tmp_path: Path) -> None:
    """The wheel built from the sources a release would ship (copied, so the checkout gets no build folders)."""
    floor = Requirement(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"][0])
    try:
        installed = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed (the dev extra installs it)")
    if installed not in floor.specifier:
        pytest.skip(f"setuptools {installed} is older than the build requirement {floor}")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).write_bytes((REPO / name).read_bytes())
    shutil.copytree(REPO / "lightning_xgrad", source / "lightning_xgrad", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lightning_xgrad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name) == (REPO / "LICENSE").read_bytes()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Apache License\n                           Version 2.0, January 2004" in (REPO / "LICENSE").read_text()
    assert "Framework :: Pytest" not in metadata
    assert any(n.startswith("lightning_xgrad/") and n.endswith("callback.py") for n in names)


EXAMPLE_RUNS = {
    "demo": ["demo.py", "--epochs", "1", "--optimizers", "sgd", "--no-progress-bar"],
    "cli": [
        "digits.py",
        "fit",
        f"--config={REPO / 'examples' / 'configs' / 'digits_sgd.yaml'}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ],
}


@pytest.mark.parametrize("run", EXAMPLE_RUNS)
def test_examples_print_no_lightning_tips_or_leafspec_deprecation(run: str, tmp_path: Path) -> None:
    """Run as a user runs them, from a scratch folder so that LightningCLI's config.yaml lands there."""
    script, *args = EXAMPLE_RUNS[run]
    command = [sys.executable, str(REPO / "examples" / script), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    env["OMP_NUM_THREADS"] = "1"  # a model this small trains fastest on one thread, and a busy CPU slows two down
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    output = result.stdout + result.stderr
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in output  # Lightning's own lines still show
    assert "Tip:" not in output
    assert "LeafSpec" not in output
    assert "does not have many workers" not in output


def test_make_reinstalls_when_the_torch_choice_changes(tmp_path: Path) -> None:
    """``make -n`` (print, run nothing) against a .venv installed with the default torch: only a new TORCH or
    TORCH_INDEX rebuilds it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()

    def plan(*variables: str) -> str:
        return make_dry_run(f"VENV={venv}", *variables, "test", cwd=REPO)

    first = plan()  # a .venv without stamps, as an older Makefile left it: made anew
    assert "-m venv" in first and '"torch==2.13.0"' in first
    stamps = re.findall(r"^touch (\S+)$", first, re.MULTILINE)
    assert len(stamps) == 2
    for stamp in stamps:  # as if the plan had run: the torch stamp, then the package stamp after pyproject.toml
        Path(stamp).touch()
        os.utime(stamp, (os.path.getmtime(REPO / "pyproject.toml") + 1,) * 2)
    assert plan().splitlines() == [f"{venv}/bin/python -m pytest"]
    for variables, torch_install in [
        (["TORCH=torch"], '-m pip install --quiet "torch" '),
        (["TORCH_INDEX=https://download.pytorch.org/whl/cpu"], '"torch==2.13.0" --index-url "https://download.'),
    ]:
        again = plan(*variables)
        assert f"rm -rf {venv}" in again and torch_install in again and '-e ".[dev]"' in again
