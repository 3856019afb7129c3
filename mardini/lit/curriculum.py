"""In-stage curriculum: move the kept fraction, the clip length, the task mix and the DM attention by step.

A stage YAML lists milestones; at every training step the callback applies the last milestone whose
``step`` has been reached (and, with ``interpolate``, moves the keep-ratio range linearly towards the next
milestone that sets one). The position is a pure function of ``global_step``, so a resumed run lands in the same
place; the callback's state is still saved so a changed schedule on resume is noticed. A milestone at step 0
replaces the model's own keep ratio, templates, frames and attention: the fit's start warns naming those it changes.
A milestone's templates are those the model's mask sampler declares (``model.init_args.mask_sampler``), checked at
the fit's start. Outside a fit (``train.py validate``) the callback applies the settings the scored checkpoint's last
training step drew with, so a validate scores a checkpoint under the masks the fit validated it with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mardini.masking import MaskSampler, check_keep_ratio, check_template_probs

INTERPOLATED = ("keep_ratio",)  # the settings ``interpolate`` moves linearly instead of in steps
RULE = 2  # the interpolation rule in checkpoints: 2 ramps across milestones that leave a setting unset (1 held it)


@dataclass
class Milestone:
    """Settings that hold from ``step`` on; ``None`` leaves a setting as it is."""

    step: int
    keep_ratio: tuple[float, float] | None = None
    frames: int | None = None
    attention: str | None = None  # "st" | "t": the generator's temporal layer
    templates: dict[str, float] | None = None


class Curriculum(L.Callback):
    """Applies :class:`Milestone` s to the module during training (outside a fit, those of the checkpoint's step).

    Args:
        milestones: in increasing ``step`` order.
        interpolate: move the keep-ratio range linearly from each milestone that sets one to the next that does
            (milestones between them that leave it unset do not hold it) instead of in steps.
    """

    def __init__(self, milestones: list[Milestone], interpolate: bool = False) -> None:
        steps = [m.step for m in milestones]
        if not milestones:
            raise ValueError("Curriculum needs at least one milestone")
        if steps != sorted(steps) or len(set(steps)) != len(steps) or steps[0] < 0:
            raise ValueError(f"curriculum milestone steps must be >= 0 and strictly increasing, got {steps}")
        for m in milestones:
            if m.attention not in (None, "st", "t"):
                raise ValueError(f"milestone at step {m.step}: attention={m.attention!r} must be 'st' or 't'")
            if m.frames is not None and m.frames < 2:
                raise ValueError(f"milestone at step {m.step}: frames={m.frames} must be >= 2")
            if m.keep_ratio is not None:
                check_keep_ratio(m.keep_ratio)
            if m.templates is not None:  # their names: the model's sampler's (check_templates, at the fit's start)
                check_template_probs(m.templates)
        self.milestones = milestones
        self.interpolate = interpolate
        self.applied: int | None = None
        self._loaded_step: int | None = None  # global_step of the checkpoint this trainer run loaded, if any

    # ----------------------------------------------------------------------------------------------
    def settings_at(self, step: int) -> dict:
        """The merged settings in force at ``step``; with ``interpolate``, each of :data:`INTERPOLATED` is
        interpolated between the last milestone at or before ``step`` that sets it and the next one that sets it."""
        merged: dict = {}
        index = -1
        for i, m in enumerate(self.milestones):
            if m.step <= step:
                index = i
                merged.update({k: v for k, v in asdict(m).items() if v is not None and k != "step"})
        for key in INTERPOLATED:
            setting = [m for m in self.milestones if getattr(m, key) is not None]
            before, after = [m for m in setting if m.step <= step], [m for m in setting if m.step > step]
            if self.interpolate and before and after:
                a, b = before[-1], after[0]
                w = (step - a.step) / (b.step - a.step)
                merged[key] = tuple(x + w * (y - x) for x, y in zip(getattr(a, key), getattr(b, key)))
        merged["index"] = index
        return merged

    def apply(self, pl_module: L.LightningModule, step: int) -> None:
        s = self.settings_at(step)
        if "keep_ratio" in s or "templates" in s:
            old = pl_module.mask_sampler  # a MaskSampler subclass stays one (and keeps its other fields)
            pl_module.mask_sampler = replace(
                old, keep_ratio=tuple(s.get("keep_ratio", old.keep_ratio)),
                template_probs=dict(s.get("templates", old.template_probs)),
            )
        if "frames" in s:
            pl_module.frames = int(s["frames"])
        if "attention" in s and "generator" in pl_module.networks:
            pl_module.networks["generator"].set_attention(s["attention"])
            pl_module.ema.module["generator"].set_attention(s["attention"])
        if s["index"] != self.applied:
            rank_zero_info(f"curriculum: step {step} -> milestone {s['index']}: "
                           f"{ {k: v for k, v in s.items() if k != 'index'} }")
            self.applied = s["index"]

    # ----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_frames(getattr(getattr(trainer, "datamodule", None), "frames", None))
        self.check_templates(pl_module.mask_sampler)
        self.warn_replaced(pl_module)
        self.apply(pl_module, trainer.global_step)

    def warn_replaced(self, pl_module: L.LightningModule) -> None:
        """Warn (rank zero) naming each model setting (keep ratio, templates, frames, the generator's attention) that
        a milestone at step 0 replaces with another value before any training: the model's value has no effect."""
        first = self.milestones[0]
        if first.step != 0:
            return
        generator = pl_module.networks["generator"] if "generator" in pl_module.networks else None
        sampler = pl_module.mask_sampler
        pairs = [  # (name, the model's value, the milestone's)
            ("keep_ratio", tuple(sampler.keep_ratio), None if first.keep_ratio is None else tuple(first.keep_ratio)),
            ("templates", dict(sampler.template_probs), first.templates),
            ("frames", pl_module.frames, first.frames),
            ("generator.attention", getattr(generator, "attention_mode", None), first.attention),
        ]
        replaced = [f"model.init_args.{name}={ours!r} with {theirs!r}" for name, ours, theirs in pairs
                    if ours is not None and theirs is not None and ours != theirs]
        if replaced:
            rank_zero_warn(f"curriculum: the milestone at step 0 replaces {'; '.join(replaced)}, so the model's value "
                           "is never trained: the Curriculum's milestones decide these settings; edit them (the stage "
                           "YAML's trainer.callbacks, or --trainer.callbacks) or give the model the milestone's value")

    def check_frames(self, data_frames: int | None) -> None:
        """Raise at the start of the fit, not when the milestone is reached, if a milestone asks for more frames
        than the data's window holds."""
        too_long = [m for m in self.milestones if m.frames is not None and data_frames is not None
                    and m.frames > data_frames]
        if too_long:
            m = too_long[0]
            raise ValueError(f"curriculum milestone at step {m.step}: frames={m.frames} is more than the data's "
                             f"window of {data_frames} (data.frames); lower the milestone's frames or raise data.frames")

    def check_templates(self, sampler: MaskSampler) -> None:
        """Raise at the start of the fit, not when the milestone is reached, if a milestone names templates that the
        model's mask sampler class does not declare."""
        declared = type(sampler).templates
        for m in self.milestones:
            unknown = sorted(set(m.templates or {}) - set(declared))
            if unknown:
                raise ValueError(
                    f"curriculum milestone at step {m.step}: templates {unknown} are not declared by the model's mask "
                    f"sampler {type(sampler).__name__} (its templates: {list(declared)}); remove them from the "
                    "milestone, or set model.init_args.mask_sampler to a MaskSampler subclass that declares them")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.apply(pl_module, trainer.global_step)
        if "generator" in pl_module.networks and any(m.attention is not None for m in self.milestones):
            st = pl_module.networks["generator"].attention_mode == "st"  # the switch this curriculum moves
            pl_module.log("curriculum/attention_st", float(st), on_step=True, on_epoch=False)

    # ----------------------------------------------------------------------------------------------
    # Outside a fit: the settings the checkpoint was trained (and validated) with
    # ----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._loaded_step = None  # on_load_checkpoint sets it when this run loads one

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._loaded_step = checkpoint.get("global_step")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Outside a fit (``validate``), apply the settings in force at the end of the training that gave the weights
        (:meth:`step_in_force`), so the validation draws the masks, frames and attention the fit's validation drew at
        that step; before, a validate used the model's own settings (milestone 0's) whatever the checkpoint's step.
        During a fit nothing changes: validation uses what the last training batch applied."""
        if trainer.state.fn == TrainerFn.FITTING:
            return
        self.check_frames(getattr(getattr(trainer, "datamodule", None), "frames", None))
        self.check_templates(pl_module.mask_sampler)
        step = self._loaded_step if self._loaded_step is not None else trainer.global_step
        self.apply(pl_module, self.step_in_force(int(step)))

    @staticmethod
    def step_in_force(global_step: int) -> int:
        """The step whose settings weights saved at ``global_step`` were last trained with: the last training batch
        ran at ``global_step - 1`` (the Curriculum applies at each batch's start, and the optimiser step then counts
        it), and a fit's validation after it uses that batch's settings. 0 for weights not trained yet."""
        return max(int(global_step) - 1, 0)

    def state_dict(self) -> dict:
        """The milestone applied last and the settings (milestones, ``interpolate``, the ramp rule), which a resume
        and ``python -m mardini.reproduce --checkpoints`` compare; ``interpolate`` is saved since 2026-12-07."""
        return {"applied": self.applied, "milestones": [asdict(m) for m in self.milestones],
                "interpolate": self.interpolate, "rule": RULE}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("milestones")
        if saved is not None and saved != [asdict(m) for m in self.milestones]:
            rank_zero_info("curriculum: the milestones differ from the resumed checkpoint's; using the new ones")
        if state_dict.get("interpolate", self.interpolate) != self.interpolate:
            rank_zero_info(f"curriculum: interpolate={self.interpolate} where the resumed checkpoint's was "
                           f"{state_dict['interpolate']}; using the new one")
        if state_dict.get("rule", 1) != RULE and self.ramps_across_unset():
            rank_zero_warn("curriculum: the resumed checkpoint was written when the keep ratio ramped only between "
                           "neighbouring milestones; it now ramps across the milestones that do not set one, so from "
                           "here this schedule's keep ratio differs from what the run trained with so far")
        self.applied = state_dict.get("applied")

    def ramps_across_unset(self) -> bool:
        """Whether ``interpolate`` ramps the keep ratio across a milestone that does not set one (where the rule before
        :data:`RULE` 2 held it instead)."""
        setting = [i for i, m in enumerate(self.milestones) if m.keep_ratio is not None]
        return self.interpolate and any(b - a > 1 for a, b in zip(setting, setting[1:]))
