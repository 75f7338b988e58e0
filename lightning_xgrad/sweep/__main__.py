"""``python -m lightning_xgrad.sweep``: see :mod:`lightning_xgrad.sweep.cli`."""

from .cli import main

raise SystemExit(main())
