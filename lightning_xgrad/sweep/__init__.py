"""Does XGrad help my model, and with which s? ``python -m lightning_xgrad.sweep -- <LightningCLI command>``.

- :mod:`.runs`: one run as a subprocess (what the sweep appends to the command), and its metrics read back;
- :mod:`.stats`: mean and spread over seeds, the paired difference against s = 0, the verdict;
- :mod:`.report`: the table as Markdown; :mod:`.plot`: the curves; :mod:`.cli`: the command line.

Nothing here imports Lightning: the runs do, in their own processes.
"""

from .cli import SweepConfig, main, run_sweep

__all__ = ["SweepConfig", "main", "run_sweep"]
