"""The Markdown docs stay renderable and in step with the code: tables GitHub can render."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "outputs", ".git", "node_modules", ".pytest_cache"}
DOCS = sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))
DELIMITER = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def cells(row: str) -> int:
    """Cells of a GFM table row: split on pipes, except escaped ones (``\\|``; a code span does not protect one)."""
    return len(row.strip().replace("\\|", "").strip("|").split("|"))


def table_problems(text: str) -> list[str]:
    """Each table row (delimiter or body) whose cell count differs from its header's, as ``line N: ...``."""
    problems, lines, fenced = [], text.splitlines(), False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if fenced or i == 0 or not DELIMITER.match(line.strip()):
            continue
        header, j = cells(lines[i - 1]), i
        while j < len(lines) and lines[j].startswith("|"):  # the delimiter row, then the body
            if cells(lines[j]) != header:
                problems.append(f"line {j + 1}: {cells(lines[j])} cells under a header of {header}")
            j += 1
    return problems


def test_the_cell_rule_matches_gfm():
    assert cells("| a | `b` | c \\| d |") == 3
    assert table_problems("| a | b |\n|---|---|---|\n| 1 | 2 |\n") == ["line 2: 3 cells under a header of 2"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_header_s_cells(doc):
    """GitHub renders a table only when its delimiter row has the header's cell count (else the rows show as text)
    and drops a body row's extra cells: bench/README.md's 1/4-scale Table 3 had 10 delimiter cells under 9."""
    assert not table_problems(doc.read_text()), f"{doc.relative_to(ROOT)}: {table_problems(doc.read_text())}"
