"""What deterministic H.264 encoding costs: ``mardini.data.encode.encode_mp4`` (one x264 thread, its C code paths:
the same bytes on every call and machine) against x264's defaults (threads by core count, SIMD code paths), which
the sharder used before; the same clip, alternating rounds.

    .venv/bin/python -m bench.encode_mp4 [--rounds 5] [--frames 48] [--side 512] [--quick]

Reports the median seconds per encode of each and their ratio (``bench/results/encode_mp4.json``), and whether the
deterministic one gave one set of bytes over its rounds; absolute times depend on the load.
"""

from __future__ import annotations

import argparse
import io
import sys

import av
import numpy as np

from bench.common import command, machine, median, timed, write_result
from mardini.data.encode import as_rate, encode_mp4


def encode_with_x264_defaults(frames: np.ndarray, fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """``encode_mp4`` as it was before it was made deterministic: x264's own threads and code paths."""
    _, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=as_rate(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def moving_clip(frames: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(T, side, side, 3)``: a textured image panning 3 px per frame (motion for the encoder to find)."""
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return np.stack([np.roll(smooth, 3 * i, axis=1) for i in range(frames)])  # (T, side, side, 3)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.encode_mp4", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--quick", action="store_true", help="2 rounds of 8 frames at 64 px (the smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.frames, a.side = 2, 8, 64
    clip = moving_clip(a.frames, a.side)
    runs = {"deterministic": lambda: encode_mp4(clip, a.fps), "x264_defaults": lambda: encode_with_x264_defaults(clip, a.fps)}
    for fn in runs.values():  # warm-up: codec set-up, allocations
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: set[bytes] = set()
    for _ in range(a.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
        outputs.add(encode_mp4(clip, a.fps))
    m = {name: median(ts) for name, ts in times.items()}
    result = {"command": command("bench.encode_mp4", argv), "machine": machine(),
              "settings": {"rounds": a.rounds, "frames": a.frames, "side": a.side, "fps": a.fps},
              "median_s": m, "deterministic_over_defaults": m["deterministic"] / m["x264_defaults"],
              "deterministic_outputs": len(outputs)}
    path = write_result("encode_mp4", result)
    print(f"{a.frames} frames of {a.side}x{a.side}: deterministic {m['deterministic']:.3f} s, x264 defaults "
          f"{m['x264_defaults']:.3f} s per encode: {result['deterministic_over_defaults']:.2f}x; "
          f"{len(outputs)} distinct output(s) of the deterministic encoder over {a.rounds} rounds -> {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
