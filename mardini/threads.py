"""``--threads`` of the CPU commands (``python -m mardini.demo``, ``python -m mardini.reproduce``): torch's intra-op
threads, by default ``OMP_NUM_THREADS`` when it is set, else the command's own default (up to 2). No torch import:
the demo reads it before torch loads OpenMP (:mod:`mardini.demo.wait_policy`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

DEFAULT_RULE = "default: OMP_NUM_THREADS when it is set, else up to 2"


def default_threads(fallback: int, environ: Mapping[str, str] = os.environ) -> int:
    """``OMP_NUM_THREADS`` when set (its first value, OpenMP's outermost level, as in ``4,2``), else ``fallback``."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return fallback
    first = value.split(",")[0].strip()
    if not first.isdecimal() or int(first) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r} is no number of threads: set it to a positive integer, unset "
                         "it, or give --threads N")
    return int(first)


def threads_in(argv: Sequence[str], fallback: int, environ: Mapping[str, str] = os.environ) -> int:
    """The threads a command line asks for, read without its parser (the demo's, before torch loads): ``--threads
    N``, else :func:`default_threads`; ``fallback`` where either is unreadable (the command's parser says why)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--threads", type=int, default=None)
    try:
        given = pre.parse_known_args(argv)[0].threads
        return given if given is not None and given >= 1 else default_threads(fallback, environ)
    except (argparse.ArgumentError, ValueError):
        return fallback


def add_threads_argument(parser: argparse.ArgumentParser, more: str = "") -> None:
    """Add ``--threads N`` (None until :func:`resolve_threads`), its help saying the default rule, then ``more``."""
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads ({DEFAULT_RULE})" + (f". {more}" if more else ""))


def resolve_threads(parser: argparse.ArgumentParser, args: argparse.Namespace, fallback: int,
                    environ: Mapping[str, str] = os.environ) -> None:
    """Set ``args.threads`` to :func:`default_threads` when ``--threads`` was not given; a bad value of either is the
    parser's one-line error."""
    if args.threads is None:
        try:
            args.threads = default_threads(fallback, environ)
        except ValueError as e:
            parser.error(str(e))
    if args.threads < 1:
        parser.error(f"--threads {args.threads} is impossible: give 1 or more")
