#!/usr/bin/env python
"""Benchmark protocols (VIDIM-Bench-style interpolation, image-to-video, the synthetic set) with baselines.

    python evaluate.py --preset synthetic --metrics midf traj --num-clips 16
    python evaluate.py --preset vidim --data data/videos/davis --checkpoint runs/joint/last.ckpt

See mardini/evaluation/README.md; the code is mardini/evaluation/cli.py (the main loop) and the
modules beside it (arguments.py: the options).
"""

from mardini.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
