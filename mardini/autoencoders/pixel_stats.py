"""Pixel statistics of a shard set: the space-to-depth ``shift`` and ``scale`` for zero-mean, unit-variance latents.

    python -m mardini.autoencoders.pixel_stats --shards data/shards/synthetic/train --clips 512
    python -m mardini.autoencoders.pixel_stats --shards data/shards/synthetic/train --anchor-keep-ratio 0.15 1.0

The cosine schedule assumes unit-variance data. Pixels in [-1, 1] of the synthetic set have mean -0.40 and standard
deviation 0.39 (the command above, 512 training clips), so without normalisation the content is buried in noise far
earlier than the schedule intends (signal-to-noise ratio 0.15 of the nominal at every t) and the generator gets little
training at the low-noise levels that make objects crisp. ``SpaceToDepthAutoencoder(shift=mean, scale=1/std)`` fixes that; the tiny configs use it.

Another autoencoder's latents are measured the same way, encoded (raw, before its own normalisation) from the same
clips; the command prints the ``shift`` (their mean) and ``scale`` (1 / their std) to set on it:

    python -m mardini.autoencoders.pixel_stats --shards data/shards/videos/train --resolution 256 \
        --diffusers weights/vae-16ch
    python -m mardini.autoencoders.pixel_stats --shards ... --autoencoder CLASS_PATH --autoencoder-kwargs '{...}'

``--anchor-keep-ratio LO HI`` also prints ``anchor_scale`` for ``model.anchor: nearest`` (``mardini.diffusion.anchor``):
the standard deviation of the normalised latents' change from the nearest given frame, over the generated frames of
random masks that keep a fraction in [LO, HI] of the frames.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch

PIXELS = "mardini.autoencoders.pixel.SpaceToDepthAutoencoder"
DIFFUSERS = "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder"


def pixel_stats(shards: str, clips: int = 512, frames: int = 9, fps: float | None = 8.0,
                resolution: int = 32, anchor_keep_ratio: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean and standard deviation of the pixels (in [-1, 1]) of the first ``clips`` clips of ``shards``.

    Clips are read as training sees them (``frames`` frames at ``fps``, resized to ``resolution``), in the
    deterministic order of the validation loader. Returns ``clips, mean, std, shift (= mean), scale (= 1 / std)``,
    and with ``anchor_keep_ratio`` also ``anchor_scale`` (:func:`anchor_residual_std` of the same clips).
    """
    from mardini.data.datamodule import first_clips

    video = first_clips(shards, clips, frames, resolution, fps).double()  # (N, T, 3, H, W) in [-1, 1]
    return moments(video, f"the pixels of {shards!r}", anchor_keep_ratio)


def moments(x: torch.Tensor, what: str, anchor_keep_ratio: tuple[float, float] | None = None) -> dict[str, float]:
    """``clips, mean, std, shift (= mean), scale (= 1 / std)`` of ``x (N, T, C, H, W)`` over every element, and
    with ``anchor_keep_ratio`` ``anchor_scale``; ``what`` names x in the error for constant values."""
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    if std == 0:
        raise ValueError(f"{what} are constant ({mean:.4f}): no scale normalises them")
    stats = {"clips": x.shape[0], "mean": mean, "std": std, "shift": mean, "scale": 1.0 / std}
    if anchor_keep_ratio is not None:
        stats["anchor_scale"] = anchor_residual_std(x, anchor_keep_ratio)
    return stats


@torch.no_grad()
def latent_stats(shards: str, autoencoder, clips: int = 512, frames: int = 9, fps: float | None = 8.0,
                 resolution: int = 32, anchor_keep_ratio: tuple[float, float] | None = None, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> dict[str, float]:
    """:func:`pixel_stats` of a :class:`~mardini.autoencoders.FrameAutoencoder`'s raw latents (before its own
    ``shift`` / ``scale``): ``clips, mean, std, shift (= mean), scale (= 1 / std)`` over every latent element of
    the same clips, and with ``anchor_keep_ratio`` ``anchor_scale`` of those latents."""
    from mardini.data.datamodule import first_clips

    video = first_clips(shards, clips, frames, resolution, fps)  # (N, T, 3, H, W) in [-1, 1]
    ae = autoencoder.to(device).eval()
    raw = torch.cat([ae.encode(v.to(device)).double().cpu() / ae.scale + ae.shift  # (b, T, C, h, w) raw latents
                     for v in video.split(batch_size)])  # (N, T, C, h, w)
    return moments(raw, f"the latents of {shards!r}", anchor_keep_ratio)


def config_line(class_path: str, init_args: dict, shift: float, scale: float, digits: str = ".4g") -> str:
    """The ``model.init_args.autoencoder`` YAML line: ``class_path`` with ``init_args`` (``chunk_size``, a memory
    knob, aside) and the measured ``shift`` / ``scale``."""
    def value(v):
        return json.dumps(v) if isinstance(v, str) or v is None or isinstance(v, bool) else str(v)

    args = {k: v for k, v in init_args.items() if k not in ("chunk_size", "shift", "scale")}
    fields = [f"{k}: {value(v)}" for k, v in args.items()] + [f"shift: {shift:{digits}}", f"scale: {scale:{digits}}"]
    return f"model.init_args.autoencoder: {{class_path: {class_path}, init_args: {{{', '.join(fields)}}}}}"


def anchor_residual_std(video: torch.Tensor, keep_ratio: tuple[float, float], seed: int = 0) -> float:
    """``anchor_scale``: the standard deviation of the normalised pixels' change from the nearest given frame.

    ``video (N, T, 3, H, W)`` (or raw latents ``(N, T, C, h, w)``); over the generated frames of random masks (the
    ``random`` template, kept fraction uniform in ``keep_ratio``); normalised = divided by the pixels' (latents')
    standard deviation, as the normalised latents are (their shift cancels).
    """
    from mardini.diffusion.anchor import anchor_frames
    from mardini.masking import MaskSampler

    mask, _ = MaskSampler(keep_ratio).sample(video.shape[0], video.shape[1], torch.Generator().manual_seed(seed))
    change = (video - anchor_frames(video, mask)) / video.std(unbiased=False)  # (N, T, 3, H, W)
    return float(change[mask].std(unbiased=False))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="shard pattern, e.g. data/shards/synthetic/train")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--anchor-keep-ratio", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="also measure anchor_scale (model.anchor: nearest) under masks keeping LO-HI of the frames")
    ae = parser.add_argument_group("autoencoder (default: the pixels, for SpaceToDepthAutoencoder)")
    ae.add_argument("--autoencoder", default=None, help="class path of the FrameAutoencoder whose latents to measure, "
                    "e.g. mardini.autoencoders.diffusers_kl.DiffusersAutoencoder")
    ae.add_argument("--autoencoder-kwargs", default="{}", help="JSON dict of its constructor arguments "
                    "(for SpaceToDepthAutoencoder e.g. '{\"downsample\": 4}')")
    ae.add_argument("--diffusers", metavar="PATH", default=None,
                    help="a local diffusers AutoencoderKL folder: --autoencoder DiffusersAutoencoder with this path")
    ae.add_argument("--batch-size", type=int, default=8, help="clips per encode call")
    ae.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    keep = tuple(args.anchor_keep_ratio) if args.anchor_keep_ratio else None
    try:
        kwargs = json.loads(args.autoencoder_kwargs)
    except json.JSONDecodeError as err:
        parser.error(f"--autoencoder-kwargs is not JSON ({err}): give a dict, e.g. '{{\"path\": \"weights/vae\"}}'")
    if not isinstance(kwargs, dict):
        parser.error(f"--autoencoder-kwargs must be a JSON dict, got {args.autoencoder_kwargs!r}")
    if args.diffusers is not None:
        if args.autoencoder is not None:
            parser.error("give --diffusers PATH or --autoencoder CLASS_PATH, not both")
        args.autoencoder, kwargs = DIFFUSERS, {**kwargs, "path": args.diffusers}
    class_path = args.autoencoder or PIXELS
    from mardini.data.latent_cache import check_sizes, load_autoencoder

    autoencoder = load_autoencoder(class_path, kwargs, "--autoencoder-kwargs")  # one error for a wrong argument
    check_sizes(args.resolution, args.resolution, autoencoder.downsample, ("--resolution", "--resolution"))
    if class_path.rsplit(".", 1)[-1] == "SpaceToDepthAutoencoder":  # its latents are the pixels, rearranged
        init_args = autoencoder.spec()["init_args"]  # keeps the downsample
        stats = pixel_stats(args.shards, args.clips, args.frames, args.fps, args.resolution, keep)
        line = config_line(PIXELS, init_args, stats["shift"], stats["scale"], ".2f")
    else:
        stats = latent_stats(args.shards, autoencoder, args.clips, args.frames, args.fps, args.resolution, keep,
                             args.batch_size, args.device)
        try:
            init_args = autoencoder.spec()["init_args"]
        except NotImplementedError:
            init_args = kwargs
        line = config_line(class_path, init_args, stats["shift"], stats["scale"])
        if not {"shift", "scale"} <= set(inspect.signature(type(autoencoder)).parameters):
            line = (f"# {class_path} takes no shift / scale: normalise its latents as z = (raw - shift) * scale "
                    f"with shift {stats['shift']:.4g}, scale {stats['scale']:.4g}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    print(line)
    if "anchor_scale" in stats:
        print(f"model.init_args.anchor: nearest\nmodel.init_args.anchor_scale: {stats['anchor_scale']:.2f}")
    return stats


def cli(argv: list[str] | None = None) -> int:
    """The exit code of ``python -m mardini.autoencoders.pixel_stats``: 0, or 2 on a user error (missing shards, a
    folder of videos instead of shards, constant pixels), printed without a traceback."""
    from mardini.user_errors import run_reporting_user_errors

    return run_reporting_user_errors("pixel_stats", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
