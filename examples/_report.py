"""The comparison table the examples print: baseline and XGrad rows, mean ± std over seeds, with rich if present."""

from __future__ import annotations

import statistics


def method_name(steps: int | None) -> str:
    """A row label: ``baseline`` without the callback, ``XGrad s=N`` with it."""
    return "baseline" if steps is None else f"XGrad s={steps}"


def summary(values: list[float], signed: bool = False, digits: int = 4) -> str:
    """One value, or mean ± sample std over seeds; ``signed`` for deltas."""
    fmt = f"{'+' if signed else ''}.{digits}f"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):.{digits}f}"


def print_table(title: str, caption: str, header: list[str], rows: list[list[str]], label_columns: int = 1) -> None:
    """Print rows under a header: the first ``label_columns`` left-aligned, numbers right-aligned; with two or more
    label columns a new first label starts a new section. Plain aligned text when rich is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
        print(title)
        for i, row in enumerate([header, *rows]):
            pairs = enumerate(zip(row, widths, strict=True))
            cells = [cell.ljust(w) if j < label_columns else cell.rjust(w) for j, (cell, w) in pairs]
            print("  ".join(cells).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print(caption)
        return
    table = Table(title=title, caption=caption)
    for j, name in enumerate(header):
        table.add_column(name, justify="left" if j < label_columns else "right")
    previous = None
    for row in rows:
        if label_columns > 1 and previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or in CI: rich would wrap at 80 columns, print at full width
        console = Console(width=200)
    console.print(table)
