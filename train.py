#!/usr/bin/env python
"""Train a MarDini stage with the Lightning CLI.

    python train.py fit --config configs/debug.yaml
    python train.py fit --config configs/tiny/common.yaml --config configs/tiny/01_dm_warmup_4f.yaml
    python train.py fit --config configs/tiny/common.yaml --config configs/tiny/05_joint_task.yaml   # resumes
    python train.py fit --print_config --config configs/paper/mardini-s/05_joint_model.yaml
"""

from mardini.cli import main

if __name__ == "__main__":
    main()
