"""Which code trained a checkpoint: the saving process's commit, changes and library versions, and every commit the
run was trained with across its resumes.

``hparams.yaml`` held the code of one start of a fit (``run_settings.code_settings``: a CSV logger's the latest
start's, a TensorBoard logger's the first's, which it never rewrites), and a checkpoint file said nothing of it. Each checkpoint a fit saves now holds, in its ``mardini``
dict, ``code`` (:func:`~mardini.lit.run_settings.code_settings` of the process that saved it) and ``code_history``:
one entry per change of code, ``{"git_commit", "git_dirty", "mardini", "from_step"}`` (the global step that code
trained from; outside a git checkout also ``source``, the package sources' digest, which tells codes apart there),
carried forward on resume and shown under ``code.history`` in ``hparams.yaml`` (which a resumed fit rewrites:
``resumed_logs.rewrite_hparams``).
"""

from __future__ import annotations

from typing import Any

ENTRY_KEYS = ("git_commit", "git_dirty", "mardini")  # what tells two codes apart in the history
# and, outside a git checkout (no commit), the package sources' digest (run_info.source_digest)
SOURCE_KEY = "source"


def entry(code: dict[str, Any], step: int) -> dict[str, Any]:
    """The history entry of ``code`` (``code_settings``' keys) training from global step ``step``; ``source`` where
    ``code`` holds it (outside a git checkout)."""
    source = {SOURCE_KEY: code[SOURCE_KEY]} if code.get(SOURCE_KEY) else {}
    return {**{key: code.get(key) for key in ENTRY_KEYS}, **source, "from_step": int(step)}


def same_code(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``a`` and ``b`` (entries or ``code_settings``) name the same commit, changes flag, version and, outside
    a git checkout, sources digest."""
    return all(a.get(key) == b.get(key) for key in (*ENTRY_KEYS, SOURCE_KEY))


def earlier_history(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The code history of a checkpoint's ``meta`` (its ``mardini`` dict). One written before it was kept
    (2026-12-07) has none: the resume's history then starts at its step, the code before it unknown (as
    ``lr_schedule_history``'s)."""
    return [dict(e) for e in meta.get("code_history") or []]


def extended(history: list[dict[str, Any]], code: dict[str, Any], step: int) -> list[dict[str, Any]]:
    """``history`` with ``code`` appended from ``step`` where it is not the code of its last entry."""
    if history and same_code(history[-1], code):
        return [dict(e) for e in history]
    return [*map(dict, history), entry(code, step)]


def describe(code: dict[str, Any] | None) -> str:
    """``commit 0123abcd4567`` (``, with uncommitted changes``), or what stands for an unknown commit."""
    if code and not code.get("git_commit") and code.get(SOURCE_KEY):
        return f"the sources {code[SOURCE_KEY]} (no git commit: not a git checkout)"
    if not code or not code.get("git_commit"):
        return "an unrecorded commit (not a git checkout, or a checkpoint written before 2026-12-07)"
    return f"commit {code['git_commit'][:12]}" + (" with uncommitted changes" if code.get("git_dirty") else "")


def other_code_line(path: str, theirs: dict[str, Any] | None, ours: dict[str, Any]) -> str | None:
    """The info line for a resume of the checkpoint at ``path`` written by the code ``theirs`` (its ``code``; None:
    not recorded) under the code ``ours``; None where both are the same code."""
    if theirs is not None and same_code(theirs, ours):
        return None
    return (f"resuming {path}, written by {describe(theirs)}; this fit runs {describe(ours)} (each checkpoint's "
            "mardini.code_history and hparams.yaml's code.history list the commits the run was trained with)")
