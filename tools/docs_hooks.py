"""mkdocs hooks (``hooks:`` in mkdocs.yml): what the docs build takes from outside ``docs/``, and Sphinx roles.

- The published benchmark results (``benchmarks/results/*.md`` and ``*.png``) become part of the site under
  ``results/``, as they lie in the repository: nothing is regenerated. The pages link them by their path in the
  repository (``../benchmarks/results/overhead.md``, which also works on GitHub); those links are rewritten to the
  site's copies before mkdocs validates them, so a link to a results file that does not exist still fails the build.
- The docstrings cite other objects the Sphinx way (``:class:`~lightning_xgrad.XGradCallback```); in the API reference
  each citation becomes code, linked where the object is documented.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: where the results files lie in the site
SITE_RESULTS = "results"
#: what of the results the site takes
RESULT_SUFFIXES = (".md", ".png")

_LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([^<]+)</code>")


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in RESULT_SUFFIXES:
            files.append(File.generated(config, f"{SITE_RESULTS}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Links to ``benchmarks/results/`` files, written relative to the page's source, point to the site's copies."""
    source = page.file.abs_src_path
    if source is None or not Path(source).resolve().is_relative_to(Path(config["docs_dir"]).resolve()):
        return markdown  # the results pages themselves: their links are among themselves
    here = Path(source).resolve().parent
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match[2]
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL
            return match[0]
        resolved = (here / target).resolve()
        if resolved.parent != RESULTS:
            return match[0]
        site_path = posixpath.relpath(f"{SITE_RESULTS}/{resolved.name}", page_dir or ".")
        return f"{match[1]}{site_path}{match[3]}"

    # outside fenced code blocks only (every other part of the split)
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(part if i % 2 else _LINK.sub(rewrite, part) for i, part in enumerate(parts))


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """``:class:`~a.b.C``` (rendered as ``:class:<code>~a.b.C</code>``) -> ``C`` as code, linked where documented."""

    def replace(match: re.Match[str]) -> str:
        short, target = match[1] == "~", match[2]
        if target.startswith("."):  # relative to the docstring's module: no identifier to link
            return f"<code>{target.lstrip('.')}</code>"
        title = target.rsplit(".", 1)[-1] if short else target
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(replace, html)
