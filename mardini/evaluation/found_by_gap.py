"""Where are the objects lost? The trajectory metric split by each frame's distance from its nearest given frame.

    python -m mardini.evaluation.found_by_gap --checkpoint outputs/tiny/05_joint_task/checkpoints/last.ckpt
    python -m mardini.evaluation.found_by_gap --checkpoint ... --task image_to_video --steps 5 --eta 1
    python -m mardini.evaluation.found_by_gap --checkpoint ... --given 0,2,4,6,8   # any mask (--guidance: task's)
    python -m mardini.evaluation.found_by_gap --checkpoint ... --by-size           # also split by object area

On the held-out synthetic clips (the demo's 64 by default; ``--data`` another shard folder), cut as ``evaluate.py``
cuts them (at the checkpoint's window, size and frame rate), the model samples the task once as ``evaluate.py``
samples it (clip k from its seed ``protocol.clip_seeds(seed, k)``, whatever ``--batch-size``) and the two baselines
(linear blend, nearest frame) fill the same frames, so the total over the gaps is ``evaluate.py``'s
``traj_detected`` of the same checkpoint, seed, steps, eta and clips; for every gap d = 1, 2, ...
(frames from the nearest given one) the table gives the share of the moving objects found, the mean error of the
found ones and the error over all objects (a miss scored as a random guess), exactly as ``TrajectoryError`` counts
them. A model that loses objects only far from the given frames has a motion problem; one that loses them next to a
given frame, where copying it would find them, cannot yet draw them from noise. ``--by-size`` splits the share found
once more, by each object's area in the real frame (pixels of its colour, as the metric weighs them), to tell a model
that loses only small objects (the ones noise and a low-resolution plan hide first) from one that loses any.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator

import torch

from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.diffusion.checks import ETA_RANGE
from mardini.evaluation.protocol import clip_seeds
from mardini.evaluation.samplers import LinearBlend, NearestFrame, PipelineSampler
from mardini.evaluation.trajectory import TrajectoryError, miss_px
from mardini.masking import nearest_given

SIZE_EDGES = (20.0, 35.0, 50.0)  # object areas (pixels of a 32 x 32 frame) that split the demo's objects


def _per_object(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                tol: float) -> dict[str, torch.Tensor]:
    """The metric's per object-frame tensors ``(B, T, K)`` plus ``gap``, the frames from the nearest given one."""
    m = TrajectoryError(tol=tol).measure(fake.clamp(-1, 1), real, positions, mask)
    pos = torch.arange(mask.shape[1], device=mask.device)[None]  # (1, T)
    m["gap"] = (pos - nearest_given(mask)).abs()[..., None].expand_as(m["counted"])  # (B, T, K)
    return m


def object_frames(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                  tol: float = 0.2) -> dict[str, torch.Tensor]:
    """Every object-frame of a batch as flat ``(N,)`` tensors (``counted``, ``detected``, ``err_px``, ``gap``,
    ``real_mass``, ``miss_px``), so batches of any object count concatenate (:func:`concat`) before
    :func:`gap_rows` / :func:`size_rows` count them. Arguments as :func:`found_by_gap`."""
    m = _per_object(fake, real, positions, mask, tol)
    out = {k: m[k].reshape(-1) for k in ("counted", "detected", "err_px", "gap", "real_mass")}  # (N,) each
    out["miss_px"] = torch.full_like(out["err_px"], miss_px(*real.shape[-2:]), dtype=torch.float64)  # (N,)
    return out


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """:func:`object_frames` of several batches as one."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def gap_rows(m: dict[str, torch.Tensor], frames: int) -> list[dict[str, float]]:
    """:func:`found_by_gap`'s rows of :func:`object_frames` (of one batch or :func:`concat` of several)."""
    counted, detected, err, gap = m["counted"], m["detected"], m["err_px"], m["gap"]  # (N,) each
    rows = []
    for d in range(1, frames):
        c = counted & (gap == d)  # (N,)
        n = int(c.sum())
        if n == 0:
            continue
        hit = c & detected  # (N,)
        k = int(hit.sum())
        err_found = float(err[hit].double().sum())
        missed = float(m["miss_px"][c & ~detected].sum())  # a miss scored as a random guess
        rows.append({"gap": d, "counted": n, "found": k / n,
                     "err_px": err_found / k if k else float("nan"),
                     "err_all_px": (err_found + missed) / n})
    return rows


def found_by_gap(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 tol: float = 0.2) -> list[dict[str, float]]:
    """One row per gap ``d >= 1`` with counted objects: ``{gap, counted, found, err_px, err_all_px}``.

    ``fake, real (B, T, 3, H, W)`` in [-1, 1], ``positions (B, T, K, 2)``, ``mask (B, T)`` True = generated.
    ``err_px`` is NaN for a gap where nothing is found. ``tol``: the metric's colour tolerance (RGB distance in
    [0, 1] at which a pixel stops counting for an object; 0.2 in every report).
    """
    return gap_rows(object_frames(fake, real, positions, mask, tol), mask.shape[1])


def check_edges(edges: tuple[float, ...]) -> None:
    """Raise unless the size bins' inner ``edges`` are positive and increasing."""
    if list(edges) != sorted(edges) or any(e <= 0 for e in edges):
        raise ValueError(f"size edges must be positive and increasing, got {list(edges)}")


def size_rows(m: dict[str, torch.Tensor], frames: int, edges: tuple[float, ...] = SIZE_EDGES) -> list[dict]:
    """:func:`found_by_size`'s rows of :func:`object_frames` (of one batch or :func:`concat` of several)."""
    check_edges(edges)
    counted, detected, gap, area = m["counted"], m["detected"], m["gap"], m["real_mass"]  # (N,) each
    bounds = [0.0, *map(float, edges), float("inf")]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = counted & (area >= lo) & (area < hi)  # (N,)
        n = int(c.sum())
        if n == 0:
            continue
        by_gap = {}
        for d in range(1, frames):
            cd = c & (gap == d)
            nd = int(cd.sum())
            if nd:
                by_gap[d] = (nd, int((cd & detected).sum()) / nd)
        rows.append({"area": [lo, hi], "counted": n, "found": int((c & detected).sum()) / n, "by_gap": by_gap})
    return rows


def found_by_size(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                  edges: tuple[float, ...] = SIZE_EDGES, tol: float = 0.2) -> list[dict]:
    """The share found per object-area bin and gap: one row per bin with counted objects,
    ``{area: [lo, hi), counted, found, by_gap: {gap: (counted, found)}}``; a bin or gap with none is left out.

    Areas are pixels of the evaluated frame; ``edges`` are the inner bin edges (bins ``[0, e0), [e0, e1), ...,
    [e_last, inf)``). Arguments otherwise as :func:`found_by_gap`.
    """
    return size_rows(object_frames(fake, real, positions, mask, tol), mask.shape[1], edges)


def markdown(tables: dict[str, list[dict[str, float]]]) -> str:
    """A markdown table: a row per gap, found share / found error / all-objects error per method."""
    methods = list(tables)
    gaps = sorted({r["gap"] for rows in tables.values() for r in rows})
    head = "| gap (frames) | object-frames | " + " | ".join(f"{m}: found / px found / px all" for m in methods) + " |"
    lines = [head, "|---" * (2 + len(methods)) + "|"]
    for d in gaps:
        cells, counted = [], ""
        for m in methods:
            row = next((r for r in tables[m] if r["gap"] == d), None)
            if row is None:
                cells.append("-")
                continue
            counted = row["counted"]
            cells.append(f"{row['found']:.3f} / {row['err_px']:.2f} / {row['err_all_px']:.2f}")
        lines.append(f"| {d} | {counted} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_markdown(tables: dict[str, list[dict]]) -> str:
    """A markdown table: a row per object-area bin, the share found at each gap (and over all) per method."""
    methods = list(tables)
    gaps = sorted({d for rows in tables.values() for r in rows for d in r["by_gap"]})
    head = ("| object area (px) | object-frames | "
            + " | ".join(f"{m}: found at gap {' / '.join(map(str, gaps))} (all)" for m in methods) + " |")
    lines = [head, "|---" * (2 + len(methods)) + "|"]
    bins = sorted({tuple(r["area"]) for rows in tables.values() for r in rows})
    for lo, hi in bins:
        cells, counted = [], ""
        for m in methods:
            row = next((r for r in tables[m] if tuple(r["area"]) == (lo, hi)), None)
            if row is None:
                cells.append("-")
                continue
            counted = row["counted"]
            per_gap = " / ".join(f"{row['by_gap'][d][1]:.2f}" if d in row["by_gap"] else "-" for d in gaps)
            cells.append(f"{per_gap} ({row['found']:.2f})")
        span = f"{lo:g}-{hi:g}" if hi != float("inf") else f">= {lo:g}"
        lines.append(f"| {span} | {counted} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_methods(pipe, video: torch.Tensor, mask: torch.Tensor, steps: int = 5, eta: float = 1.0,
                   guidance: float = 1.0, seed: int = 0, first: int = 0) -> dict[str, torch.Tensor]:
    """Both baselines and one sample of ``pipe`` (a ``MarDiniPipeline``) filling the masked frames of ``video``
    ``(B, T, 3, H, W)`` in [-1, 1] (``mask (B, T)`` True = generated): ``{method: (B, T, 3, H, W)}`` in [-1, 1].

    The model samples as ``evaluate.py`` does (:class:`PipelineSampler`): clip ``k`` of the protocol's clips (here
    ``first + b``) draws from ``clip_seeds(seed, k)``, whatever the batch."""
    seeds = clip_seeds(seed, first, video.shape[0])
    model = PipelineSampler(pipe, steps, guidance, eta)
    return {"linear_blend": LinearBlend()(video, mask), "nearest_frame": NearestFrame()(video, mask),
            "mardini": model(video, mask, seeds).clamp(-1, 1)}


def score_batches(pipe, batches: Iterable[dict], mask_row: torch.Tensor, steps: int = 5, eta: float = 1.0,
                  guidance: float = 1.0, seed: int = 0, tol: float = 0.2) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`object_frames` of both baselines and the model over every clip of ``batches`` (dicts with ``video
    (B, T, 3, H, W)`` and ``positions (B, T, K, 2)``, :func:`evaluation_batches`), the model seeded per clip by its
    index among them (:func:`sample_methods`): ``{method: flat tensors}``, the same for any batch size."""
    parts: dict[str, list[dict[str, torch.Tensor]]] = {}
    seen = 0
    for batch in batches:
        video, positions = batch["video"], batch["positions"]  # (B, T, 3, H, W), (B, T, K, 2)
        mask = mask_row[None].expand(video.shape[0], -1)  # (B, T)
        for name, fake in sample_methods(pipe, video, mask, steps, eta, guidance, seed, first=seen).items():
            parts.setdefault(name, []).append(object_frames(fake, video, positions, mask, tol))
        seen += video.shape[0]
    if not parts:
        raise ValueError("no clip to score: the data gave no batch")
    return {name: concat(p) for name, p in parts.items()}


def score_methods(pipe, video: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, steps: int = 5,
                  eta: float = 1.0, guidance: float = 1.0, seed: int = 0,
                  tol: float = 0.2) -> dict[str, list[dict[str, float]]]:
    """:func:`found_by_gap` of both baselines and one sample of ``pipe`` (a ``MarDiniPipeline``) on the same clips.

    ``video (B, T, 3, H, W)`` in [-1, 1], ``positions (B, T, K, 2)``, ``mask (B, T)`` True = generated.
    """
    fakes = sample_methods(pipe, video, mask, steps, eta, guidance, seed)
    return {name: found_by_gap(fake, video, positions, mask, tol) for name, fake in fakes.items()}


def evaluation_batches(data: str, clips: int, frames: int, size: int | tuple[int, int], fps: float | None,
                       batch_size: int) -> Iterator[dict]:
    """The first ``clips`` usable clips of ``data`` (``synthetic``: the held-out split, or a shard folder) cut as
    ``evaluate.py`` cuts them (:func:`~mardini.evaluation.data.iter_batches`), in batches of ``batch_size``."""
    from mardini.evaluation.data import iter_batches, resolve_source

    kind, files = resolve_source(data)
    return iter_batches(kind, files, frames, fps, size, clips, batch_size)


def main(argv: list[str] | None = None) -> dict:
    """The CLI: ``{method: rows by gap}``, or ``{"by_gap": ..., "by_size": ...}`` with ``--by-size``."""
    from mardini.evaluation.plan_usage import clip_size
    from mardini.evaluation.protocol import DEFAULT_GUIDANCE
    from mardini.masking import image_to_video_mask, interpolation_mask, mask_from_given
    from mardini.pipeline.pipeline import MarDiniPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a joint (or generation) checkpoint; EMA weights")
    add_allow_autoencoder_argument(parser)
    parser.add_argument("--task", choices=("interpolation", "image_to_video"), default="interpolation")
    parser.add_argument("--given", default=None,
                        help="comma-separated given frames (e.g. 0,2,4,6,8): any mask instead of --task's")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the held-out split, data/shards/synthetic/val) or a folder of synthetic "
                             "shards: clips cut as evaluate.py --data cuts them")
    parser.add_argument("--clips", type=int, default=64, help="held-out synthetic clips (the demo's 64)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="clips per sampling call (evaluate.py's default); the figures do not depend on it")
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps (the demo's 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta in [0, 1] (the demo's 1)")
    parser.add_argument("--guidance", type=float, default=None, help="default: 1 interpolation, 2.5 I2V")
    parser.add_argument("--seed", type=int, default=0,
                        help="clip k samples from evaluate.py's seed of clip k (protocol.clip_seeds)")
    parser.add_argument("--tol", type=float, default=0.2,
                        help="colour tolerance of the detection (the reports' 0.2); larger forgives off colours")
    parser.add_argument("--by-size", action="store_true",
                        help="also split the share found by object area (pixels of the evaluated frame)")
    parser.add_argument("--size-edges", default=",".join(f"{e:g}" for e in SIZE_EDGES),
                        help="inner edges of the area bins, comma-separated (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    try:
        edges = tuple(float(e) for e in args.size_edges.split(","))
    except ValueError as err:
        raise SystemExit(f"--size-edges {args.size_edges!r}: give numbers separated by commas, like 20,35,50") from err
    if list(edges) != sorted(edges) or any(e <= 0 for e in edges):
        raise SystemExit(f"--size-edges {args.size_edges!r}: the edges must be positive and increasing")
    if args.clips < 1 or args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f"--clips, --steps and --batch-size must be >= 1, got {args.clips}, {args.steps} and "
                         f"{args.batch_size}")
    if not args.tol > 0:
        raise SystemExit(f"--tol must be > 0 (an RGB distance in [0, 1]), got {args.tol}")
    if not 0 <= args.eta <= 1:
        raise SystemExit(f"--eta={args.eta} is impossible: {ETA_RANGE}")
    pipe = MarDiniPipeline.from_checkpoint(args.checkpoint, allow_autoencoders=args.allow_autoencoder)
    if args.given:
        try:
            row = mask_from_given(pipe.window, [int(i) for i in args.given.split(",")])
        except ValueError as err:
            raise SystemExit(f"--given {args.given!r}: {err}") from err
    else:
        row = interpolation_mask(pipe.window) if args.task == "interpolation" else image_to_video_mask(pipe.window)
    guidance = DEFAULT_GUIDANCE[args.task] if args.guidance is None else args.guidance
    try:
        batches = evaluation_batches(args.data, args.clips, pipe.window, clip_size(pipe.resolution), pipe.fps,
                                     args.batch_size)
        objects = score_batches(pipe, _with_positions(batches), row, args.steps, args.eta, guidance, args.seed,
                                args.tol)
    except FileNotFoundError as err:  # no held-out shards here: say how to build them, without a traceback
        raise SystemExit(str(err)) from err
    tables = {name: gap_rows(m, pipe.window) for name, m in objects.items()}
    if not args.by_size:
        print(json.dumps(tables) if args.json else markdown(tables))
        return tables
    sizes = {name: size_rows(m, pipe.window, edges) for name, m in objects.items()}
    out = {"by_gap": tables, "by_size": sizes}
    print(json.dumps(out) if args.json else markdown(tables) + "\n\n" + size_markdown(sizes))
    return out


def _with_positions(batches: Iterable[dict]) -> Iterator[dict]:
    """The batches; a SystemExit for clips without object positions (shards not written as synthetic ones)."""
    for batch in batches:
        if "positions" not in batch:
            raise SystemExit("the shards carry no object positions: build them with data/make_synthetic.py")
        yield batch


if __name__ == "__main__":
    main()
