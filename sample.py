#!/usr/bin/env python
"""Sample videos from a trained MarDini checkpoint: generate (any mask), interpolate, image_to_video, expand,
long_video, slow_motion. ``python sample.py --help``; the logic lives in ``mardini/pipeline/cli.py``.
"""

from mardini.pipeline.cli import command
from mardini.user_errors import run_reporting_user_errors

if __name__ == "__main__":  # input and checkpoint problems: exit 2 with a message that says the fix; a --list job
    raise SystemExit(run_reporting_user_errors("sample.py", command))  # that skipped too many clips: 1
