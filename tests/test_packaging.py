"""What installing the package gives a user: declared dependencies that match the imports, floors that the compat
stacks test, one version, a wheel and an sdist that hold what they should (the license, the whole package, no tests),
the wheel installed into a fresh venv training and running `xgrad-sweep`, quiet examples, and a Makefile that
reinstalls when the torch choice changes. (The README's links are checked with the docs, in test_docs.py.)"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
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


def _source_version() -> str:
    """``__version__`` as lightning_xgrad/__init__.py assigns it, read without importing the package."""
    tree = ast.parse((REPO / "lightning_xgrad" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            return node.value.value
    raise AssertionError("lightning_xgrad/__init__.py assigns no __version__")


#: what git ignores (.gitignore): virtual environments, caches, build output and runs, left out of the copy of the
#: sources that the release is built from
_NOT_SOURCES = {".git", ".venv", ".venv-compat", "__pycache__", ".pytest_cache", ".ruff_cache", "lightning_logs"}
_NOT_SOURCES |= {"checkpoints", "build", "dist", ".device_out", "xgrad-sweeps", "compat-results"}


def _ignored(folder: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n in _NOT_SOURCES or n.endswith(".egg-info")}
    return ignored | ({"runs"} if Path(folder).name == "benchmarks" else set())


@dataclass(frozen=True)
class Release:
    sdist: Path
    wheel: Path
    version: str


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The sdist and the wheel, built as `python -m build` builds them (the sdist from the sources, the wheel from the
    unpacked sdist) but offline and without isolation: setuptools' build backend and pip, from the running
    environment. Built from a copy of the sources, so the checkout gets no build folders."""
    floor = Requirement(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"][0])
    try:
        installed = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed (the dev extra installs it)")
    if installed not in floor.specifier:
        pytest.skip(f"setuptools {installed} is older than the build requirement {floor}")
    root = tmp_path_factory.mktemp("release")
    source, dist = root / "source", root / "dist"
    shutil.copytree(REPO, source, ignore=_ignored)
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", build_sdist, str(dist)], cwd=source, check=True, capture_output=True, text=True
    )
    sdist = dist / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12 and later
            archive.extractall(root / "unpacked", filter="data")
        else:
            archive.extractall(root / "unpacked")
    (unpacked,) = (root / "unpacked").iterdir()
    command = [sys.executable, "-m", "pip", "wheel", str(unpacked), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(dist)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("lightning_xgrad-*.whl")
    return Release(sdist, wheel, _source_version())


def test_version_has_one_source() -> None:
    """pyproject.toml reads the version from ``__version__`` (statically: building imports nothing)."""
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_config["dynamic"]["version"] == {"attr": "lightning_xgrad.__version__"}
    assert str(Version(_source_version())) == _source_version()  # a PEP 440 version, written in its normal form


def test_the_changelog_and_the_citation_name_the_version() -> None:
    """A released version has its CHANGELOG section, and CITATION.cff cites it (a dev version needs neither)."""
    version = Version(_source_version())
    if version.is_devrelease:
        pytest.skip(f"{version} is a development version")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert str(citation["version"]) == str(version)
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(str(version))}\] - {citation['date-released']}$", changelog, re.MULTILINE)


def test_wheel_carries_the_apache_license(release: Release) -> None:
    with zipfile.ZipFile(release.wheel) as archive:
        names = archive.namelist()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name) == (REPO / "LICENSE").read_bytes()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Apache License\n                           Version 2.0, January 2004" in (REPO / "LICENSE").read_text()
    assert "Framework :: Pytest" not in metadata


def test_wheel_holds_the_whole_package_and_nothing_else(release: Release) -> None:
    """Every module of every subpackage, py.typed and the metadata: no tests, benchmarks or examples."""
    with zipfile.ZipFile(release.wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"lightning_xgrad-{release.version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"lightning_xgrad-{release.version}.dist-info/entry_points.txt").decode()
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "lightning_xgrad").rglob("*.py")}
    assert {"lightning_xgrad/_internal/__init__.py", "lightning_xgrad/sweep/__init__.py"} <= package
    assert {n for n in names if n.endswith(".py")} == package
    assert "lightning_xgrad/py.typed" in names
    assert {n.split("/")[0] for n in names} == {"lightning_xgrad", f"lightning_xgrad-{release.version}.dist-info"}
    assert release.wheel.name == f"lightning_xgrad-{release.version}-py3-none-any.whl"
    assert f"\nVersion: {release.version}\n" in metadata
    assert "xgrad-sweep = lightning_xgrad.sweep:main" in entry_points


def test_sdist_holds_what_builds_the_wheel_and_no_tests(release: Release) -> None:
    """The wheel above was built from this sdist alone; it also carries the changelog and the citation, and no half
    test suite (setuptools would add the test_*.py files without the helpers they import)."""
    with tarfile.open(release.sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    top = {n for n in names if "/" not in n}
    assert top >= {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "PKG-INFO"}
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", "tools/", "docs/")) for n in names)
    assert {p.relative_to(REPO).as_posix() for p in (REPO / "lightning_xgrad").rglob("*.py")} <= names


#: a few steps of a tiny fit with XGrad in the venv the wheel is installed into, reporting where the package came from
_FIT_IN_VENV = """
import importlib.metadata, json
import lightning.pytorch as pl
import torch
import lightning_xgrad
from lightning_xgrad import XGradCallback

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
trainer = pl.Trainer(
    accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[XGradCallback(steps=1, log_every_n_steps=1)],
)
trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
print(json.dumps({
    "file": lightning_xgrad.__file__,
    "version": lightning_xgrad.__version__,
    "metadata": importlib.metadata.version("lightning-xgrad"),
    "global_step": trainer.global_step,
    "metrics": sorted(trainer.callback_metrics),
}))
"""


def test_installed_wheel_trains_and_runs_the_sweep_cli(release: Release, tmp_path: Path) -> None:
    """The wheel in a new venv, imported from there: a venv without pip or system site-packages, the wheel installed
    by this environment's pip (``--no-deps``), and torch and Lightning found through a .pth line naming this
    environment's site-packages. A line of a .pth only extends sys.path, so the editable install's finder there never
    runs, and the venv's own site-packages comes first: the import must resolve to the wheel's copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, str(release.wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys(site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []))
    (Path(purelib) / "_dependencies_of_the_test.pth").write_text("".join(f"{p}\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"

    fit = subprocess.run(
        [str(python), "-I", "-c", _FIT_IN_VENV], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    report = json.loads(fit.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(venv.resolve()), report["file"]
    assert report["version"] == report["metadata"] == release.version
    assert report["global_step"] == 4
    assert "xgrad/prediction_cosine" in report["metrics"], report["metrics"]  # XGrad predicted and measured

    script = bin_dir / "xgrad-sweep"
    assert script.read_text().splitlines()[0] == f"#!{python}"  # the console script runs the venv's Python
    sweep = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert sweep.stdout.startswith("usage: ") and "--seeds" in sweep.stdout and "--monitor" in sweep.stdout


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
