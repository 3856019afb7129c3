#!/usr/bin/env python
"""Train a MarDini stage with the Lightning CLI.

    python train.py fit --config configs/debug.yaml
    python train.py fit --config configs/tiny/01_generator_warmup.yaml
    python train.py fit --config configs/tiny/03_joint.yaml --ckpt_path outputs/.../last.ckpt   # resume
    python train.py fit --print_config --config configs/paper/mardini-s/02_joint_model.yaml
"""

from mardini.cli import main

if __name__ == "__main__":
    main()
