"""CProp (arXiv 1912.11493), everything of it: the conformity statistics and scale (:mod:`.statistics`), the
optimizers CPropSGD and CPropAdam (:mod:`.optim`) with their XGrad rules (:mod:`.rules`), and CPropCallback
(:mod:`.callback`), which scales the updates of any optimizer through :mod:`.tracker`.

Only the callback needs Lightning: it is imported on first use (PEP 562), so the optimizers and the statistics
import with torch alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .optim import CPropAdam, CPropSGD

if TYPE_CHECKING:
    from .callback import CPropCallback

__all__ = ["CPropAdam", "CPropCallback", "CPropSGD"]


def __getattr__(name: str) -> Any:
    if name == "CPropCallback":
        from .callback import CPropCallback

        return CPropCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
