"""Table 3 from the benchmark module ``bench.asymmetric`` (owned by the benchmarks; called, not re-implemented).

It runs in a fresh Python process: each variant's peak RSS is its subprocess's ``ru_maxrss``, which Linux
carries over ``exec`` from the parent, so a parent that has already trained and sampled (this command) would
raise every variant to its own peak. Latency is timed over ``rounds`` interleaved rounds, each child after a
warm-up call as long as the timed one, on the reproduction's thread count; the memory the verdict compares is
what a call after the timed one adds to the child's resident set at its peak (``bench.asymmetric``'s docstring),
with its min and max over the rounds. Its results folder is pointed at the
reproduction's folder, so a reproduction run never overwrites the benchmark's published
``bench/results/asymmetric.json``. The module is the checkout's ``bench/`` (run there, from whatever folder the
reproduction runs in).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mardini.checkout import ROOT, repo_path

_RUN = ("import sys; from pathlib import Path; import bench.common as c; c.RESULTS = Path(sys.argv[1]); "
        "from bench.asymmetric import main; main(sys.argv[2:])")


def table3(out: Path, quick: bool, rounds: int, threads: int) -> dict:
    """``bench.asymmetric`` (``--quick`` or its defaults); returns its result (``table``: rows per frames/variant)."""
    repo_path("bench/asymmetric.py")  # python -m mardini.reproduce checks it first, before anything runs
    out = out.resolve()  # the child runs in the checkout, to import bench
    path = out / "asymmetric.json"
    path.unlink(missing_ok=True)
    argv = [*(["--quick"] if quick else []), "--rounds", str(rounds), "--threads", str(threads), "--full-warmup"]
    done = subprocess.run([sys.executable, "-c", _RUN, str(out), *argv], cwd=ROOT)
    if done.returncode or not path.is_file():
        raise RuntimeError(f"bench.asymmetric failed (exit code {done.returncode}); see its messages above")
    result = json.loads(path.read_text(encoding="utf-8"))
    if not result.get("table"):
        raise RuntimeError(f"bench.asymmetric wrote no table to {path}")
    return result
