"""The docs site and the links into it: ``mkdocs build --strict`` passes with no warning (every link, anchor, nav entry
and API reference resolves; mkdocs.yml makes each of those a warning), the published benchmark results and plots are
in the site without being regenerated, and every relative link of the README and CONTRIBUTING.md points to a file of
the repository, and an anchor in it to a heading of that file."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_xgrad import OptimizerPredictor

REPO = Path(__file__).resolve().parents[1]
#: the Markdown files outside docs/ whose links GitHub shows and nothing else checks
LINKING = ("README.md", "CONTRIBUTING.md")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built once, into a folder of its own: the checkout gets no site/."""
    out = tmp_path_factory.mktemp("docs") / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2, not a warning of ours
    result = subprocess.run(
        [*command, "--site-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    problems = [line for line in log.splitlines() if re.match(r"(WARNING|ERROR)\b", line)]
    assert not problems, "the docs build warned:\n" + "\n".join(problems)
    return out


def test_the_docs_build_strictly_without_a_warning(site: Path) -> None:
    pages = {path.relative_to(site).as_posix() for path in site.rglob("*.html")}
    for markdown in (REPO / "docs").rglob("*.md"):
        assert markdown.relative_to(REPO / "docs").with_suffix(".html").as_posix() in pages, markdown


def test_the_published_results_and_plots_are_in_the_site(site: Path) -> None:
    published = sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir() if p.suffix in {".md", ".png"})
    assert published
    for name in published:
        built = site / "results" / (name.removesuffix(".md") + ".html" if name.endswith(".md") else name)
        assert built.is_file(), f"benchmarks/results/{name} is not in the site"
    for plot in ("convergence.png", "overhead.png", "overhead-compile.png"):
        assert f'src="results/{plot}"' in (site / "benchmarks.html").read_text(), plot
    assert 'src="results/companions.png"' in (site / "companions.html").read_text()


def test_the_api_reference_documents_the_public_names(site: Path) -> None:
    """Each name is rendered from its docstring (an anchor per object), and no Sphinx role is left raw."""
    names = {
        "callbacks": ["lightning_xgrad.XGradCallback", "lightning_xgrad.CPropCallback"],
        "prediction": [
            "lightning_xgrad.OptimizerPredictor",
            "lightning_xgrad.OptimizerPredictor.predict",
            "lightning_xgrad.OptimizerPredictor.describe",
            "lightning_xgrad.OptimizerPredictor.close",
            "lightning_xgrad.OptimizerPredictor.measure_next_update",
            "lightning_xgrad.PredictedWeightsEditedWarning",
        ],
        "rules": ["lightning_xgrad.PredictionRule", "lightning_xgrad.register_rule", "lightning_xgrad.rules.rule_for"],
        "optimizers": [
            "lightning_xgrad.optim.AdaM3",
            "lightning_xgrad.cprop.CPropSGD",
            "lightning_xgrad.cprop.CPropAdam",
            "lightning_xgrad.heavy_ball.AdaptiveHeavyBallSGD",
            "lightning_xgrad.heavy_ball.AdaptiveHeavyBallAdam",
        ],
        "protocols": [
            "lightning_xgrad.protocols.GradientPointObserver",
            "lightning_xgrad.protocols.DirectionScaleProvider",
            "lightning_xgrad.protocols.RealWeightsRestorer",
        ],
        "sweep": ["lightning_xgrad.sweep.SweepConfig", "lightning_xgrad.sweep.run_sweep", "lightning_xgrad.sweep.main"],
    }
    for page, identifiers in names.items():
        html = (site / "api" / f"{page}.html").read_text()
        for identifier in identifiers:
            assert f'id="{identifier}"' in html, f"api/{page}.md does not document {identifier}"
        assert not re.search(r":(class|func|meth|mod|attr|exc):<code>", html), f"a raw Sphinx role in api/{page}.md"


def _without_code(markdown: str) -> str:
    """The Markdown less fenced code blocks and inline code, where a link-like text is no link."""
    markdown = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", markdown, flags=re.DOTALL)


def _github_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces to hyphens."""
    fenced = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", fenced, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("name", LINKING)
def test_relative_links_resolve_in_the_repository(name: str) -> None:
    source = REPO / name
    targets = re.findall(r"\]\(([^)\s]+)\)", _without_code(source.read_text()))
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert relative, f"{name} links no file of the repository any more: drop it from this test"
    for target in relative:
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.is_relative_to(REPO) and linked.is_file(), f"{name} links {target}: no such file"
        if anchor:
            assert linked.suffix == ".md", f"{name} links {target}: an anchor into a file that is not Markdown"
            assert anchor in _github_anchors(linked.read_text()), f"{name} links {target}: no such heading there"


def test_the_readme_links_every_docs_page_it_names() -> None:
    """The README's documentation list reaches the docs site's pages (the API reference through its first page)."""
    readme = (REPO / "README.md").read_text()
    linked = {target.partition("#")[0] for target in re.findall(r"\]\((docs/[^)\s]+)\)", readme)}
    pages = {f"docs/{p.relative_to(REPO / 'docs').as_posix()}" for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_the_documented_predictor_signature_and_methods_are_the_code_s() -> None:
    """docs/plain-pytorch.md shows ``OptimizerPredictor(...)`` one argument a line with its default, and a table of
    its methods: the arguments, their order and defaults are the constructor's, and every public method is in it."""
    text = (REPO / "docs" / "plain-pytorch.md").read_text()
    block = re.search(r"^OptimizerPredictor\(\n(.*?)^\)", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "docs/plain-pytorch.md no longer shows the constructor's signature"
    documented = re.findall(r"^    (\w+)(?:=([^,]+))?,", block.group(1), re.MULTILINE)
    parameters = list(inspect.signature(OptimizerPredictor.__init__).parameters.values())[1:]
    assert [name for name, _ in documented] == [p.name for p in parameters]
    for (name, default), parameter in zip(documented, parameters, strict=True):
        expected = inspect.Parameter.empty if not default else ast.literal_eval(default)
        assert expected == parameter.default, name
    methods = [
        name
        for name, member in vars(OptimizerPredictor).items()
        if not name.startswith("_") and inspect.isfunction(member)
    ]
    for name in methods:
        assert f"`{name}(" in text, f"docs/plain-pytorch.md does not document OptimizerPredictor.{name}"
