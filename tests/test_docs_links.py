"""Relative links in the Markdown docs point at files that exist and at headings that exist (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "outputs", ".git", "node_modules", ".pytest_cache"}
DOCS = sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # headings inside code blocks do not count
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_the_anchor_rule_matches_github():
    assert anchor("The demo (`make demo`)") == "the-demo-make-demo"
    assert anchor("Capacity or steps?") == "capacity-or-steps"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if "outputs" in Path(path).parts:  # written by `make demo`, not committed
            continue
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{frag} in {dest.name}")
    assert not broken, f"{doc.relative_to(ROOT)} has broken links: {broken}"


CONFIG_PATH = re.compile(r"(?<![\w/.])configs/[\w./-]*\w(?![\w{-])")  # configs/paper/cluster.yaml, configs/tiny ...
WRITTEN = re.compile(r"configs/tiny_b4\w*$")  # chains `python -m mardini.rebatch` writes (STUDIES.md, "Batches of 4")
NAMED_IN = sorted(
    p for p in [*ROOT.rglob("*.py"), *ROOT.rglob("*.md"), *ROOT.rglob("*.sh"), *ROOT.rglob("*.yaml"), ROOT / "Makefile"]
    if not SKIP_DIRS & set(p.relative_to(ROOT).parts) and p.name != "test_docs_links.py"
)


def test_every_config_path_named_in_code_docs_and_scripts_exists():
    """An error message, docstring, script or doc that names a config file names one the checkout has (a hint
    pointing at ``configs/cluster.yaml`` when the file is ``configs/paper/cluster.yaml`` sends the user nowhere)."""
    missing = set()
    for path in NAMED_IN:
        for name in CONFIG_PATH.findall(path.read_text(errors="replace")):
            if not WRITTEN.match(name) and not (ROOT / name).exists():
                missing.add(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, f"config paths that do not exist: {sorted(missing)}"
