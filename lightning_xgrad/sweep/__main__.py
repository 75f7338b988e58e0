"""``python -m lightning_xgrad.sweep``: see :mod:`lightning_xgrad.sweep.cli`."""

from .cli import MODULE_PROG, main

raise SystemExit(main(prog=MODULE_PROG))
