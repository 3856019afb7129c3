"""Read a released model (``python -m mardini.export``): ``config.json`` and ``model.safetensors`` in one folder."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from mardini.autoencoders import build_autoencoder
from mardini.diffusion import CosineSchedule
from mardini.diffusion.anchor import FrameAnchor
from mardini.models.registry import build_generator, build_planner
from mardini.pipeline.loading import Loaded, load_network, warn_other_autoencoder

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, FORMAT_VERSION = "mardini-pretrained", 1


def is_pretrained(path: str | Path) -> bool:
    """True for a folder holding a release's ``config.json``."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """The release's ``config.json``, refused when it is not one this code reads (another format or version)."""
    if not is_pretrained(folder):
        raise FileNotFoundError(f"{folder} holds no {CONFIG}: export a checkpoint into it first "
                                "(python -m mardini.export CKPT FOLDER)")
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG} is not a {FORMAT} config of version {FORMAT_VERSION} (format "
                         f"{config.get('format')!r}, version {config.get('format_version')!r}); export it again "
                         "with this code")
    return config


def check_weights(config: dict[str, Any], folder: Path, ema: bool | None) -> None:
    """Refuse EMA weights asked of a release of raw ones, or the other way round, naming the export that fits."""
    if ema is None or ema == (config["weights"] == "ema"):
        return
    asked, flag = ("EMA", "(no --raw)") if ema else ("raw", "with --raw")
    raise ValueError(f"{folder} holds the {config['weights']} weights, not the {asked} ones asked for: load it "
                     f"{'with' if ema else 'without'} --no-ema (ema={not ema}), or export the checkpoint {flag}")


def autoencoder_spec(config: dict[str, Any], folder: Path, vae_path: str | Path | None) -> dict[str, Any]:
    """The recorded autoencoder spec with a VAE's ``path`` resolved: ``vae_path`` when given, else the recorded one
    inside the release folder when it is there, else the recorded one as it stands (a path from the working
    folder)."""
    spec = config["autoencoder_spec"]
    args = dict(spec.get("init_args") or {})
    if args.get("path") is None:
        return spec
    inside = folder / str(args["path"])
    args["path"] = str(vae_path if vae_path is not None else inside if inside.exists() else args["path"])
    return {**spec, "init_args": args}


def load_pretrained(folder: str | Path, vae_path: str | Path | None = None,
                    allow_autoencoders: Collection[str] = (), ema: bool | None = None) -> Loaded:
    """Rebuild a released model's networks (eval mode, CPU, float32), autoencoder, schedule and window; ``ema``
    (None: either) refuses a release of the other weights."""
    folder = Path(folder)
    config = read_config(folder)
    check_weights(config, folder, ema)
    spec = autoencoder_spec(config, folder, vae_path)
    autoencoder = build_autoencoder(spec, allow_autoencoders).eval()
    warn_other_autoencoder({**config, "autoencoder_spec": spec}, autoencoder, folder)
    state = load_file(str(folder / WEIGHTS))
    generator = build_generator(config["size"], **config["generator"])
    load_network(generator, state, "generator.", folder / WEIGHTS, ema=False)
    planner = None
    if config["planner"] is not None:
        planner = build_planner(config["size"], **config["planner"])
        planner.drop_head()  # the release holds no training-only head
        load_network(planner, state, "planner.", folder / WEIGHTS, ema=False)
    anchor = FrameAnchor(config["anchor"], config["anchor_scale"])
    res = config["resolution"]
    return Loaded(
        kind=config["kind"], size=config["size"],
        generator=generator.eval().requires_grad_(False),
        planner=None if planner is None else planner.eval().requires_grad_(False),
        autoencoder=autoencoder, schedule=CosineSchedule(shift=float(config["schedule_shift"])), anchor=anchor,
        planner_resolution=int(config["planner_resolution"]), window=int(config["window"]),
        resolution=None if res is None else (int(res[0]), int(res[1])),
        fps=None if config["fps"] is None else float(config["fps"]),
        info={"checkpoint": str(folder), "kind": config["kind"], "size": config["size"],
              "ema": config["weights"] == "ema", "global_step": config["global_step"],
              "attention": generator.attention_mode, "anchor": anchor.anchor},
    )
