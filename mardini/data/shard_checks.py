"""Checks on shards at ``setup``, from their tar headers and first ``json`` alone (no decode): empty shards left out,
pixel and latent shards checked against what the stage needs, samples counted, the writers' ``manifest.json`` read."""

from __future__ import annotations

import json
import math
import os
import tarfile

from mardini.data.decode import BadSample, decode_json, frame_stride
from mardini.data.setup_warnings import warn_once
from mardini.data.stream import name_shards


def shards_manifest(shards: str) -> dict | None:
    """The ``settings`` of ``<shards>/manifest.json`` when ``shards`` is a local folder holding one (the shard writers
    record their settings there: :mod:`mardini.data.synthetic_shards`, :mod:`mardini.data.video_shards`,
    :mod:`mardini.data.latent_cache`), else None (a pattern, a list, no manifest, an unreadable one)."""
    manifest = os.path.join(shards, "manifest.json")
    if "::" in shards or not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            settings = json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


PROBE_SHARDS = 8  # shards whose first clip the setup check reads


def without_empty_shards(shards: list[str], option: str) -> list[str]:
    """``shards`` less the local ones that hold no tar member (:func:`holds_no_member`), with a warning naming them;
    a ValueError when none is left (the training stream would reopen empty shards for ever). Reads one tar header
    per shard, not the shards."""
    empty = [shard for shard in shards if holds_no_member(shard)]
    if len(empty) == len(shards):
        no_val = f", or set {option}: null to train without validation" if option == "data.val_shards" else ""
        are, them = ("the shard is", "it") if len(shards) == 1 else (f"all {len(shards)} shards are", "them")
        raise ValueError(f"{option}: {are} empty (no tar member: {name_shards(shards)}); rebuild {them} "
                         f"(data/README.md) or give {option} shards that hold clips{no_val}")
    if empty:
        warn_once(f"{option}: {len(empty)} of {len(shards)} shards are empty (no tar member: {name_shards(empty)}) "
                   f"and are left out; rebuild them (data/README.md) or leave them out of {option}")
    left_out = set(empty)
    return [shard for shard in shards if shard not in left_out]


def holds_no_member(shard: str) -> bool:
    """True for a local file that is empty or a tar archive without a member (its first header is the end of the
    archive); False for anything else, remote or unreadable too (the loader counts those as it reads them)."""
    try:
        if not os.path.isfile(shard):
            return False
        if os.path.getsize(shard) == 0:
            return True
        # the first header only; a .tar read as plain (a third of the time of trying each compression first)
        with tarfile.open(shard, "r:" if shard.endswith(".tar") else "r:*") as tar:
            return tar.next() is None
    except (OSError, tarfile.TarError):
        return False


def check_pixel_shards(shards: list[str], frames: int, fps: float | None, resolution: int | tuple[int, int],
                       option: str = "data.train_shards") -> None:
    """Check the first clip of the first ``PROBE_SHARDS`` pixel shards against what the stage needs, from their
    ``json`` alone (no decode), until one fits.

    Raises a ValueError when every probed clip holds fewer source frames than ``frames`` at ``fps`` span (clips
    of one length would all be skipped as too short, and training would stop after a thousand of them); warns
    (once) when only some of them are too short (shards of mixed rates or lengths: the loader skips and counts
    those), and when the first clip that fits is smaller than ``resolution`` (it is upscaled) or its rate is more
    than 10 % below ``fps`` (the stage trains at the clip's own rate: the stride cannot go below 1). The loader
    itself never skips a clip for its size or rate. A remote or unreadable shard, or a first sample whose json is
    bad, counts as fitting: the loader skips and counts those.
    """
    too_short = []
    for shard in shards[:PROBE_SHARDS]:
        problem = _check_first_clip(shard, frames, fps, resolution, option)
        if problem is None:
            if too_short:
                warn_once(f"{too_short[0]} (the first clips of {len(too_short)} of the probed shards are too "
                           "short; others fit, so the loader skips and counts the short ones)")
            return
        too_short.append(problem)
    if too_short:
        more = f" (so is the first clip of every shard probed, {len(too_short)})" if len(too_short) > 1 else ""
        raise ValueError(too_short[0].replace(": every clip would", f"{more}: every clip would", 1))


def _check_first_clip(shard: str, frames: int, fps: float | None, resolution: int | tuple[int, int],
                      option: str) -> str | None:
    """The too-short message for the first clip of ``shard`` (None when it fits; the size and rate warnings)."""
    if not os.path.isfile(shard):
        return None
    try:
        meta = decode_json(first_json_bytes(shard))
    except (OSError, tarfile.TarError, ValueError, UnicodeDecodeError, BadSample):
        return None
    src_fps, n_src = float(meta["fps"]), int(meta["frames"])
    stride = frame_stride(src_fps, fps)
    span = (frames - 1) * stride + 1
    at = "its native rate" if fps is None else f"{fps:g} fps"
    clip = f"the first clip of {shard} holds {n_src} frames at {src_fps:g} fps"
    if span > n_src:
        fits = (n_src - 1) // stride + 1
        fixes = [f"set data.frames <= {fits} (and the model's frames with it)"]
        if stride > 1 and frames <= n_src:
            fixes.append(f"a data.fps that gives a smaller stride (data.fps: {src_fps:g} or null takes every frame)")
        fixes.append(f"rebuild {option} with longer clips (data/videos_to_shards.py --clip-frames {span} or more; "
                     f"synthetic shards: data/make_synthetic.py --frames {span})")
        return (
            f"{option}: the stage needs {frames} frames at {at}, a span of {span} source frames (stride {stride} "
            f"from the clip's {src_fps:g} fps), but {clip}: every clip would be skipped as too short. Fix: "
            + "; or ".join(fixes)
        )
    if fps is not None and src_fps < 0.9 * fps:  # integer strides alone can land up to 10 % below: no warning
        warn_once(
            f"{option}: {clip}, slower than data.fps={fps:g}: the stage trains at {src_fps:g} fps (the frame "
            f"stride cannot go below 1; each batch's fps says so). Rebuild the shards from the source videos with "
            f"data/videos_to_shards.py --max-fps {fps:g} or higher (or no --max-fps), or set data.fps <= {src_fps:g}"
        )
    height, width = meta.get("height"), meta.get("width")
    if isinstance(height, (int, float)) and isinstance(width, (int, float)) and height > 0 and width > 0:
        want_h, want_w = (resolution, resolution) if isinstance(resolution, int) else resolution
        factor = max(want_h / height, want_w / width)
        if factor > 1:
            short = math.ceil(min(height, width) * factor)
            warn_once(
                f"{option}: the first clip of {shard} is {int(width)}x{int(height)} (WxH), smaller than "
                f"data.resolution={want_h}x{want_w} (HxW): clips are upscaled {factor:.2g}x. Rebuild the shards with "
                f"data/videos_to_shards.py --short-side {short} or more (one shard set per stage "
                f"resolution, or one at the largest), or lower data.resolution"
            )
    return None


def count_samples(shard: str) -> int:
    """Samples (``json`` members) in a shard, reading the tar headers only, up to where it stops reading as a tar."""
    n = 0
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                n += member.name.endswith(".json")
    except (OSError, tarfile.TarError):
        pass
    return n


def first_json(shard: str) -> dict:
    """The ``json`` member of the first sample of a shard."""
    return json.loads(first_json_bytes(shard))


def first_json_bytes(shard: str) -> bytes:
    """The raw ``json`` member of the first sample of a shard."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                return tar.extractfile(member).read()
    raise ValueError(f"shard {shard} has no json member")


def check_latent_shards(shard: str, frames: int, fps: float | None, resolution: int | tuple[int, int]) -> None:
    """Raise if cached latents were made in a format this code does not read, for another resolution, frame rate,
    or too few frames."""
    from mardini.data.latent_cache import check_cache_format

    meta = first_json(shard)
    cache = meta.get("latent_cache")
    if cache is None:
        raise ValueError(f"{shard} is not a latent shard (no 'latent_cache' in its json); set data.latents=false")
    check_cache_format(cache, f"the latent cache {shard}")
    want = [resolution, resolution] if isinstance(resolution, int) else list(resolution)
    if list(cache["resolution"]) != want:
        raise ValueError(f"latents in {shard} were cached at {cache['resolution']}, data.resolution asks {want}")
    cached_fps = cache.get("fps")  # what the cache was asked for (None: native); the clips' own rate can differ
    if (fps is None) != (cached_fps is None) or (fps is not None and abs(float(cached_fps) - fps) > 1e-6):
        def yaml(v):
            return "null" if v is None else v

        raise ValueError(
            f"latents in {shard} were cached with fps {yaml(cached_fps)} (null: native), data.fps asks {yaml(fps)}; "
            f"re-cache with {'--fps ' + str(fps) if fps is not None else 'no --fps'} into a new folder, or set "
            f"data.fps: {yaml(cached_fps)}"
        )
    if cache["frames"] < frames:
        raise ValueError(f"latents in {shard} hold {cache['frames']} frames, data.frames asks {frames}")
