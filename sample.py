#!/usr/bin/env python
"""Sample videos from a trained MarDini checkpoint: generate (any mask), interpolate, image_to_video, expand,
long_video, slow_motion. ``python sample.py --help``; the logic lives in ``mardini/pipeline/cli.py``.
"""

import sys

from mardini.pipeline.cli import main

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # input and checkpoint problems: the message says the fix
        sys.exit(f"sample.py: error: {e}")
