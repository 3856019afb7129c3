"""Release a trained model: the sampling networks' weights as ``model.safetensors`` and what rebuilds them as
``config.json``, with nothing of the machine that trained them.

    python -m mardini.export outputs/tiny/05_joint_task/checkpoints/last.ckpt release/        # EMA weights
    python -m mardini.export last.ckpt release/ --raw --vae-path vae                          # raw weights

``MarDiniPipeline.from_pretrained(folder)`` (or ``from_checkpoint(folder)``, ``sample.py --ckpt folder``) samples
from the folder exactly as from the checkpoint. The folder holds no optimiser or loop state, no callback or data
settings, no absolute paths, user, host, command line or git remote: ``config.json`` holds the networks' configs,
the kind, size and step, the window, resolution, fps, planner resolution, schedule shift, anchor, the autoencoder's
spec (a diffusers VAE's ``path`` replaced by ``--vae-path``, default the folder's name, read relative to the
release folder) and fingerprint, and the package's version and git commit. A ``planning`` warm-up cannot be
exported (it cannot sample).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mardini.lit.checkpoint_io import current_umask
from mardini.lit.checkpoints import read_checkpoint
from mardini.pipeline.loading import Loaded, load_checkpoint
from mardini.pipeline.pretrained import CONFIG, FORMAT, FORMAT_VERSION, WEIGHTS


def released_autoencoder_spec(spec: dict[str, Any], vae_path: str | None) -> dict[str, Any]:
    """``spec`` with its ``init_args.path`` (a diffusers VAE's folder) replaced by ``vae_path``, default the
    folder's name: the machine's absolute path stays out of the release."""
    args = dict(spec.get("init_args") or {})
    if args.get("path") is None:
        return {**spec, "init_args": args}
    args["path"] = vae_path if vae_path is not None else Path(str(args["path"])).name
    return {**spec, "init_args": args}


def released_config(ld: Loaded, meta: dict[str, Any], vae_path: str | None = None) -> dict[str, Any]:
    """What :func:`~mardini.pipeline.pretrained.load_pretrained` needs to rebuild ``ld``'s networks and sample."""
    code = meta.get("code") or {}
    generator = {**dataclasses.asdict(ld.generator.cfg), "attention": ld.generator.attention_mode}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "kind": ld.kind, "size": ld.size, "weights": "ema" if ld.info["ema"] else "raw",
        "global_step": ld.info.get("global_step"),
        "generator": generator,
        "planner": None if ld.planner is None else dataclasses.asdict(ld.planner.cfg),
        "planner_resolution": ld.planner_resolution, "window": ld.window,
        "resolution": None if ld.resolution is None else list(ld.resolution), "fps": ld.fps,
        "schedule_shift": ld.schedule.shift, "anchor": ld.anchor.anchor, "anchor_scale": ld.anchor.scale,
        "autoencoder_spec": released_autoencoder_spec(meta["autoencoder_spec"], vae_path),
        "autoencoder_fingerprint": meta.get("autoencoder_fingerprint"),
        "code": {"mardini": code.get("mardini"), "git_commit": code.get("git_commit")},
    }


def network_tensors(ld: Loaded) -> dict[str, torch.Tensor]:
    """The networks' weights and buffers, ``generator.*`` and ``planner.*``, as separate contiguous tensors."""
    nets = {"generator": ld.generator, "planner": ld.planner}
    return {f"{name}.{k}": v.detach().contiguous().clone()
            for name, net in nets.items() if net is not None for k, v in net.state_dict().items()}


def export_pretrained(src: str | Path, out: str | Path, ema: bool = True, vae_path: str | None = None) -> dict:
    """Write ``out/model.safetensors`` and ``out/config.json`` from the checkpoint ``src``; returns the config."""
    out = Path(out)
    if (out / WEIGHTS).exists() or (out / CONFIG).exists():
        raise FileExistsError(f"{out} already holds a release ({WEIGHTS} or {CONFIG}); name an empty folder")
    ld = load_checkpoint(src, ema=ema)
    config = released_config(ld, read_checkpoint(src)["mardini"], vae_path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(network_tensors(ld), str(out / WEIGHTS), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS, 0o666 & ~current_umask())  # safetensors writes 0600: the mode config.json gets
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mardini.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a joint (or generation) checkpoint written by train.py")
    p.add_argument("out", help="the folder to write model.safetensors and config.json into (new or empty)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--vae-path", default=None, help="the path a diffusers VAE is recorded under (relative to the "
                                                     "release folder, or a path users will have); default its name")
    a = p.parse_args(argv)
    config = export_pretrained(a.checkpoint, a.out, ema=not a.raw, vae_path=a.vae_path)
    vae = config["autoencoder_spec"]["init_args"].get("path")
    print(f"{a.out}: {config['kind']} {config['size']} model, {config['weights']} weights at step "
          f"{config['global_step']} ({WEIGHTS}, {CONFIG})"
          + (f"; put the VAE folder at {a.out}/{vae} (or pass vae_path= to from_pretrained)" if vae else ""))
    return config


if __name__ == "__main__":
    main()
