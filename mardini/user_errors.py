"""One way for the command-line entry points to report a user's mistake: the message, where it was raised, no
traceback. ``MARDINI_TRACEBACK=1`` re-raises instead, for when the message points at a bug rather than at the input.
"""

from __future__ import annotations

import codecs
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

# What the library raises for bad input: missing files (data, checkpoints, weights) and impossible settings. Each
# message names the problem and the fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError)
TRACEBACK_ENV = "MARDINI_TRACEBACK"


def where_raised(err: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``err`` (the path relative to the cwd if inside)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{shown_path(last.filename)}:{last.lineno} in {last.name}"


def shown_path(filename: str) -> Path:
    """``filename`` relative to the cwd if inside it, else as it is."""
    path = Path(filename)
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


FRAME = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+)$')


def worker_user_error(err: BaseException) -> tuple[str, str] | None:
    """``(message, where)`` of a user error that a spawned worker raised (``ddp_spawn``): PyTorch hands it to the
    main process as a ``ProcessRaisedException`` holding only the worker's traceback text, so the type, message and
    innermost frame are read back from that text. None for anything else."""
    if type(err).__name__ != "ProcessRaisedException":
        return None
    found = _error_in_traceback(str(getattr(err, "msg", err)))
    if found is None:
        return None
    message, frame = found
    return message, f"{frame}, process {getattr(err, 'error_index', '?')}"


LOADER_WORKER = re.compile(r"^Caught \w+ in (?P<worker>DataLoader worker process \d+)\.\nOriginal Traceback")


def loader_worker_error(err: BaseException) -> tuple[str, str] | None:
    """``(message, where)`` of a user error raised in a DataLoader worker process: PyTorch re-raises it in the main
    process with its type, but with ``Caught ValueError in DataLoader worker process 0.`` and the worker's traceback
    as its message, so the message and innermost frame are read back from that text. None for anything else."""
    head = LOADER_WORKER.match(str(err))
    found = _error_in_traceback(str(err)) if head else None
    if found is None:
        return None
    message, frame = found
    return message, f"{frame}, {head['worker']}"


def _error_in_traceback(text: str) -> tuple[str, str] | None:
    """``(message, innermost frame)`` of the user error whose formatted traceback ends ``text``; None when the error
    that ends it is of another type."""
    lines = text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if FRAME.match(line)]
    if not frames:
        return None
    # the exception line is the first unindented one after the last frame (its source line and Python 3.11's ^^^
    # markers are indented); a later line of the message that looks like one is not it
    names = "|".join(e.__name__ for e in USER_ERRORS)
    for i in range(frames[-1] + 1, len(lines)):
        if lines[i][:1].isspace() or not lines[i]:
            continue
        head = re.match(rf"^(?:[\w.]+\.)?(?:{names}): (.*)$", lines[i])
        if not head:
            return None
        message = "\n".join([head.group(1), *lines[i + 1:]])
        frame = FRAME.match(lines[frames[-1]])
        return message, f"{shown_path(frame['file'])}:{frame['line']} in {frame['name']}"
    return None


def run_reporting_user_errors(prog: str, fn: Callable[[], int | None], code: int = 2,
                              unwrap: Callable[[BaseException], BaseException] | None = None,
                              errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """``fn()``'s exit code (0 for None); a user error prints ``prog: error: message`` and where it was raised to
    stderr and returns ``code``. With ``MARDINI_TRACEBACK=1`` in the environment it propagates with its traceback.

    ``unwrap``: the error to report in place of the one caught (e.g. the library's error under a framework's
    wrapping of it). ``errors``: the error types reported so (default :data:`USER_ERRORS`; ``train.py`` adds
    Lightning's ``MisconfigurationException``)."""
    escape_what_stdout_cannot_encode()
    try:
        result = fn()
    except errors as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        err = unwrap(err) if unwrap is not None else err
        message, where = loader_worker_error(err) or (str(err), where_raised(err))
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"  (raised at {where}; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return code
    except Exception as err:
        found = worker_user_error(err)
        if found is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message, where = found
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"  (raised at {where}; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return code
    return 0 if result is None or not isinstance(result, int) else result


def escape_what_stdout_cannot_encode() -> None:
    """Make ``sys.stdout`` print the characters its encoding lacks as ``\\u2191``-style escapes instead of raising:
    the reports printed hold arrows and dashes, which a Windows code page (cp1252: a console redirected to a file or
    a pipe) or an ASCII locale cannot encode (a UnicodeEncodeError after the work was done, before). A UTF-8 stdout
    is left as it is. Files are written in UTF-8 whatever the locale."""
    encoding = getattr(sys.stdout, "encoding", None)
    if encoding and hasattr(sys.stdout, "reconfigure") and codecs.lookup(encoding).name != "utf-8":
        sys.stdout.reconfigure(errors="backslashreplace")


def run_module(module: str, main: Callable[..., int | None],
               unwrap: Callable[[BaseException], BaseException] | None = None,
               errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """A module's ``__main__``: ``main(prog=...)`` under :func:`run_reporting_user_errors`, ``prog`` being the
    ``python -m`` command that runs ``module``, so that its usage, errors and warnings name the command run (the
    scripts pass their own name, e.g. ``sample.py``)."""
    prog = f"python -m {module}"
    return run_reporting_user_errors(prog, lambda: main(prog=prog), unwrap=unwrap, errors=errors)
