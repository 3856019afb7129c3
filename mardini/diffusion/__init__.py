"""Diffusion math for the generation model: schedule, masked loss, guidance, DDIM sampler.

What the paper fixes: v-prediction, DDIM sampling, CFG on the planning signal (2.5 for I2V, none for
interpolation). Our defaults: cosine schedule in continuous time t in [0, 1] (0 = clean), a 1000-step training
grid with uniform t, unweighted MSE on the masked frames only, which training averages per clip
(:func:`masked_mse_per_sample`, then the mean over the batch; :func:`masked_mse` is the per-element mean). Beyond the paper, :class:`FrameAnchor` can make the
diffused variable each generated frame's change from its nearest given frame (``model.anchor``; off by default).
"""

from mardini.diffusion.anchor import FrameAnchor
from mardini.diffusion.ddim import DDIMSampler, ddim_sample, ddim_update
from mardini.diffusion.guidance import DenoiseFn, guided_denoise_fn, guided_velocity
from mardini.diffusion.loss import masked_mse, masked_mse_per_sample
from mardini.diffusion.schedule import CosineSchedule

__all__ = [
    "CosineSchedule",
    "DDIMSampler",
    "DenoiseFn",
    "FrameAnchor",
    "ddim_sample",
    "ddim_update",
    "guided_denoise_fn",
    "guided_velocity",
    "masked_mse",
    "masked_mse_per_sample",
]
