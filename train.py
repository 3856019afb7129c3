#!/usr/bin/env python
"""Train a MarDini stage with the Lightning CLI.

    python train.py fit --config configs/debug.yaml
    python train.py fit --config configs/tiny/common.yaml --config configs/tiny/01_dm_warmup_4f.yaml
    python train.py fit --config configs/tiny/common.yaml --config configs/tiny/05_joint_task.yaml   # resumes
    python train.py fit --print_config --config configs/paper/mardini-s/05_joint_model.yaml

A setup mistake (a missing file, an impossible setting, a trainer setting Lightning refuses) exits 2 with the message and where it was raised;
MARDINI_TRACEBACK=1 shows the traceback.
"""

import sys

from mardini.cli import CLI_ERRORS, library_error, main
from mardini.user_errors import run_reporting_user_errors

if __name__ == "__main__":
    sys.exit(run_reporting_user_errors("train.py", main, unwrap=library_error, errors=CLI_ERRORS))
