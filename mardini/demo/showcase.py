"""Pictures for the report: contact sheets of the model next to ground truth and the baselines, GIFs/MP4s."""

from __future__ import annotations

from pathlib import Path

import torch

from mardini.evaluation.samplers import BASELINES
from mardini.masking import image_to_video_mask, interpolation_mask
from mardini.visualize import contact_sheet, save_gif, save_mp4


def showcase(pipe, video: torch.Tensor, keys: list[str], out: Path, steps: int = 25, i2v_guidance: float = 2.5,
             seed: int = 0, fps: float = 8.0, eta: float = 0.0) -> dict[str, list[str]]:
    """Sample interpolation and image-to-video for ``video (B, T, 3, H, W)`` and write the pictures.

    Per task: ``<task>_sheet.png`` (per clip: ground truth, each baseline, the model; given frames framed in green)
    and per clip a side-by-side ``<task>_<i>.gif`` / ``.mp4`` (ground truth | model). Returns the written paths.
    """
    b, t = video.shape[:2]
    written: dict[str, list[str]] = {}
    tasks = {"interpolation": (interpolation_mask(t), 1.0), "image_to_video": (image_to_video_mask(t), i2v_guidance)}
    for task, (row, scale) in tasks.items():
        mask = row[None].expand(b, -1)  # (B, T) True = generate
        rows: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        labels: list[str] = []
        model = pipe.generate(video, mask, steps=steps, guidance_scale=scale, seed=seed, progress=False,
                              eta=eta)  # (B, T, 3, H, W)
        baselines = {name: make()(video, mask, seed) for name, make in BASELINES.items()}
        for i in range(b):
            entries = [("truth", video[i])] + [(name, out_b[i]) for name, out_b in baselines.items()]
            entries.append(("MarDini", model[i]))
            for label, clip in entries:
                rows.append(clip)
                masks.append(mask[i] if label != "truth" else torch.zeros_like(mask[i]))
                labels.append(f"{keys[i][-6:]} {label}")
        sheet = contact_sheet(torch.stack(rows), out / f"{task}_sheet.png", mask=torch.stack(masks), row_labels=labels)
        files = [str(sheet)]
        for i in range(b):
            pair = torch.cat([video[i], model[i]], dim=-1)[None]  # (1, T, 3, H, 2W): truth | model
            files.append(str(save_gif(pair[0], out / f"{task}_{i}.gif", fps=fps)))
            files.append(str(save_mp4(pair[0], out / f"{task}_{i}.mp4", fps=fps)))
        written[task] = files
    return written
