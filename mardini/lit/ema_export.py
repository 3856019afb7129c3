"""EMA-only copies of MarDini checkpoints: the weights sampling and evaluation read, for sharing and moving.

    python -m mardini.lit.ema_export outputs/tiny/05_joint_task/checkpoints/last.ckpt tiny_joint_ema.ckpt

A training checkpoint holds the raw networks, their EMA and the optimizer state; the export keeps the EMA weights,
the hyper-parameters, the callback states and the ``mardini`` metadata (about a quarter of the tiny joint
checkpoint; the command prints both sizes). It samples, evaluates and validates like the original (``sample.py``,
``evaluate.py``, the pipeline and ``train.py validate --ckpt_path`` read the EMA), and a stage can start from it
(``model.init_args.init_from``: raw and EMA weights both start from the EMA ones). It cannot resume a fit: nothing
of the optimizer or the loops is left.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mardini.lit.checkpoint_io import atomic_torch_save
from mardini.lit.checkpoints import EMA_PREFIX, KINDS, check_metadata, read_checkpoint

DROPPED = ("optimizer_states", "lr_schedulers", "loops")  # callback states stay: the curriculum's last milestone


def ema_only(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """The checkpoint without raw weights, optimizer, schedulers and loop states (callback states stay: sampling
    reads the frames and attention of the curriculum's last milestone from them)."""
    check_metadata(checkpoint, KINDS, path)
    ema = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMA_PREFIX)}
    if not ema:
        raise ValueError(f"{path} holds no EMA weights ('{EMA_PREFIX}*'); export the training checkpoint itself")
    out = {k: v for k, v in checkpoint.items() if k not in DROPPED and k != "state_dict"}
    out["state_dict"] = ema
    out["mardini"] = {**checkpoint["mardini"], "ema_only": True}
    return out


def export_ema_only(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write ``ema_only(src)`` to ``dst`` atomically; returns a summary (step, bytes before and after)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"the export would overwrite its source {src}; name another output file")
    ckpt = read_checkpoint(src)
    atomic_torch_save(ema_only(ckpt, src), dst)
    return {"source": str(src), "out": str(dst), "kind": ckpt["mardini"]["kind"], "step": ckpt.get("global_step"),
            "bytes_in": src.stat().st_size, "bytes_out": dst.stat().st_size}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training checkpoint written by train.py")
    p.add_argument("out", help="where to write the EMA-only copy")
    a = p.parse_args(argv)
    s = export_ema_only(a.checkpoint, a.out)
    print(f"{s['out']}: {s['kind']} checkpoint at step {s['step']}, EMA weights only "
          f"({s['bytes_out'] / 1e6:.1f} MB, from {s['bytes_in'] / 1e6:.1f} MB)")
    return s


if __name__ == "__main__":
    main()
