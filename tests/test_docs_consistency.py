"""The Markdown docs stay renderable and in step with the code and each other: tables GitHub can render, figures
one doc quotes from another."""

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


def demo_row(readme: str, method: str) -> list[str]:
    """The figures of one method's row in README.md's demo table (MidF-PSNR, SSIM, found, px found, px all)."""
    row = re.search(rf"^\| (?:\*\*)?{re.escape(method)}(?:\*\*)? \|(.*)\|$", readme, flags=re.M)
    assert row, f"README.md's demo table has no row for {method}"
    return [c.strip().strip("*") for c in row.group(1).split("|")]


def test_studies_quotes_the_readme_s_demo_figures():
    """STUDIES.md's opening names the README's demo figures: it quoted sessions 1-4's 16.16 / 0.651, 14.13 px after
    the README's table had moved to the current code's 16.17 / 0.652, 14.23 px."""
    readme = (ROOT / "README.md").read_text()
    opening = (ROOT / "STUDIES.md").read_text().split("\n\n")[1].replace("\n", " ")
    model, blend, nearest = (demo_row(readme, m) for m in ("MarDini (tiny)", "linear blend", "nearest frame"))
    quoted = [f"{model[0]} / {model[1]} against the blend's {blend[0]} / {blend[1]}",
              f"the nearest frame's {nearest[0]} / {nearest[1]}", f"{round(100 * float(model[2]))} % of the objects",
              f"{model[4]} px over all objects against the nearest frame's {nearest[4]}"]
    assert [q for q in quoted if q not in opening] == [], opening
