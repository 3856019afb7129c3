"""Evaluation metrics: FVD (I3D), FID over frames (InceptionV3), middle-frame PSNR/SSIM/LPIPS.

See README.md in this folder for the preprocessing of each metric, protocol names and how to get the weights.
"""

from mardini.metrics.fid import FrameFID
from mardini.metrics.frame_metrics import MidFrameMetrics, build_lpips, middle_frame
from mardini.metrics.frechet import frechet_distance
from mardini.metrics.fvd import FrechetVideoDistance
from mardini.metrics.i3d import I3D, MIN_FRAMES, build_i3d, i3d_preprocess, load_i3d_weights
from mardini.metrics.inception import InceptionV3Features, build_inception

__all__ = [
    "I3D",
    "MIN_FRAMES",
    "FrameFID",
    "FrechetVideoDistance",
    "InceptionV3Features",
    "MidFrameMetrics",
    "build_i3d",
    "build_inception",
    "build_lpips",
    "frechet_distance",
    "i3d_preprocess",
    "load_i3d_weights",
    "middle_frame",
]
