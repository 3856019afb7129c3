"""What a report says about its run: the command line that reproduces it and the machine it ran on."""

from __future__ import annotations

import platform
import shlex
import sys

import torch

from mardini import cpu_kernels


def command_line(prog: list[str], argv: list[str] | None) -> str:
    """``prog`` and ``argv`` (this process's own arguments when None), quoted for a shell."""
    return shlex.join([*prog, *(sys.argv[1:] if argv is None else argv)])


def machine_line() -> str:
    """Architecture, torch threads, torch version and the CPU's bf16 matmul kernels (which decide the last digits
    of bf16 figures, :mod:`mardini.cpu_kernels`)."""
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {threads} threads, torch {torch.__version__}, {cpu_kernels.describe()}"
