"""Markdown tables for the reports of `plot`, `study` and `grad_ratio`."""

from collections.abc import Sequence
from typing import Any


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table: a header of ``columns`` and one line per row.

  Cells are written with ``str``; format numbers before passing them.
  Raises ValueError when a row's length differs from the header's, which
  markdown renderers would otherwise silently pad or truncate.
  """
  for i, row in enumerate(rows):
    if len(row) != len(columns):
      raise ValueError(
          f"row {i} has {len(row)} cells, the header has "
          f"{len(columns)}: {row!r}"
      )
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)
