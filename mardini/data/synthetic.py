"""The embedded synthetic data set, "bouncing shapes": deterministic clips with ground-truth positions.

Each clip holds 2-5 objects (circle, square, triangle, diamond) of distinct saturated colours and random sizes,
moving at constant velocity and bouncing off the walls, drawn in a fixed order (later = nearer, so they
occlude earlier ones) over a smooth random background (a two-colour gradient plus a low-frequency pattern).
Everything comes from ``numpy.random.default_rng(seed)``: the same seed gives the same clip at any size.

Positions are exact (a closed-form triangle wave, no time stepping), normalised to [0, 1] as (x, y) of the
frame width and height. Edges are anti-aliased with a one-pixel signed-distance ramp (no supersampling needed).
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------------
# Demo defaults (a later issue trains a tiny model on these; reuse them instead of copying numbers)
# --------------------------------------------------------------------------------------------------

DEMO_HEIGHT = 64  # rendered frame size
DEMO_WIDTH = 64
DEMO_FPS = 16.0  # rendered frame rate
DEMO_FRAMES = 32  # rendered frames per clip
DEMO_TRAIN_CLIPS = 2000
DEMO_VAL_CLIPS = 64
DEMO_TRAIN_PER_SHARD = 100  # 20 train shards
DEMO_VAL_PER_SHARD = 8  # 8 val shards: enough for 4 ranks x 2 workers
DEMO_LOADER_FRAMES = 9  # what the loader samples ...
DEMO_LOADER_FPS = 8.0  # ... at this frame rate ...
DEMO_LOADER_RESOLUTION = 32  # ... resized to this square size

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Saturated, well-separated colours (RGB in [0, 1]); objects of one clip never share a colour.
PALETTE = np.array(
    [
        [0.95, 0.15, 0.15],  # red
        [0.15, 0.85, 0.20],  # green
        [0.20, 0.35, 0.95],  # blue
        [0.98, 0.90, 0.10],  # yellow
        [0.90, 0.20, 0.90],  # magenta
        [0.10, 0.90, 0.90],  # cyan
        [1.00, 0.55, 0.05],  # orange
        [0.98, 0.98, 0.98],  # white
    ],
    dtype=np.float32,
)
PALETTE_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
MAX_OBJECTS = len(PALETTE)


# --------------------------------------------------------------------------------------------------
# Motion
# --------------------------------------------------------------------------------------------------


def bounce(p0: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Positions of points moving at constant velocity between walls, reflected elastically.

    Args:
        p0, v, lo, hi: ``(K, 2)`` start, velocity per frame, and the wall limits of the centre.
        t: ``(T,)`` frame times.
    Returns ``(T, K, 2)``: a triangle wave of period ``2 (hi - lo)`` (exact, no time stepping).
    """
    span = np.maximum(hi - lo, 1e-9)  # (K, 2)
    u = np.mod(p0 - lo + v * t[:, None, None], 2 * span)  # (T, K, 2) in [0, 2 span)
    return lo + span - np.abs(u - span)  # (T, K, 2) in [lo, hi]


# --------------------------------------------------------------------------------------------------
# Drawing: signed distances in pixels, negative inside
# --------------------------------------------------------------------------------------------------


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels) of offsets ``(dx, dy)`` from the centre to a shape of circumradius ``r``."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        s = r / np.sqrt(2.0)  # half side, so the corners lie on the circumcircle
        return np.maximum(np.abs(dx), np.abs(dy)) - s
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2.0)
    if shape == "triangle":  # equilateral, apex up, centroid at the centre; max of the 3 edge distances
        half = r / 2.0  # inradius
        d1 = dy - half  # bottom edge (image y grows downwards)
        d2 = (-np.sqrt(3.0) * dx - dy) / 2.0 - half  # upper-left edge
        d3 = (np.sqrt(3.0) * dx - dy) / 2.0 - half  # upper-right edge
        return np.maximum(np.maximum(d1, d2), d3)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted two-colour gradient plus a low-frequency sinusoidal pattern. ``(H, W, 3)`` float32 in [0, 1]."""
    yy, xx = np.meshgrid(
        (np.arange(height, dtype=np.float32) + 0.5) / height,
        (np.arange(width, dtype=np.float32) + 0.5) / width,
        indexing="ij",
    )  # (H, W) each
    c0, c1 = rng.uniform(0.05, 0.45, size=(2, 3)).astype(np.float32)  # (3,) muted colours
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy  # (H, W)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # (H, W) in [0, 1]
    img = c0 + (c1 - c0) * ramp[..., None]  # (H, W, 3)
    fx, fy = rng.uniform(0.5, 3.0, size=2)  # cycles per frame
    phase = rng.uniform(0, 2 * np.pi, size=2)
    pattern = np.sin(2 * np.pi * fx * xx + phase[0]) * np.sin(2 * np.pi * fy * yy + phase[1])  # (H, W)
    tint = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)  # (3,)
    img = img + 0.08 * pattern[..., None] * tint  # (H, W, 3)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------------


def render_clip(
    seed: int,
    frames: int = DEMO_FRAMES,
    height: int = DEMO_HEIGHT,
    width: int = DEMO_WIDTH,
    objects: tuple[int, int] = (2, 5),
    size: tuple[float, float] = (0.08, 0.2),
    speed: tuple[float, float] = (0.01, 0.04),
    fps: float = DEMO_FPS,
) -> tuple[np.ndarray, dict]:
    """Render one bouncing-shapes clip.

    Args:
        seed: the clip's seed (any int >= 0); fixes everything drawn.
        frames, height, width: clip size in frames and pixels (any, >= 1 / >= 4).
        objects: ``(min, max)`` number of objects, at most :data:`MAX_OBJECTS` (one colour each).
        size: ``(min, max)`` circumradius as a fraction of ``min(height, width)``.
        speed: ``(min, max)`` speed as a fraction of the frame per frame.
        fps: frame rate written to the metadata.
    Returns:
        ``video`` uint8 ``(T, H, W, 3)`` and ``meta``: ``seed, fps, frames, height, width, source="synthetic",
        positions`` (list ``(T, K, 2)`` of (x, y) in [0, 1]) and ``objects`` (list of K dicts: ``shape, color``
        name, ``rgb`` in [0, 1], ``radius`` (fraction of min side), ``velocity`` (x, y per frame, normalised),
        ``depth`` (0 = farthest; higher occludes lower)).
    """
    if frames < 1 or height < 4 or width < 4:
        raise ValueError(f"need frames >= 1 and height, width >= 4, got frames={frames} height={height} width={width}")
    lo_k, hi_k = objects
    if not 1 <= lo_k <= hi_k <= MAX_OBJECTS:
        raise ValueError(f"objects must satisfy 1 <= min <= max <= {MAX_OBJECTS} (one colour each), got {objects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(lo_k, hi_k + 1))
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=k)]
    colors = rng.permutation(len(PALETTE))[:k]  # (K,) distinct palette indices
    side = min(height, width)
    radius = rng.uniform(size[0], size[1], size=k)  # (K,) fraction of the short side
    r_norm = np.stack([radius * side / width, radius * side / height], axis=1)  # (K, 2) in x, y units
    lo, hi = r_norm, 1.0 - r_norm  # (K, 2) walls for the centre
    p0 = lo + rng.uniform(0, 1, size=(k, 2)) * np.maximum(hi - lo, 0)  # (K, 2)
    theta = rng.uniform(0, 2 * np.pi, size=k)  # (K,)
    speed_k = rng.uniform(speed[0], speed[1], size=k)  # (K,)
    vel = np.stack([np.cos(theta), np.sin(theta)], axis=1) * speed_k[:, None]  # (K, 2)
    pos = bounce(p0, vel, lo, hi, np.arange(frames, dtype=np.float64))  # (T, K, 2)

    # Draw each object only inside a moving patch around it (exact: the ramp is 0 beyond r + 1 px).
    half = [int(np.ceil(radius[j] * side)) + 2 for j in range(k)]  # patch half-sizes (px)
    pad = max(half)
    canvas = np.zeros((frames, height + 2 * pad, width + 2 * pad, 3), dtype=np.float32)  # (T, H+2p, W+2p, 3)
    canvas[:, pad : pad + height, pad : pad + width] = _background(rng, height, width)
    for j in range(k):  # draw order = depth: later objects occlude earlier ones
        cx = pos[:, j, 0] * width  # (T,) pixels
        cy = pos[:, j, 1] * height  # (T,)
        ar = np.arange(-half[j], half[j] + 1)  # (P,)
        xs = np.floor(cx).astype(np.int64)[:, None] + ar  # (T, P) pixel columns
        ys = np.floor(cy).astype(np.int64)[:, None] + ar  # (T, P) pixel rows
        dx = (xs + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]  # (T, 1, P)
        dy = (ys + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]  # (T, P, 1)
        d = _signed_distance(shapes[j], dx, dy, float(radius[j] * side))  # (T, P, P) pixels
        alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]  # (T, P, P, 1) one-pixel anti-aliasing ramp
        color = PALETTE[colors[j]]  # (3,)
        for t in range(frames):  # per-frame slices are views: cheaper than a fancy-indexed scatter
            y0, x0 = ys[t, 0] + pad, xs[t, 0] + pad
            patch = canvas[t, y0 : y0 + len(ar), x0 : x0 + len(ar)]  # (P, P, 3) view
            patch += alpha[t] * (color - patch)  # (P, P, 3)
    img = canvas[:, pad : pad + height, pad : pad + width]  # (T, H, W, 3)
    video = np.rint(img * 255.0).astype(np.uint8)  # (T, H, W, 3)

    meta = {
        "source": "synthetic",
        "seed": int(seed),
        "fps": float(fps),
        "frames": int(frames),
        "height": int(height),
        "width": int(width),
        "positions": pos.round(6).tolist(),
        "objects": [
            {
                "shape": shapes[j],
                "color": PALETTE_NAMES[colors[j]],
                "rgb": PALETTE[colors[j]].round(4).tolist(),
                "radius": round(float(radius[j]), 6),
                "velocity": vel[j].round(6).tolist(),
                "depth": j,
            }
            for j in range(k)
        ],
    }
    return video, meta
