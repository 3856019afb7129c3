"""Table 2 and Fig. 6a on the synthetic protocol: which samplers, scored with the evaluation package's ``run_task``.

Table 2 (PAPER.md §5.1, interpolation): the planner alone through its warm-up projection head ("MAR only"), the
generator alone ("DM only": the generator warm-up, and the joint model's generator with the null plan, the two
readings of the paper's row), and both (the joint checkpoint). Fig. 6a (PAPER.md §6.4): the joint checkpoint at
several DDIM step counts, on interpolation and image-to-video. Baselines (linear blend, nearest frame) are scored
beside them on the same clips, masks and seeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from mardini.data.transforms import planner_copy, resize_video
from mardini.diffusion.checks import frame_mask
from mardini.evaluation.protocol import DEFAULT_GUIDANCE
from mardini.evaluation.samplers import BASELINES, PipelineSampler
from mardini.lit.checkpoints import EMA_PREFIX, check_metadata, read_checkpoint
from mardini.models.registry import build_planner
from mardini.pipeline.loading import checkpoint_autoencoder, hyper_parameters_of, load_network


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------
class PlannerOnly:
    """PAPER.md Table 2 "MAR only": the warm-up planner's projection head, decoded and upsampled; no diffusion.

    Fed as in training (``PlanningModule.compute_loss`` / ``MarDiniBase.latents_low``): the clip resized to the
    planner resolution, encoded, masked frames replaced by the mask token inside the planner.
    """

    name = "mar_only"

    def __init__(self, checkpoint: str | Path, ema: bool = True, allow_autoencoders: Collection[str] = ()) -> None:
        ckpt = read_checkpoint(checkpoint)
        meta = check_metadata(ckpt, ("planning",), checkpoint)
        over = dict(hyper_parameters_of(ckpt, checkpoint).get("planner") or {})
        over.setdefault("in_channels", int(meta["latent_channels"]))
        self.planner = build_planner(meta["size"], **over)
        load_network(self.planner, ckpt["state_dict"], f"{EMA_PREFIX if ema else 'networks.'}planner.", checkpoint, ema)
        self.planner.eval().requires_grad_(False)
        self.autoencoder = checkpoint_autoencoder(meta, checkpoint, allow_autoencoders)
        self.planner_resolution = int(meta["planner_resolution"])

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
        h, w = video.shape[-2:]
        m = frame_mask(mask)  # (B, T, 1, 1, 1)
        x = torch.where(m, torch.zeros((), device=video.device), video)  # (B, T, 3, H, W) masked content out
        z_low = self.autoencoder.encode(planner_copy(x, self.planner_resolution))  # (B, T, C, h', w')
        plan = self.planner(z_low, mask)  # (B, T, N_low, D)
        recon = self.planner.project(plan, size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
        low = self.autoencoder.decode(recon)  # (B, T, 3, r, r), r = planner resolution
        up = resize_video(low, (h, w)).clamp(-1, 1)  # (B, T, 3, H, W)
        return torch.where(m, up, video)  # given frames untouched


def plan_free_pipeline(checkpoint: str | Path, allow_autoencoders: Collection[str] = ()):
    """The joint checkpoint's generator with the learned null plan (no planner): the other "DM only" reading."""
    from mardini.pipeline import MarDiniPipeline
    from mardini.pipeline.loading import load_checkpoint

    ld = load_checkpoint(checkpoint, allow_autoencoders=allow_autoencoders)
    return MarDiniPipeline(ld.generator, ld.autoencoder, None, ld.schedule, ld.planner_resolution, ld.window,
                           ld.resolution, ld.fps, kind="generation", info=ld.info, anchor=ld.anchor)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
def eval_args(clips: int, steps: int, metrics: list[str], cache_dir: Path,
              allow_autoencoders: Collection[str] = ()) -> argparse.Namespace:
    """The synthetic preset's settings (9 frames at 8 fps, 32 px, held-out split) as ``evaluate.py`` parses them;
    ``allow_autoencoders``: its ``--allow-autoencoder`` class paths (``args.allow_autoencoder``)."""
    from mardini.evaluation.arguments import parse_args

    allow = [a for path in allow_autoencoders for a in ("--allow-autoencoder", path)]
    return parse_args(["--preset", "synthetic", "--num-clips", str(clips), "--steps", str(steps),
                       "--metrics", *metrics, "--device", "cpu", "--missing-weights", "skip",
                       "--cache-dir", str(cache_dir), *allow])


def score(task: str, args: argparse.Namespace, samplers: dict[str, Any]) -> dict:
    """Every sampler on one task, same clips, masks and seeds (``mardini.evaluation.task_run.run_task``)."""
    from mardini.evaluation.data import resolve_source
    from mardini.evaluation.task_run import run_task

    kind, files = resolve_source(args.data)
    return run_task(task, args, samplers, kind, files, args.num_clips)


def table2(ckpts: dict[str, Path], args: argparse.Namespace) -> dict:
    """Interpolation: MAR only, DM only (two readings), MAR + DM, and the baselines."""
    from mardini.pipeline import MarDiniPipeline

    g, allow = DEFAULT_GUIDANCE["interpolation"], args.allow_autoencoder

    def pipeline(stage: str) -> PipelineSampler:
        return PipelineSampler(MarDiniPipeline.from_checkpoint(ckpts[stage], allow_autoencoders=allow), args.steps, g)

    samplers = {
        "mar_only": PlannerOnly(ckpts["03_mar_warmup"], allow_autoencoders=allow),
        "dm_only": pipeline("02_dm_warmup_9f"),
        "dm_only_null_plan": PipelineSampler(plan_free_pipeline(ckpts["05_joint_task"], allow), args.steps, g),
        "mar_dm": pipeline("05_joint_task"),
        **{name: cls() for name, cls in BASELINES.items()},
    }
    return score("interpolation", args, samplers)


TABLE2_NETWORKS = {"mar_only": ("03_mar_warmup", ("planner",)), "dm_only": ("02_dm_warmup_9f", ("generator",)),
                  "dm_only_null_plan": ("05_joint_task", ("generator",)),
                  "mar_dm": ("05_joint_task", ("planner", "generator"))}  # method: (checkpoint stage, networks used)


def table2_steps(ckpts: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{method: {network: training steps}}`` of Table 2's networks, from the chain checkpoints' step counts."""
    from mardini.reproduce.runs import training_steps

    return {m: {n: training_steps(ckpts, stage, n) for n in nets} for m, (stage, nets) in TABLE2_NETWORKS.items()}


def fig6a(joint: Path, args: argparse.Namespace, steps: list[int]) -> dict[str, dict]:
    """``{task: run_task result}`` with methods ``steps_<k>`` (the joint checkpoint) and the baselines."""
    from mardini.pipeline import MarDiniPipeline

    pipe = MarDiniPipeline.from_checkpoint(joint, allow_autoencoders=args.allow_autoencoder)
    out = {}
    for task in ("interpolation", "image_to_video"):
        samplers = {f"steps_{k}": PipelineSampler(pipe, k, DEFAULT_GUIDANCE[task]) for k in steps}
        samplers.update({name: cls() for name, cls in BASELINES.items()})
        out[task] = score(task, args, samplers)
    return out
