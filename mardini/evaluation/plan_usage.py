"""Does the generator read the plan? One generator forward with the plan, with the null plan, with another clip's plan.

    python -m mardini.evaluation.plan_usage --checkpoint outputs/tiny/05_joint_task/checkpoints/last.ckpt
    python -m mardini.evaluation.plan_usage --planning outputs/tiny/03_mar_warmup/checkpoints/last.ckpt

On the held-out synthetic clips with the interpolation mask, at diffusion time ``t``: the decoded one-step
prediction's MidF-PSNR with the plan and with the null plan, the relative change of the velocity on the generated
frames when the plan is swapped for the null plan or for the next clip's plan, the plan's spread (RMS of its tokens'
deviation from the clip's mean token over their RMS), and the share of the synthetic objects found in each
prediction (the trajectory metric's detection; ``--t 0.5``: restored from the true clip half-noised), also split by
object area (``*_by_size``, the bins of ``found_by_gap --by-size``), beside what the planner's input keeps of each
size (the true clip at the planner's resolution, enlarged back). Each clip's noise is drawn from its own seed
(evaluate.py's ``protocol.clip_seeds``) and the networks run ``--batch-size`` clips at a time, so the figures do not
depend on the batch size.
``--planning`` scores a planner warm-up checkpoint instead: its projection head's reconstruction, upsampled
bilinearly, against the linear blend, and the share of the objects found in it and in the true clips at the
planner's resolution.
"""

from __future__ import annotations

import argparse
import json

import torch

from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.diffusion.checks import frame_mask
from mardini.evaluation.samplers import LinearBlend
from mardini.masking import interpolation_mask
from mardini.metrics.frame_metrics import MidFrameMetrics
from mardini.pipeline.inputs import parse_size


def _midf_psnr(fake: torch.Tensor, real: torch.Tensor) -> float:
    metric = MidFrameMetrics()
    metric.update(fake.clamp(-1, 1), real)
    return float(metric.compute()["midf_psnr"])


def plan_spread(plan: torch.Tensor) -> float:
    """RMS of the tokens' deviation from their clip's mean token over the tokens' RMS. ``plan (B, T, M, P)``"""
    dev = plan - plan.mean(dim=(1, 2), keepdim=True)  # (B, T, M, P)
    return float(dev.square().mean().sqrt() / plan.square().mean().sqrt())


def clip_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise ``shape = (B, ...)``, clip ``b``'s row drawn alone from ``protocol.clip_seeds(seed, b)`` (evaluate.py's
    seed of clip b), so a clip's noise does not depend on how many clips are scored or how they are batched."""
    from mardini.evaluation.protocol import clip_seeds

    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s))
                        for s in clip_seeds(seed, 0, shape[0])])  # (B, ...)


def in_batches(fn, batch_size: int | None, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` over slices of ``batch_size`` clips of ``tensors`` (all at once for None), concatenated on dim 0."""
    b = tensors[0].shape[0]
    step = b if batch_size is None else batch_size
    return torch.cat([fn(*(x[i : i + step] for x in tensors)) for i in range(0, b, step)])


@torch.no_grad()
def plan_usage(pipe, video: torch.Tensor, t: float = 1.0, seed: int = 0,
               positions: torch.Tensor | None = None, batch_size: int | None = None) -> dict[str, float]:
    """Plan vs null plan for a joint pipeline on clips ``video (B, T, 3, H, W)`` in [-1, 1], interpolation mask.

    With the objects' ``positions (B, T, K, 2)`` (the synthetic set), also the share of objects the trajectory
    metric finds in each one-step prediction: at ``t`` < 1 it says how much of an object the generator restores
    from the true clip noised to ``t``. Each clip's noise is its own (:func:`clip_noise`), the networks run on
    ``batch_size`` clips at a time (None: all), and the figures do not depend on it.
    """
    from mardini.data.transforms import planner_copy, resize_video

    b, frames = video.shape[:2]
    mask = interpolation_mask(frames)[None].expand(b, -1)  # (B, T)
    z_ref = pipe.autoencoder.encode(video)  # (B, T, C, h, w)
    z0 = pipe.anchor.to_target(z_ref, mask)  # (B, T, C, h, w): what the generator denoises
    plan = in_batches(pipe.plan, batch_size, video, mask)  # (B, T, M, P)
    null = pipe.generator.null_plan(*plan.shape[:3]).to(plan)  # (B, T, M, P)
    tt = torch.full((b,), float(t))  # (B,)
    alpha, sigma = pipe.schedule.alpha_sigma(tt)
    noise = clip_noise(tuple(z0.shape), seed)  # (B, T, C, h, w)
    z_t = torch.where(frame_mask(mask), alpha * z0 + sigma * noise, z0)  # (B, T, C, h, w)
    v = {name: in_batches(pipe.generator, batch_size, z_t, tt, p, mask) for name, p in
         (("plan", plan), ("null", null), ("other", plan.roll(1, dims=0)))}  # (B, T, C, h, w) each; other: clip b-1's
    gen = frame_mask(mask).expand_as(z0)  # generated elements

    def rel(a: torch.Tensor, c: torch.Tensor) -> float:
        return float((a - c)[gen].norm() / a[gen].norm().clamp_min(1e-12))

    out = {"t": float(t), "clips": b, "plan_spread": plan_spread(plan.float())}
    for name in ("plan", "null"):
        x0, _ = pipe.schedule.predict_x0_eps(z_t, v[name], tt)  # (B, T, C, h, w)
        decoded = pipe.autoencoder.decode(pipe.anchor.from_target(x0, z_ref, mask))  # (B, T, 3, H, W)
        out[f"midf_psnr_{name}"] = _midf_psnr(decoded, video)
        if positions is not None:
            out[f"found_{name}"] = found_share(decoded.clamp(-1, 1), video, positions, mask)  # generated frames only
            out[f"found_{name}_by_size"] = found_share_by_size(decoded.clamp(-1, 1), video, positions, mask)
    if positions is not None:  # what the planner's input keeps of each object, enlarged back the same way
        truth_low = resize_video(planner_copy(video, pipe.planner_resolution), tuple(video.shape[-2:]))
        out["found_truth_at_planner_resolution_by_size"] = found_share_by_size(truth_low.clamp(-1, 1), video,
                                                                               positions, mask)
    out["velocity_change_null"] = rel(v["plan"], v["null"])
    out["velocity_change_other_clip"] = rel(v["plan"], v["other"])
    return out


@torch.no_grad()
def found_share(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the moving objects' generated frames in which the trajectory metric finds the object."""
    from mardini.evaluation.trajectory import TrajectoryError

    m = TrajectoryError().measure(fake, real, positions, mask)
    counted, detected = m["counted"], m["detected"]  # (B, T, K) each
    return float(detected.sum() / counted.sum().clamp_min(1))


@torch.no_grad()
def found_share_by_size(fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, float]:
    """:func:`found_share` per object-area bin (``found_by_gap.found_by_size``'s bins): ``{"0-20": share, ...}``."""
    from mardini.evaluation.found_by_gap import found_by_size

    return {(f"{r['area'][0]:g}-{r['area'][1]:g}" if r["area"][1] != float("inf") else f">={r['area'][0]:g}"):
            r["found"] for r in found_by_size(fake, real, positions, mask)}


@torch.no_grad()
def planner_head_quality(module, video: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, float]:
    """A planner warm-up (``PlanningModule``, EMA weights): head reconstruction upsampled vs the linear blend.

    With the objects' ``positions (B, T, K, 2)`` (the synthetic set), also the share of objects the trajectory
    metric finds in the upsampled reconstruction and in the true clip at the planner's resolution upsampled the same
    way: what a plan read by upsampling could score at best.
    """
    from mardini.data.transforms import planner_copy, resize_video

    b, frames = video.shape[:2]
    mask = interpolation_mask(frames)[None].expand(b, -1)  # (B, T)
    with module.ema_weights():
        planner = module.networks["planner"]
        z_low = module.autoencoder.encode(planner_copy(video, module.hparams.planner_resolution))  # (B,T,C,h',w')
        plan = planner(z_low, mask)  # (B, T, M, P)
        low = module.autoencoder.decode(planner.project(plan, size=tuple(z_low.shape[-2:])))  # (B, T, 3, h, w)
    up = resize_video(low, tuple(video.shape[-2:]))  # (B, T, 3, H, W), bilinear
    blend = LinearBlend()(video, mask)  # (B, T, 3, H, W)
    out = {"clips": b, "plan_spread": plan_spread(plan.float()), "midf_psnr_head_upsampled": _midf_psnr(up, video),
           "midf_psnr_linear_blend": _midf_psnr(blend, video)}
    if positions is not None:
        truth_low = resize_video(planner_copy(video, module.hparams.planner_resolution), tuple(video.shape[-2:]))
        out["found_head_upsampled"] = found_share(up.clamp(-1, 1), video, positions, mask)  # generated frames only
        out["found_truth_at_planner_resolution"] = found_share(truth_low.clamp(-1, 1), video, positions, mask)
    return out


def heldout_clips(n: int, frames: int, resolution: int | tuple[int, int], fps: float | None) -> dict:
    """The first ``n`` clips of the held-out synthetic shards (``make data``) at ``resolution`` (a side or
    ``(H, W)``): ``video (n, T, 3, H, W)`` in [-1, 1] and the objects' ``positions``."""
    from mardini.data.datamodule import first_batch

    return first_batch("data/shards/synthetic/val", n, frames, resolution, fps)


def clip_size(size: tuple[int, int] | None) -> int | tuple[int, int]:
    """A checkpoint's training ``(H, W)`` (None: the demo's 32) as :func:`heldout_clips`' size: the side where
    square, else ``(H, W)`` (:func:`~mardini.evaluation.protocol.eval_size`), so a non-square checkpoint is scored
    on clips of its own shape."""
    from mardini.evaluation.protocol import eval_size

    return eval_size(tuple(int(s) for s in size)) if size else 32


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a joint checkpoint (EMA weights)")
    which.add_argument("--planning", help="a planner warm-up checkpoint: score its projection head instead")
    add_allow_autoencoder_argument(parser)
    parser.add_argument("--clips", type=int, default=64, help="held-out synthetic clips (the demo's 64)")
    parser.add_argument("--t", type=float, default=1.0, help="diffusion time of the one-step prediction")
    parser.add_argument("--seed", type=int, default=0,
                        help="clip k's noise from evaluate.py's seed of clip k (protocol.clip_seeds)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="clips per network call (evaluate.py's default); the figures do not depend on it")
    parser.add_argument("--frames", type=int, default=9, help="--planning only: window (the demo's 9)")
    parser.add_argument("--resolution", default="32", metavar="N|HxW",
                        help="--planning only: clip size, a side or HxW (the demo's 32)")
    parser.add_argument("--fps", type=float, default=8.0, help="--planning only: frame rate (the demo's 8)")
    args = parser.parse_args(argv)
    try:
        resolution = parse_size(args.resolution)
    except ValueError as err:
        parser.error(str(err))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint:
        from mardini.pipeline.pipeline import MarDiniPipeline

        pipe = MarDiniPipeline.from_checkpoint(args.checkpoint, allow_autoencoders=args.allow_autoencoder)
        if pipe.planner is None:
            raise SystemExit(f"{args.checkpoint} has no planner: plan usage needs a joint checkpoint")
        batch = heldout_clips(args.clips, pipe.window, clip_size(pipe.resolution), pipe.fps)
        result = plan_usage(pipe, batch["video"], args.t, args.seed, batch.get("positions"), args.batch_size)
    else:
        from mardini.lit import PlanningModule

        module = PlanningModule.load_from_checkpoint(args.planning, map_location="cpu")
        batch = heldout_clips(args.clips, args.frames, clip_size(resolution), args.fps)
        result = planner_head_quality(module, batch["video"], batch.get("positions"))
    def rounded(v):
        return round(v, 4) if isinstance(v, float) else {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) \
            else v

    print(json.dumps(rounded(result)))
    return result


if __name__ == "__main__":
    main()
