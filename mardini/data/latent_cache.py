"""Latent cache: encode the clips of a shard set once, so training reads latents instead of running the encoder.

For every input shard ``X.tar`` the cache writes ``<out>/X.tar`` (atomically; existing ones are kept, so a
re-run resumes) holding, per clip:

- ``z_high.npy``: ``(T, C, h, w)`` latents of the clip at ``resolution``;
- ``z_low.npy``: ``(T, C, h', w')`` latents of the planner's copy, made with
  :func:`mardini.data.transforms.planner_copy` to ``planner_resolution`` and then encoded (exactly what the
  Lightning modules do on the fly);
- ``json``: the clip's metadata with ``frames``/``fps`` of the cached selection, ``positions`` restricted to
  it (crop-relative), and ``latent_cache`` (autoencoder spec and fingerprint, sizes, dtype, frame indices, crop
  window, and the cache's ``format_version`` and ``code``, as ``manifest.json`` records them: :func:`cache_record`).

The cache FREEZES augmentation: every clip is centre-cropped and its frames are the fixed centred selection
of ``frames`` at ``fps``. Training from the cache can only pick sub-windows in time (``data.frames`` smaller
than the cached count). Re-cache to change frames, fps, resolution, crop or the autoencoder.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mardini.autoencoders.base import FrameAutoencoder
from mardini.class_paths import subclass_at
from mardini.data.batching import skip_only
from mardini.data.sharding import atomic_tar, json_bytes, list_shards, npy_bytes, write_json_atomic
from mardini.data.stream import ClipStream
from mardini.data.transforms import Size, as_size, planner_copy, planner_size
from mardini.devices import resolve_device

DTYPES = {"float16": np.float16, "float32": np.float32}
# bump when what a cache's shards or manifest.json hold changes (and raise OLDEST_CACHE_FORMAT past the formats this
# code no longer reads); a cache without it is format 0 (cached before 2026-12-07), whose shards hold what format 1's do
CACHE_FORMAT = 1
OLDEST_CACHE_FORMAT = 0


def cache_record() -> dict:
    """What a cache records of the code that wrote it: ``format_version`` (:data:`CACHE_FORMAT`) and ``code`` (the
    package version and, in a git checkout, the commit: :func:`mardini.run_info.code_version`)."""
    from mardini.run_info import code_version

    return {"format_version": CACHE_FORMAT, "code": code_version()}


def check_cache_format(recorded: dict, where: str) -> None:
    """Raise unless the cache whose ``recorded`` dict (its ``manifest.json``, or a clip's ``latent_cache``) says
    ``where`` holds a format this code reads (none recorded: 0), naming the code that cached it and the fix."""
    theirs = recorded.get("format_version", 0)
    if not isinstance(theirs, int) or isinstance(theirs, bool):
        raise ValueError(f"{where} records latent-cache format {theirs!r}, not a whole number: data/cache_latents.py "
                         "did not write it so (edited, or another tool's); re-cache it into a new folder")
    if OLDEST_CACHE_FORMAT <= theirs <= CACHE_FORMAT:
        return
    import mardini
    from mardini.run_info import describe_code

    writer = describe_code(recorded.get("code"))
    newer = theirs > CACHE_FORMAT
    fix = ("update this checkout (git pull) to the code that cached it" if newer else
           "re-cache it with data/cache_latents.py into a new folder")
    raise ValueError(f"{where} was cached in latent-cache format {theirs}, this code (mardini {mardini.__version__}) "
                     f"reads formats {OLDEST_CACHE_FORMAT} to {CACHE_FORMAT}: {'newer' if newer else 'older'} code "
                     f"cached it ({writer}); {fix}")


def load_autoencoder(class_path: str, kwargs: dict | None = None, source: str = "kwargs") -> FrameAutoencoder:
    """Instantiate ``package.module.Class(**kwargs)``; it must be a :class:`FrameAutoencoder`. A ValueError or
    TypeError of the constructor (an argument it does not take, or of a wrong type) is a ValueError that starts with
    the class path and ``source`` (where ``kwargs`` came from, e.g. a command's flag)."""
    cls = subclass_at(class_path, FrameAutoencoder, f"autoencoder class path {class_path!r}")
    try:
        return cls(**(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{class_path} with {source} {json.dumps(kwargs or {}, default=str)}: {e} (give {source} the "
                         "constructor's arguments, by name and of its types)") from e


def _shown(size: Size) -> str:
    """``32`` -> ``"32"``, ``(32, 48)`` -> ``"32x48"``: a size as the command line takes it."""
    return str(size) if isinstance(size, int) else "x".join(str(int(v)) for v in size)


def check_sizes(resolution: Size, planner_resolution: Size, factor: int | None = None,
                names: tuple[str, str] = ("resolution", "planner_resolution")) -> None:
    """Raise naming ``names`` (the two settings as the caller takes them, e.g. a command's flags) unless the
    planner's copy (:func:`~mardini.data.transforms.planner_size`) is at most the frames' size (it is a
    LOW-resolution copy, which a larger one would upscale; a stage training on pixels refuses that too) and, given
    the autoencoder's downsampling ``factor``, the frames and the planner's copy both split into its blocks."""
    rname, pname = names
    h, w = as_size(resolution)
    ph, pw = planner_size(h, w, planner_resolution)
    if ph > h or pw > w:
        raise ValueError(
            f"{pname}={_shown(planner_resolution)} is larger than {rname}={_shown(resolution)}: the planner sees a "
            f"low-resolution copy of the {h}x{w} frames, and a {ph}x{pw} one would upscale them; use a {pname} of at "
            f"most {min(h, w) if isinstance(planner_resolution, int) else f'{h}x{w}'}, or raise {rname}"
        )
    if factor is None:
        return
    why = f"not divisible by the autoencoder's downsampling factor {factor}"
    if h % factor or w % factor:
        raise ValueError(f"{rname}={_shown(resolution)} is {why}: its frames would not encode; use a multiple of "
                         f"{factor}, e.g. {_multiples(resolution, factor)}")
    if ph % factor or pw % factor:
        if isinstance(planner_resolution, int):  # the short sides whose copy of these frames splits
            fits = [s for s in range(1, min(h, w) + 1)
                    if not any(v % factor for v in planner_size(h, w, s))]
            below = [s for s in fits if s < planner_resolution][-1:]
            near = " or ".join(str(s) for s in below + [s for s in fits if s > planner_resolution][:1])
        else:
            near = _multiples(planner_resolution, factor)
        raise ValueError(f"{pname}={_shown(planner_resolution)} makes a {ph}x{pw} planner copy of the {h}x{w} frames, "
                         f"{why}; use {f'e.g. {near}' if near else f'another {pname}'}")


def _multiples(size: Size, factor: int) -> str:
    """The sizes next to ``size`` below and above whose sides are multiples of ``factor``: ``"16 or 18"``."""
    sides = (size,) if isinstance(size, int) else tuple(size)
    down = [v // factor * factor for v in sides]
    sizes = [down, [v + factor for v in down]] if min(down) >= factor else [[v + factor for v in down]]
    return " or ".join("x".join(str(v) for v in s) for s in sizes)


def _spec(ae: FrameAutoencoder) -> dict:
    """The autoencoder's full spec (every argument, defaults included), so a stage can check it against its own;
    the class alone for one that cannot say (it cannot train a stage either: stages store ``spec()``)."""
    try:
        return ae.spec()
    except NotImplementedError:
        return {"class_path": f"{type(ae).__module__}.{type(ae).__qualname__}"}


def encode_pair(
    ae: FrameAutoencoder, video: torch.Tensor, planner_resolution: Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """``video (B, T, 3, H, W)`` in [-1, 1] -> ``z_high (B, T, C, h, w)``, ``z_low (B, T, C, h', w')``."""
    z_high = ae.encode(video)  # (B, T, C, h, w)
    z_low = ae.encode(planner_copy(video, planner_resolution))  # (B, T, C, h', w')
    return z_high, z_low


def cache_latents(
    shards: str,
    out: str | Path,
    autoencoder: FrameAutoencoder,
    frames: int,
    fps: float | None,
    resolution: Size,
    planner_resolution: Size,
    dtype: str = "float16",
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    part: tuple[int, int] | None = None,
) -> dict:
    """Encode every clip of ``shards`` (see the module doc). Returns ``{shards, written, kept, clips, skipped, empty,
    inputs}`` (``shards``: the input shards this call caches, of ``inputs`` in all; ``empty``: those that gave no
    usable clip, not cached). ``<out>/manifest.json`` records the settings; a re-run into the same folder with other
    settings is refused.

    ``part=(i, n)``: cache the input shards ``i, i + n, i + 2n, ...`` (sorted) only, so that n processes into one
    folder cache each shard once (``summary["part"]`` says ``"i/n"``). Processes may also cache the same shards at
    once: each writes its own temp file, and a shard another process finished meanwhile is kept (``kept``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_sizes(resolution, planner_resolution, autoencoder.downsample)
    if part is not None and not 0 <= part[0] < part[1]:
        raise ValueError(f"part {part[0]}/{part[1]} is impossible: it must be i/n with 0 <= i < n")
    inputs = list_shards(shards)
    out = Path(out)
    device = resolve_device(device)
    ae = autoencoder.to(device).eval()
    info = {
        "autoencoder": _spec(ae), "autoencoder_fingerprint": ae.fingerprint(),
        "resolution": list(as_size(resolution)), "planner_resolution": list(as_size(planner_resolution)),
        "planner_copy": list(planner_size(*as_size(resolution), planner_resolution)),  # the z_low frames' size
        "frames": frames, "fps": fps, "dtype": dtype, "crop": "center",
    }
    names: dict[str, str] = {}
    for shard in inputs:  # each input is cached under its own name: two inputs must not share one
        if Path(shard).name in names:
            raise ValueError(f"{names[Path(shard).name]} and {shard} would both be cached as "
                             f"{out / Path(shard).name}; cache each shard folder into its own output folder")
        names[Path(shard).name] = shard
    summary = {"shards": len(inputs), "written": 0, "kept": 0, "clips": 0, "skipped": 0, "empty": [],
               "reasons": {}, "inputs": len(inputs)}
    if part is not None:
        index, parts = part
        inputs = inputs[index::parts]
        summary.update(shards=len(inputs), part=f"{index}/{parts}")
        if not inputs:  # more processes than shards: nothing to do here
            return summary
    record = cache_record()
    check_manifest(out, info, record)
    examples: dict[str, str] = {}
    for shard in tqdm(inputs, desc="latent cache", unit="shard", disable=not progress):
        target = out / Path(shard).name
        if target.exists():
            summary["kept"] += 1
            continue
        stream = ClipStream([shard], frames=frames, fps=fps, resolution=resolution, batch_size=batch_size,
                            train=False, keep_meta=True)
        before = {key: summary[key] for key in ("clips", "skipped")}
        cached_meanwhile = False
        try:
            with atomic_tar(target) as sink:
                _encode_shard(stream, sink, ae, {**info, **record}, frames, planner_resolution, dtype, device,
                              summary)
                if summary["clips"] == before["clips"]:
                    raise _NoClip  # no usable clip: write no shard (training would stall on an empty one)
                if target.exists():
                    raise _CachedMeanwhile  # by another process: keep its file, drop this one's temp file
        except _NoClip:
            summary["empty"].append(shard)
            continue
        except _CachedMeanwhile:
            cached_meanwhile = True
            summary.update(before, kept=summary["kept"] + 1)  # its clips and skips are the other process's
            continue
        finally:
            log = None if cached_meanwhile else getattr(stream, "skip_log", None)
            for reason, n in (log.reasons.items() if log is not None else ()):
                summary["reasons"][reason] = summary["reasons"].get(reason, 0) + n
                examples.setdefault(reason, log.examples.get(reason, ""))
        summary["written"] += 1
    if summary["clips"] == 0 and summary["kept"] == 0:
        _nothing_cached(shards, out, summary, examples, frames, fps)
    if summary["empty"]:
        warnings.warn(f"{len(summary['empty'])} input shard(s) gave no usable clip and were not cached: "
                      f"{summary['empty'][:3]}; rebuild them (data/README.md) or leave them out")
    return summary


def _nothing_cached(shards: str, out: Path, summary: dict, examples: dict[str, str], frames: int,
                    fps: float | None) -> None:
    """Raise the ValueError for a run that cached no clip at all (a folder that training would find empty). The
    manifest this run wrote goes too when the folder holds no shard, so a re-run with fixed settings is not refused."""
    if not any(out.glob("*.tar")):
        (out / "manifest.json").unlink(missing_ok=True)
    if not summary["skipped"]:
        raise ValueError(f"{shards} holds no samples: no clip to cache; check the shard folder "
                         "(data/videos_to_shards.py writes shards from videos)")
    counts = ", ".join(f"{n} x {reason}" for reason, n in sorted(summary["reasons"].items()))
    first = next(iter(sorted(examples.items())), ("", ""))[1]
    raise ValueError(
        f"no clip of {shards} could be cached with --frames {frames} --fps {fps or 'native'}: all "
        f"{summary['skipped']} samples were skipped ({counts or 'reasons not recorded'}; e.g. {first}). "
        "For 'too few frames' ask for fewer --frames or a higher --fps (or rebuild the shards with longer clips, "
        "data/videos_to_shards.py --clip-frames); otherwise rebuild the shards (data/README.md)"
    )


class _NoClip(Exception):
    """A shard gave no clip (all its samples bad): its cache shard is not written."""


class _CachedMeanwhile(Exception):
    """Another process cached the shard while this one encoded it: its file is kept."""


def check_manifest(out: Path, info: dict, record: dict | None = None) -> None:
    """``<out>/manifest.json`` records the cache settings (and ``record``: :func:`cache_record`); a re-run with
    others into the same folder is refused (shards kept from the earlier run would mix two settings), as is one
    into a folder of a format this code does not read (:func:`check_cache_format`). The autoencoders are compared
    as a stage compares them (:func:`~mardini.lit.checkpoints.latent_spec_differences`), so a resume with another
    ``chunk_size`` (a memory knob: a smaller GPU) is no other setting."""
    manifest = out / "manifest.json"
    if manifest.exists():
        held = json.loads(manifest.read_text(encoding="utf-8"))
        check_cache_format(held, f"the latent cache {out}")
        old = held.get("settings") or {}
        unrecorded = {"planner_copy", "autoencoder_fingerprint"} - set(old)  # by a cache written before they were
        info = {k: v for k, v in info.items() if k not in unrecorded}
        same_vae = "autoencoder_fingerprint" in old and old["autoencoder_fingerprint"] == info["autoencoder_fingerprint"]
        changed = sorted(k for k in set(old) | set(info)
                         if not _same_setting(k, old.get(k), info.get(k), same_vae))
        if changed:
            changes = ", ".join(f"{k} {old.get(k)!r} -> {info.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds latents cached with other settings ({changes}); cache into a new "
                             "output folder, or delete this one to re-cache")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {**(record or {}), "settings": info})


def _same_setting(key: str, old, new, same_fingerprint: bool) -> bool:
    """Whether a manifest's setting ``key`` encodes the same latents as ``old`` and ``new`` (an autoencoder of the
    same fingerprint may be found at another path)."""
    if key == "autoencoder" and isinstance(old, dict) and isinstance(new, dict):
        from mardini.lit.checkpoints import latent_spec_differences

        same_args = set(old.get("init_args") or {}) == set(new.get("init_args") or {})
        return same_args and not latent_spec_differences(old, new, same_fingerprint)
    return old == new


def _encode_shard(stream, sink, ae, info, frames, planner_resolution, dtype, device, summary) -> None:
    """Encode one input shard's clips into ``sink`` (a tar writer), counting clips and skipped samples."""
    for batch in stream:
        summary["skipped"] += int(batch["skipped"])
        if skip_only(batch):  # the shard's skips when it gave no clip
            continue
        video = batch["video"].to(device)  # (B, T, 3, H, W)
        z_high, z_low = encode_pair(ae, video, planner_resolution)
        for i, key in enumerate(batch["key"]):
            meta = dict(batch["meta"][i])
            cache = dict(info, source_fps=meta["fps"], source_frames=meta["frames"],
                         frame_indices=meta.pop("frame_indices"), crop_box=meta.pop("crop"))
            meta.update(frames=frames, fps=float(batch["fps"][i]), latent_cache=cache)
            if "positions" in batch:
                k = len(meta["positions"][0]) if meta.get("positions") else 0
                pos = batch["positions"][i, :, :k].tolist()  # (T, K, 2) crop-relative
                meta["positions"] = [[[round(v, 6) if math.isfinite(v) else None for v in p] for p in f]
                                     for f in pos]
            sink.write({
                "__key__": key,
                "z_high.npy": npy_bytes(z_high[i].cpu().numpy().astype(DTYPES[dtype])),
                "z_low.npy": npy_bytes(z_low[i].cpu().numpy().astype(DTYPES[dtype])),
                "json": json_bytes(meta),
            })
            summary["clips"] += 1
