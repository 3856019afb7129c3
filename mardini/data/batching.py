"""A batch from a worker's samples (:func:`collate`), the clip-less marker that carries only its skips
(:func:`skip_only`) and the zero-weight copy a rank's short validation pass runs in place of the batches it lacks
(:func:`padding_of`)."""

from __future__ import annotations

import torch


def collate(samples: list[dict], skipped: int = 0) -> dict:
    """Stack samples into a batch dict; ``positions`` NaN-padded to the most objects in the batch."""
    batch: dict = {}
    for name in ("video", "z_high", "z_low"):
        if name in samples[0]:
            shapes = {tuple(s[name].shape) for s in samples}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch {name} of different shapes {sorted(shapes)}")
            batch[name] = torch.stack([s[name] for s in samples])  # (B, T, C, H, W)
    batch["fps"] = torch.tensor([s["fps"] for s in samples], dtype=torch.float32)  # (B,)
    batch["key"] = [s["key"] for s in samples]
    if "meta" in samples[0]:
        batch["meta"] = [dict(s["meta"], frame_indices=s.get("indices"), crop=s.get("crop")) for s in samples]
    if any("positions" in s for s in samples):
        t = next(iter(batch.values())).shape[1]
        k = max(s["positions"].shape[1] for s in samples if "positions" in s)
        pos = torch.full((len(samples), t, k, 2), float("nan"))  # (B, T, K, 2)
        for i, s in enumerate(samples):
            if "positions" in s:
                pos[i, :, : s["positions"].shape[1]] = s["positions"]
        batch["positions"] = pos
    batch["skipped"] = torch.tensor(skipped, dtype=torch.long)
    return batch


def skip_only(batch: dict) -> bool:
    """True for a finite split's skip-only marker ``{"skipped": n}`` (no clips): count it, never train on it."""
    return "key" not in batch


def padding_of(batch: dict) -> dict:
    """A copy of ``batch`` that weighs 0 in every validation sum (``padding``: True; no skips of its own): what a rank
    whose finite pass ran short of the steps every rank must run (FSDP) runs in place of each missing batch
    (:class:`~mardini.data.stream_loader.StreamLoader`)."""
    return {**batch, "skipped": torch.tensor(0, dtype=torch.long), "padding": True}


def is_padding(batch: dict) -> bool:
    """True for a padding batch (:func:`padding_of`): run it (the other ranks' collectives wait on it), count nothing."""
    return bool(batch.get("padding", False))
