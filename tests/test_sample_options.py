"""Every sampling option of ``sample.py`` with an impossible value fails at once, naming the option and its range."""

from __future__ import annotations

import pytest

from mardini.pipeline.cli import OPTION_RULES, main

CASES = [
    ("--steps", "0", ">= 1"),
    ("--guidance", "-1.0", ">= 0"),
    ("--eta", "-0.5", "in [0, 1] (DDIM's eta: 0 deterministic, 1 ancestral)"),
    ("--eta", "1.5", "in [0, 1] (DDIM's eta: 0 deterministic, 1 ancestral)"),
    ("--batch", "0", ">= 1"),
    ("--num-samples", "0", ">= 1"),
    ("--clips", "0", ">= 1"),
    ("--start", "-2", ">= 0"),
    ("--stride", "0", ">= 1"),
    ("--frames", "1", ">= 2"),
    ("--total", "1", ">= 2"),
    ("--context", "0", ">= 1"),
    ("--factor", "3", "power of two"),
    ("--fps", "0.0", "> 0"),
    ("--seed", "-1", "in [0, 2**63)"),
    ("--num-slices", "0", ">= 1"),
    ("--slice-index", "-1", ">= 0"),
    ("--max-skipped", "-1", ">= 0"),
]


def test_every_rule_has_a_case():
    checked = {flag.lstrip("-").replace("-", "_") for flag, _, _ in CASES}
    assert checked == set(OPTION_RULES)  # --index is checked by the task, against the window


@pytest.mark.parametrize("flag, value, allowed", CASES, ids=[c[0] for c in CASES])
def test_impossible_option_fails_before_loading(tmp_path, capsys, flag, value, allowed):
    missing = tmp_path / "no.ckpt"  # never read: the options are checked first
    with pytest.raises(SystemExit) as stop:
        main(["interpolate", "--ckpt", str(missing), "--images", "a.png", "b.png", f"{flag}={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}={value} is impossible" in err and allowed in err
