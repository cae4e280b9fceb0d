"""Tables printed to the terminal: `rich` when installed, plain text otherwise."""

from __future__ import annotations

from typing import Any


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print `rows` (dicts sharing keys; the first row's keys are the columns) as one table."""
    if not rows:
        return
    columns = list(rows[0].keys())
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in columns))
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console(width=max(120, 20 * len(columns))).print(table)
