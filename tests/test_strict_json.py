"""Strict JSON for every report the project writes (evaluate.py, the demo, make reproduce): no NaN / Infinity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mardini.strict_json import dumps_strict, finite_json, loads_strict





def test_non_finite_values_become_null_and_are_named():
    found: list[str] = []
    out = finite_json({"a": {"psnr": math.inf, "ok": 1.5}, "b": [np.float32("nan"), 2], "c": torch.tensor(-math.inf),
                       "d": "nan", "e": None, "f": True}, found=found)
    assert out == {"a": {"psnr": None, "ok": 1.5}, "b": [None, 2], "c": None, "d": "nan", "e": None, "f": True}
    assert found == ["a.psnr = inf", "b[0] = nan", "c = -inf"]


def test_dumps_strict_writes_what_a_strict_parser_reads_with_a_notice():
    text = dumps_strict({"results": {"fid": float("nan")}, "notices": ["earlier"]})
    back = loads_strict(text)
    assert back["results"]["fid"] is None
    assert back["notices"][0] == "earlier" and "results.fid = nan" in back["notices"][1]
    plain = {"results": {"fid": 1.25}}
    assert loads_strict(dumps_strict(plain)) == plain  # nothing added when every value is finite
    with pytest.raises(ValueError, match="constant NaN"):
        loads_strict(json.dumps({"x": float("nan")}))  # what the reports used to hold

