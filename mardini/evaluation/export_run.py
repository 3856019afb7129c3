"""``evaluate.py --export-inputs DIR``: one read of the N clips writing each task's given frames and ``clips.json``
for an external method (see ``external.py``), scoring nothing."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mardini import run_info
from mardini.evaluation.data import iter_batches
from mardini.evaluation.external import ClipNames, InputExport, shard_of_keys
from mardini.evaluation.protocol import EvalProtocol
from mardini.evaluation.run_setup import command_words, data_path
from mardini.evaluation.task_run import progress_line


def export_inputs(args: argparse.Namespace, kind: str, files: list[str], n: int, skipped: dict[str, str],
                  argv: list[str] | None) -> list[Path]:
    """``--export-inputs DIR``: each task's given frames of the N clips and its ``clips.json`` (one read of the
    clips for every task); returns the clips.json paths."""
    settings = {"resolution": args.resolution, "fps_asked": args.fps, "num_clips": n, "data": args.data,
                "data_path": data_path(args.data), "source_kind": kind, "skipped_videos": skipped,
                "command": run_info.command_line(command_words(args.prog), argv)}
    names = ClipNames(kind, args.data)
    sources = None if kind == "videos" else shard_of_keys(files)
    masks = {task: EvalProtocol(task=task, frames=args.frames, resolution=args.resolution, num_clips=n,
                                metrics=("midf",)).mask(1)[0] for task in args.tasks}  # (T,) each: the scored masks
    exports = [InputExport(args.export_inputs, task, masks[task], settings, sources) for task in args.tasks]
    seen, began = 0, time.perf_counter()
    for batch in iter_batches(kind, files, args.frames, args.fps, args.resolution, n, args.batch_size):
        clip_names = [names(k) for k in batch["key"]]  # (once per clip: shared by the tasks)
        for export in exports:
            export.add(batch, clip_names)
        seen += len(batch["key"])
        print(progress_line(args.prog, "export", seen, n, time.perf_counter() - began), file=sys.stderr, flush=True)
    if seen < n:  # the data changed since choose_num_clips read it
        raise ValueError(f"the data gave {seen} usable clips, {n} before; run again once it is written")
    return [export.finish() for export in exports]
