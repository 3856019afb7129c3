"""What an ``evaluate.py`` run is set up with before any clip is scored, and what its report records of it: the
metric weights, the samplers (baselines, the model, ``--generated`` methods), the device, the output folder, the
command and the checkpoint file."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mardini import devices, run_info
from mardini.devices import resolve_device
from mardini.evaluation.external import GeneratedVideos
from mardini.evaluation.protocol import DEFAULT_METRICS, EvalProtocol, resolve_metric_weights
from mardini.evaluation.samplers import BASELINES, Sampler
from mardini.weights import sha256_file


def metric_weights(args: argparse.Namespace) -> dict[str, dict[str, str] | None]:
    """The weight files of the metrics the run scores, found and verified before any data is read (a missing one
    stops it at once under ``--missing-weights error``); see :func:`resolve_metric_weights`. Each task's protocol
    settings are checked first, so an impossible one is named before a missing file."""
    for task in args.tasks:
        EvalProtocol(task=task, frames=args.frames, resolution=args.resolution, num_clips=args.num_clips or 2,
                     metrics=None if args.metrics is None else tuple(args.metrics), fvd_pad_short=args.fvd_pad_short,
                     missing_weights=args.missing_weights, steps=args.steps, guidance_scale=args.guidance, eta=args.eta)
    metrics = args.metrics or sorted({m for task in args.tasks for m in DEFAULT_METRICS[task]})
    return resolve_metric_weights(metrics, args.missing_weights, args.i3d_weights, args.inception_weights,
                                  args.lpips_weights, prog=args.prog)


def build_samplers(args: argparse.Namespace) -> dict[str, Sampler]:
    out: dict[str, Sampler] = {m: BASELINES[m]() for m in args.methods if m in BASELINES}
    if "mardini" in args.methods:
        from mardini.pipeline import MarDiniPipeline

        pipe = MarDiniPipeline.from_checkpoint(args.checkpoint, ema=not args.no_ema, device=args.device,
                                               dtype=args.dtype, window=args.window,
                                               allow_autoencoders=args.allow_autoencoder)
        if args.frames > pipe.window:  # the protocol scores one window per clip: no window-by-window sampling here
            raise ValueError(f"--frames {args.frames} is more than the {pipe.window}-frame window of {args.checkpoint} "
                             f"(its trained window; where the checkpoint records none, its size's guess, which "
                             f"--window T replaces); evaluate it with --frames {pipe.window}")
        out["mardini"] = pipe  # wrapped per task (guidance differs)
    for name, folder in args.generated.items():
        out[name] = GeneratedVideos(name, folder, args.frames, args.resolution)
    return out


def data_path(data: str) -> str:
    """What ``--data`` names, as an absolute path ('synthetic' stays itself)."""
    return data if data == "synthetic" else str(Path(data).resolve())


def default_out(data: str, path: str, prog: str = "evaluate.py") -> Path:
    """``outputs/eval/<data name>``; when that folder holds the report of other data of the same name (two splits
    called ``val``), ``outputs/eval/<data name>-<hash of the path>`` instead of overwriting it."""
    name = Path(data.rstrip("/")).name
    out = Path("outputs/eval") / name
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    theirs = earlier.get("data_path") or data_path(str(earlier.get("data", "")))
    if theirs == path:
        return out
    other = out.with_name(f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")
    print(f"{prog}: note: {out} holds the report of {theirs}; writing this one to {other} (--out picks a folder)",
          file=sys.stderr)
    return other


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``: ``auto`` (or none) is CUDA where there is a GPU, else the CPU; checked as the model's device is
    (:func:`~mardini.devices.resolve_device`)."""
    return resolve_device(args.device)


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA (NVIDIA or AMD) or Intel GPU, else the machine line (architecture, threads, CPU
    kernels)."""
    return devices.device_name(device) or run_info.machine_line()


def checkpoint_file(path: str | None, pipe: Any) -> dict[str, Any] | None:
    """``{path, sha256, global_step}`` of the checkpoint the model was loaded from (None without the model): a
    path alone does not say which weights scored (``last.ckpt`` is overwritten as training goes on). The sha256 is
    read right after loading, in one streaming pass; the step is what the loader read (no second load)."""
    if not path or pipe is None:
        return None
    step = getattr(pipe, "info", {}).get("global_step")
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path),
            "global_step": None if step is None else int(step)}


def command_words(prog: str) -> list[str]:
    """The words that ran ``prog``, for the recorded command: ``evaluate.py`` -> ``python evaluate.py``."""
    return prog.split() if prog.startswith("python ") else ["python", prog]
