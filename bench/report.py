"""What a benchmark section hands back, and how it is printed: aligned text on the terminal,
markdown for bench/results/*.md and the README."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """A titled table of already formatted cells; `notes` are printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class SectionResult:
    """The tables a section prints and the raw records it stores in the results JSON."""

    tables: list[Table]
    records: dict


def as_text(table: Table) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(table.columns, *table.rows)]
    # The first column (a name) is left-aligned, numbers right-aligned.
    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [table.title, line(table.columns), "-" * len(line(table.columns))]
    out += [line(row) for row in table.rows]
    out += table.notes
    return "\n".join(out)


def as_markdown(table: Table) -> str:
    out = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.columns))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    if table.notes:
        out += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(out)
