"""Start-up checks of a stage against its trainer and data: impossible combinations fail before the first step."""

from __future__ import annotations

from typing import Any

import torch

from mardini import cpu_kernels
from mardini.devices import check_supported, gpu_bf16_advice
from mardini.lit.checkpoints import made_before_dtypes, warn_unfingerprinted
from mardini.lit.fsdp import attached_trainer

RECACHE = "re-cache it with data/cache_latents.py into a new folder"


class StartupChecks:
    """:class:`~mardini.lit.base.MarDiniBase`'s ``setup`` and the checks it runs (precision, device, data settings,
    latent caches); the planner resolution's own check runs at construction."""

    def setup(self, stage: str) -> None:
        self.mask_templates = type(self.mask_sampler).templates  # a sampler set from Python since construction
        trainer = attached_trainer(self)
        if trainer is not None:  # before Lightning converts the networks to it
            _check_precision(getattr(trainer, "precision", "32-true"))
            check_supported(trainer.strategy.root_device, "--trainer.accelerator cpu (as the tiny configs) or a "
                                                          "CUDA GPU")
            _warn_if_bf16_is_emulated(getattr(trainer, "precision", "32-true"), trainer.strategy.root_device)
        if stage == "fit" and trainer is not None:
            self._check_loss_reduction(getattr(trainer, "accumulate_grad_batches", 1))
        dm = trainer.datamodule if trainer is not None else None
        if dm is not None:
            self.check_data_settings(getattr(dm, "resolution", None), getattr(dm, "frames", None),
                                     bool(getattr(dm, "latents", False)))
            if getattr(dm, "latents", False):
                self.check_latent_caches(dm)

    def check_latent_caches(self, dm: Any) -> None:
        """:meth:`check_latent_autoencoder` on the first shard of each cache folder of the training and of the
        validation pattern: a pattern joining caches (``::``, braces) of other latents would mix them, and a
        validation cache of other latents would score the model on inputs it never trained on."""
        from mardini.data.sharding import first_shard_per_folder, list_shards

        fingerprint = self.autoencoder.fingerprint()  # once: it reads every weight
        for shards in (getattr(dm, "train_shards", None), getattr(dm, "val_shards", None)):
            for shard in first_shard_per_folder(list_shards(shards)) if shards else ():
                self.check_latent_autoencoder(shard, fingerprint)

    def check_latent_autoencoder(self, shard: str, fingerprint: str | None = None) -> None:
        """Raise if a latent cache was encoded by another autoencoder (class or any argument but ``chunk_size``)
        than this model's: its networks would train on latents of another scale. A cache that recorded only some
        arguments is compared on those; one that recorded the autoencoder's fingerprint (weights and config) is
        compared on it too, and then not on the weights' path. A model with a planner also refuses a cache made for
        another ``planner_resolution`` (its planner would train at another size than it samples at).
        ``fingerprint``: this model's autoencoder's, when the caller has it already."""
        from mardini.data.shard_checks import first_json
        from mardini.lit.checkpoints import latent_spec_differences

        cache = first_json(shard).get("latent_cache") or {}
        if "planner" in self.networks:
            self._check_cached_planner_copy(shard, cache)
        theirs = cache.get("autoencoder") or {}
        ours = self.autoencoder.spec()
        recorded = cache.get("autoencoder_fingerprint")
        if recorded is None:
            warn_unfingerprinted(f"the latent cache {shard}", theirs, RECACHE)
        elif not self._cached_before_dtypes(shard, recorded, theirs):
            self._check_cached_fingerprint(shard, recorded, fingerprint or self.autoencoder.fingerprint(), theirs, ours)
        differ = latent_spec_differences(theirs, ours, same_fingerprint=recorded is not None)
        if differ:
            raise ValueError(
                f"the latent cache {shard} was encoded with {theirs.get('class_path')} {theirs.get('init_args')}, "
                f"this model encodes with {ours['class_path']} {ours.get('init_args')} (differ: {differ}); re-cache "
                "with data/cache_latents.py --autoencoder-kwargs matching model.init_args.autoencoder, or set the "
                "model's autoencoder to the cache's"
            )

    def _cached_before_dtypes(self, shard: str, recorded: str, their_spec: dict) -> bool:
        """Whether the cache is one this VAE, held in half precision, encoded before caches recorded the weights'
        dtype (:func:`~mardini.lit.checkpoints.made_before_dtypes`); accepted with a warning."""
        ae = self.autoencoder
        return made_before_dtypes(f"the latent cache {shard}", recorded, their_spec, ae.spec(), ae.fingerprint(),
                                  ae.fingerprint_before_dtypes, RECACHE)

    @staticmethod
    def _check_cached_fingerprint(shard: str, theirs: str, ours: str, their_spec: dict, our_spec: dict) -> None:
        """Raise unless the cache was encoded by an autoencoder of this one's weights and config."""
        from mardini.lit.checkpoints import weights_at

        if theirs == ours:
            return
        raise ValueError(
            f"the latent cache {shard} was encoded by an autoencoder of other weights or config (fingerprint "
            f"{theirs}, from {weights_at(their_spec)} when it was cached) than this model's ({ours}, "
            f"{weights_at(our_spec)}); "
            "its networks would train on other latents. Point model.init_args.autoencoder at the VAE the cache was "
            "encoded with, or re-cache with data/cache_latents.py and this one into a new folder"
        )

    def _check_cached_planner_copy(self, shard: str, cache: dict) -> None:
        """Raise unless the cache's planner copies are the ones this model makes of its frames: their size
        (``planner_copy``) against :func:`~mardini.data.transforms.planner_size` of the cached resolution at
        ``planner_resolution``; a cache written before ``planner_copy`` was recorded compares its
        ``planner_resolution`` as it did."""
        from mardini.data.transforms import as_size, planner_size

        low, copy, ours = cache.get("planner_resolution"), cache.get("planner_copy"), self.hparams.planner_resolution
        if copy is not None and cache.get("resolution"):
            made = list(planner_size(*as_size(cache["resolution"]), ours))
            if list(copy) != made:
                h, w = as_size(cache["resolution"])
                raise ValueError(
                    f"the latent cache {shard} holds planner copies at {list(copy)} of its {h}x{w} frames, "
                    f"model.planner_resolution={ours} makes them at {made}; re-cache with data/cache_latents.py "
                    f"--planner-resolution {ours} into a new folder, or set model.planner_resolution to "
                    f"{min(copy)} (the cache's short side)"
                )
        elif low is not None and list(low) != list(as_size(ours)):
            raise ValueError(
                f"the latent cache {shard} holds planner copies at {list(low)}, model.planner_resolution is "
                f"{ours}; re-cache with data/cache_latents.py --planner-resolution {ours} into a new folder, or set "
                "model.planner_resolution to the cache's"
            )

    def _check_planner_resolution(self) -> None:
        """Raise unless ``planner_resolution`` (the short side of the planner's copy) splits into the planner's
        tokens: a multiple of the autoencoder's factor x the planner's patch size. What the data's resolution adds
        (the long side, the plan grid's aspect ratio) is :meth:`check_data_settings`'s."""
        if "planner" not in self.networks:
            return
        f, patch = self.autoencoder.downsample, self.networks["planner"].cfg.patch_size
        low, step = self.hparams.planner_resolution, f * patch
        if low % step:
            near = " or ".join(str(v) for v in (low // step * step, low // step * step + step) if v >= step)
            raise ValueError(
                f"model.planner_resolution={low} is not divisible by {step} (the autoencoder's factor {f} x the "
                f"planner's patch size {patch}): the planner's copy would not split into its tokens; use a multiple "
                f"of {step}, e.g. {near}"
            )

    def check_data_settings(self, resolution: int | tuple[int, int] | None, frames: int | None,
                            latents: bool = False) -> None:
        """Raise naming the key when the data's resolution/frames cannot feed these networks."""
        f = self.autoencoder.downsample
        if frames is not None and self.frames is not None and self.frames > frames:
            raise ValueError(f"model.frames={self.frames} is more than data.frames={frames}; lower it or raise data.frames")
        if resolution is None or latents:
            return
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        low = self.hparams.planner_resolution
        if low > min(h, w):
            raise ValueError(
                f"model.planner_resolution={low} is larger than the training resolution data.resolution={resolution}; "
                "the planner sees a LOW-resolution copy: lower model.planner_resolution or raise data.resolution"
            )
        from mardini.data.transforms import unsplit_input

        patches = {n: self.networks[n].cfg.patch_size for n in ("generator", "planner") if n in self.networks}
        layout = "generator" not in self.networks or self.networks["generator"].cfg.cross_rope
        unsplit = unsplit_input(h, w, f, patches, low, layout)
        if unsplit is not None:
            name, size, step = unsplit
            fixes = _size_fixes(h, w, f, patches, low, layout)
            if name == "plan grid":
                g = f * patches["generator"]
                raise ValueError(
                    f"data.resolution={resolution} gives the generator a {h // g}x{w // g} token grid, but the "
                    f"planner's {size[0]}x{size[1]} copy (short side model.planner_resolution={low}) a "
                    f"{size[0] // step}x{size[1] // step} one, of another aspect ratio; the generator lays the plan "
                    f"out on its grid: {fixes}"
                )
            key = "data.resolution" if name == "generator" else "model.planner_resolution"
            raise ValueError(
                f"{key}={size[0] if size[0] == size[1] else size} is not divisible by {step} (the autoencoder's "
                f"factor {f} x the {name}'s patch size {patches[name]}): {fixes}"
            )


# trainer.precision; every stage config trains in bf16-mixed (16-mixed: a GradScaler, whose overflow steps are its own)
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_PRECISION_PROBLEMS = {
    "16-true": "it keeps the weights, the EMA and AdamW's moments in half precision, where small updates round away, "
               "and the planner's low-resolution copy of a clip cannot be resized in it",
    "64-true": "the networks would compute in fp64, but cached latents reach them in fp32",
}
_PRECISION_PROBLEMS["bf16-true"] = _PRECISION_PROBLEMS["16-true"]


def _check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` other than :data:`SUPPORTED_PRECISIONS`, naming why and ``bf16-mixed``:
    ``16-true`` / ``bf16-true`` (and Transformer Engine's, bf16 or fp16 weights) would train half-precision master
    weights, ``64-true`` fp64 networks on fp32 latents. Before, ``bf16-true`` trained a generator silently, its
    updates rounding away, and failed in the planner's resize naming neither the setting nor the fix."""
    if precision in SUPPORTED_PRECISIONS:
        return
    if str(precision).startswith("transformer-engine"):
        why = (f"Transformer Engine keeps the weights in {'fp16' if precision.endswith('float16') else 'bf16'} "
               "(and replaces the networks' layers), where AdamW's small updates round away")
    else:
        why = _PRECISION_PROBLEMS.get(precision, "the stages train in 32-true, bf16-mixed or 16-mixed only")
    raise ValueError(f"trainer.precision={precision} is not supported: {why}; use bf16-mixed (bf16 compute with fp32 "
                     "weights, EMA and optimiser state, as the stage configs) or 32-true")


def _warn_if_bf16_is_emulated(precision: str, device: torch.device) -> None:
    """A warning naming the fix for ``bf16-mixed`` on a CPU without native bf16 matrix multiplies
    (:func:`mardini.cpu_kernels.slow_bf16_advice`; the tiny configs' precision, which on such a laptop ran silently
    several times slower than fp32) or on an NVIDIA GPU older than Ampere (:func:`mardini.devices.gpu_bf16_advice`)."""
    if precision != "bf16-mixed":
        return
    if device.type == "cpu":
        advice = cpu_kernels.slow_bf16_advice()
    else:
        advice = gpu_bf16_advice(device, "bf16-mixed", "pass --trainer.precision 32-true (16-mixed, fp16 with loss "
                                                      "scaling, is faster there but untested here)")
    if advice is not None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(advice)


def _size_fixes(height: int, width: int, factor: int, patches: dict[str, int], planner_resolution: int,
                layout: bool) -> str:
    """The settings that make ``height x width`` training frames feed the networks: the nearest
    ``data.resolution`` at this ``planner_resolution``, the ``planner_resolution`` values nearest to it that work at
    this resolution, and else the nearest resolution the generator splits with a ``planner_resolution`` for it
    (:func:`~mardini.data.transforms.unsplit_input`)."""
    from mardini.data.transforms import nearest_fitting_size, planner_sides

    def nearest_sides(h: int, w: int) -> list[int]:
        sides = planner_sides(h, w, factor, patches, layout) if "planner" in patches else []
        return [s for s in sides if s < planner_resolution][-1:] + [s for s in sides if s > planner_resolution][:1]

    fixes = []
    size = nearest_fitting_size(height, width, factor, patches, planner_resolution, layout)
    if size:
        fixes.append(f"set data.resolution to [{size[0]}, {size[1]}] (the nearest size that fits "
                     f"model.planner_resolution={planner_resolution})")
    near = nearest_sides(height, width)
    if near:
        fixes.append(f"model.planner_resolution to {' or '.join(map(str, near))} (a short side whose copy of "
                     f"{height}x{width} frames fits)")
    else:
        split = nearest_fitting_size(height, width, factor, {"generator": patches.get("generator", 1)}, 1, layout)
        sides = nearest_sides(*split) if split and split != size else []
        if sides:
            fixes.append(f"data.resolution [{split[0]}, {split[1]}] with model.planner_resolution "
                         f"{' or '.join(map(str, sides))}")
    return ", or ".join(fixes) or "use a data.resolution whose sides are multiples of the generator's token size"
