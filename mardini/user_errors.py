"""One way for the command-line entry points to report a user's mistake: the message, where it was raised, no
traceback. ``MARDINI_TRACEBACK=1`` re-raises instead, for when the message points at a bug rather than at the input.
"""

from __future__ import annotations

import os
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
    path = Path(last.filename)
    try:
        path = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return f"{path}:{last.lineno} in {last.name}"


def run_reporting_user_errors(prog: str, fn: Callable[[], int | None], code: int = 2,
                              unwrap: Callable[[BaseException], BaseException] | None = None) -> int:
    """``fn()``'s exit code (0 for None); a user error prints ``prog: error: message`` and where it was raised to
    stderr and returns ``code``. With ``MARDINI_TRACEBACK=1`` in the environment it propagates with its traceback.

    ``unwrap``: the error to report in place of the one caught (e.g. the library's error under a framework's
    wrapping of it)."""
    try:
        result = fn()
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        err = unwrap(err) if unwrap is not None else err
        print(f"{prog}: error: {err}", file=sys.stderr)
        print(f"  (raised at {where_raised(err)}; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return code
    return 0 if result is None or not isinstance(result, int) else result
