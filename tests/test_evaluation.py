"""Fast tests of the evaluation layer: baselines, trajectory error, protocol checks, metric suite and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mardini.data.synthetic import render_clip
from mardini.data.transforms import resize_video
from mardini.evaluation import EvalProtocol, EvalSuite, LinearBlend, NearestFrame, RealStatsCache, TrajectoryError
from mardini.evaluation.samplers import make_sampler
from mardini.evaluation.trajectory import object_colours
from mardini.masking import image_to_video_mask, interpolation_mask, mask_from_given, nearest_given, neighbour_given
from mardini.metrics.stand_ins import FramePool, VideoPool, stand_ins  # the pretrained ones: test_metrics_slow.py


def synthetic_batch(n: int, frames: int = 9, size: int = 32, seed0: int = 100):
    """Real synthetic clips: video (B, T, 3, S, S) in [-1, 1], positions (B, T, K, 2) NaN-padded, metas."""
    vids, poss, metas = [], [], []
    for i in range(n):
        v, meta = render_clip(seed0 + i, frames=frames, height=64, width=64)
        vids.append(torch.from_numpy(v).permute(0, 3, 1, 2).float() / 127.5 - 1)  # (T, 3, 64, 64)
        poss.append(torch.tensor(meta["positions"], dtype=torch.float32))  # (T, K, 2)
        metas.append(meta)
    k = max(p.shape[1] for p in poss)
    pos = torch.full((n, frames, k, 2), float("nan"))
    for i, p in enumerate(poss):
        pos[i, :, : p.shape[1]] = p
    video = resize_video(torch.stack(vids), size).clamp(-1, 1)  # (B, T, 3, S, S)
    return video, pos, metas


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------
def ramp_video(b=2, t=9, h=4, w=5):
    """Pixels change linearly in time: frame i = a + i * d."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(b, 1, 3, h, w, generator=g) - 0.5
    d = (torch.rand(b, 1, 3, h, w, generator=g) - 0.5) / t
    return a + d * torch.arange(t).view(1, t, 1, 1, 1)  # (B, T, 3, H, W)


def test_linear_blend_is_exact_on_a_linear_ramp():
    video = ramp_video()
    for given in ([0, 8], [0, 3, 8], [2, 5]):  # interpolation, a middle key, and one-sided ends
        mask = mask_from_given(9, given).expand(2, -1)
        noisy = torch.where(mask[..., None, None, None], torch.randn_like(video), video)  # hide generated frames
        out = LinearBlend()(noisy, mask, seed=0)
        inner = slice(min(given), max(given) + 1)
        torch.testing.assert_close(out[:, inner], video[:, inner], atol=1e-6, rtol=0)
    mask = image_to_video_mask(9).expand(2, -1)  # one given frame: repeated
    out = LinearBlend()(video, mask, 0)
    torch.testing.assert_close(out, video[:, :1].expand_as(video))


def test_nearest_frame_repeats_the_nearest_given_frame():
    video = torch.arange(9.0).view(1, 9, 1, 1, 1).expand(1, 9, 3, 2, 2) / 10  # frame i holds i / 10
    mask = mask_from_given(9, [0, 5, 8])[None]
    out = NearestFrame()(video, mask, 0)
    assert (out[0, :, 0, 0, 0] * 10).round().tolist() == [0, 0, 0, 5, 5, 5, 5, 8, 8]  # ties go earlier
    interp = NearestFrame()(video, interpolation_mask(9)[None], 0)
    assert (interp[0, :, 0, 0, 0] * 10).round().tolist() == [0, 0, 0, 0, 0, 8, 8, 8, 8]


def test_neighbour_given_and_sampler_factory():
    prev, nxt = neighbour_given(mask_from_given(5, [1, 3])[None])
    assert prev.tolist() == [[-1, 1, 1, 3, 3]] and nxt.tolist() == [[1, 1, 3, 3, 5]]
    assert isinstance(make_sampler("linear_blend"), LinearBlend)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope")
    with pytest.raises(ValueError, match="LightningModule"):
        make_sampler("pipeline")


# ------------------------------------------------------------------------------------------------
# Trajectory error
# ------------------------------------------------------------------------------------------------
def test_trajectory_error_zero_on_ground_truth_and_known_shift():
    video, pos, metas = synthetic_batch(6, size=64)
    mask = image_to_video_mask(9).expand(6, -1)
    metric = TrajectoryError()
    m = metric.measure(video, video, pos, mask)
    err, counted, detected = m["err_px"], m["counted"], m["detected"]
    assert counted.sum() > 60 and bool((detected == counted).all())
    assert err[detected].mean() < 0.5  # sub-pixel on the clip itself (partial occlusion adds a little)
    # shift by (dx, dy) = (3, 2) px: every object far enough from the border moves by sqrt(13) px
    shifted = torch.roll(video, shifts=(2, 3), dims=(-2, -1))
    m = metric.measure(shifted, video, pos, mask)
    err, frac, counted, detected = m["err_px"], m["err_frac"], m["counted"], m["detected"]
    radius = torch.zeros(pos.shape[0], pos.shape[2])
    for i, m in enumerate(metas):
        radius[i, : len(m["objects"])] = torch.tensor([o["radius"] for o in m["objects"]])
    margin = radius[:, None] + 4 / 64  # (B, 1, K) objects that do not wrap around
    inside = ((pos > margin[..., None]) & (pos < 1 - margin[..., None])).all(-1) & detected
    assert inside.sum() > 30
    torch.testing.assert_close(err[inside].mean(), torch.tensor(13**0.5), atol=0.1, rtol=0)
    torch.testing.assert_close(frac[inside].mean(), torch.tensor(13**0.5 / 64), atol=0.1 / 64, rtol=0)
    metric.update(shifted, video, pos, mask)
    out = metric.compute()
    assert out["traj_err_px"] > 2.5 and 0 < out["traj_detected"] <= 1


def test_trajectory_error_counts_missing_objects_and_colours_under_occlusion():
    video, pos, _ = synthetic_batch(4, size=32)
    colours = object_colours(video, pos)
    present = ~pos.isnan().any(-1).any(1)  # (B, K)
    for i in range(4):  # colours of one clip are distinct palette entries
        c = colours[i][present[i]]
        assert len({tuple(x) for x in c.tolist()}) == len(c)
    mask = interpolation_mask(9).expand(4, -1)
    metric = TrajectoryError()
    blank = torch.full_like(video, -1.0)  # black frames: no object found
    metric.update(blank, video, pos, mask)
    out = metric.compute()
    assert out["traj_detected"] == 0
    # every miss scores as a random guess: the mean distance of two uniform points, 0.5214 of the side
    torch.testing.assert_close(out["traj_err_all_px"], torch.tensor(0.5214 * 32, dtype=torch.float64))
    metric.reset()
    metric.update(video, video, pos, mask)  # the real clip: everything found, the all-objects error is the plain one
    out = metric.compute()
    assert out["traj_detected"] == 1 and float(out["traj_err_all_px"]) == pytest.approx(float(out["traj_err_px"]))


def test_trajectory_error_counts_generated_frames_only():
    """Given frames are the input pixels in every sampler: counting them would score a frozen or blank clip as
    found there. Under an image-to-video mask only frames 1.. count, and a clip right on frame 0 alone finds nothing."""
    video, pos, _ = synthetic_batch(4, size=32)
    i2v = image_to_video_mask(9).expand(4, -1)  # (B, T) frame 0 given
    metric = TrajectoryError()
    counted = metric.measure(video, video, pos, i2v)["counted"]  # (B, T, K)
    last = mask_from_given(9, [8]).expand(4, -1)  # (B, T) frame 8 given: frames 0-7 count
    other = metric.measure(video, video, pos, last)["counted"]  # (B, T, K)
    assert not counted[:, 0].any() and other[:, 0].any() and not other[:, 8].any() and counted[:, 8].any()
    assert counted[:, 1:].sum() > 20 and torch.equal(counted[:, 1:8], other[:, 1:8])
    given_only = torch.full_like(video, -1.0)  # (B, T, 3, H, W) black generated frames: no object found
    given_only[:, 0] = video[:, 0]
    metric.update(given_only, video, pos, i2v)
    assert metric.compute()["traj_detected"] == 0


def test_nearest_given_frame_breaks_ties_towards_the_earlier_one():
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, True, True]])
    assert nearest_given(mask).tolist() == [[0, 0, 0, 4, 4], [2, 2, 2, 2, 2]]


@pytest.mark.parametrize("make_mask", [image_to_video_mask, interpolation_mask])
def test_motion_ratio_is_one_for_the_truth_and_near_zero_for_a_frozen_copy(make_mask):
    video, pos, _ = synthetic_batch(6, size=32)
    mask = make_mask(9).expand(6, -1)
    metric = TrajectoryError()
    metric.update(video, video, pos, mask)
    assert float(metric.compute()["traj_motion_ratio"]) == pytest.approx(1.0, abs=0.05)
    metric.reset()
    metric.update(NearestFrame()(video, mask), video, pos, mask)  # objects stay where the given frame has them
    assert float(metric.compute()["traj_motion_ratio"]) < 0.2


# ------------------------------------------------------------------------------------------------
# Protocol and suite
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "expansion"}, "task"),
        ({"frames": 2}, "frames"),
        ({"metrics": ("fvd", "psnr")}, "metrics"),
        ({"frames": 5, "metrics": ("fvd",)}, "9 frames"),
        ({"num_clips": 1}, "num_clips"),
        ({"missing_weights": "ignore"}, "missing_weights"),
        ({"eta": -1.0}, "eta"),
        ({"resolution": "36x"}, r"evaluation resolution must be N or HxW \(pixels, each >= 1; e.g. 256 or 36x64\)"),
        ({"resolution": [36, 64, 3]}, r"evaluation resolution must be a side N, 'HxW' or \[H, W\]"),
        ({"resolution": "4x64"}, r"resolution=\(4, 64\) is impossible: it must be >= 8 a side"),
    ],
)
def test_protocol_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalProtocol(**kwargs)


@pytest.mark.parametrize("resolution, kept", [(32, 32), ("32", 32), ("32x32", 32), ((32, 32), 32), ("36x64", (36, 64)),
                                              ([36, 64], (36, 64)), (None, None)])
def test_protocol_resolution_is_a_side_or_height_by_width(resolution, kept):
    """One side (or a square HxW) is kept as the side, as before; a non-square size as (H, W)."""
    p = EvalProtocol(resolution=resolution)
    assert p.resolution == kept and p.real_stats_fields()["resolution"] == kept


def test_the_callback_window_is_scored_at_a_non_square_resolution():
    from mardini.evaluation.callbacks import eval_window

    batch = {"video": torch.rand(2, 11, 3, 16, 16) * 2 - 1}  # (B, T, 3, H, W)
    real, _, own = eval_window(batch, None, EvalProtocol(frames=9, resolution="8x16"))
    assert tuple(real.shape) == (2, 9, 3, 8, 16) and tuple(own.shape) == (2, 9, 3, 16, 16)


def test_protocol_defaults_and_masks():
    p = EvalProtocol(task="image_to_video", frames=5, metrics=("fid",))
    assert p.guidance_scale == 2.5 and p.mask(2).tolist() == [[False, True, True, True, True]] * 2
    assert EvalProtocol().metrics == ("fvd", "fid", "midf", "traj") and EvalProtocol().guidance_scale == 1.0


def test_missing_weights_error_or_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path))  # an empty weights cache
    with pytest.raises(FileNotFoundError, match="make weights"):
        EvalSuite(EvalProtocol(metrics=("fid",), num_clips=4))
    with pytest.warns(UserWarning, match="fvd is off.*make weights"):
        suite = EvalSuite(EvalProtocol(metrics=("fvd", "midf"), missing_weights="skip", num_clips=4))
    assert set(suite.metrics) == {"midf"} and "fvd" in suite.skipped
    # a missing LPIPS file costs only LPIPS: MidF PSNR and SSIM need no weights, and the fix names --lpips-weights
    missing = str(tmp_path / "alexnet.pth")
    with pytest.raises(FileNotFoundError, match="drop lpips_weights \\(--lpips-weights\\)"):
        EvalSuite(EvalProtocol(metrics=("midf",), lpips_weights=missing, num_clips=4))
    with pytest.warns(UserWarning, match="midf_lpips is off"):
        suite = EvalSuite(EvalProtocol(metrics=("midf",), lpips_weights=missing, missing_weights="skip", num_clips=4))
    assert set(suite.metrics) == {"midf"} and set(suite.skipped) == {"midf_lpips"}
    assert "lpips" not in suite.metrics["midf"]


def test_suite_scores_baselines_and_reuses_cached_real_stats(tmp_path):
    real, pos, _ = synthetic_batch(4, size=32)
    p = EvalProtocol(frames=9, resolution=32, num_clips=4)
    mask = p.mask(4)
    suite = EvalSuite(p, stand_ins())
    suite.update(real, real, mask, pos)  # the real clips as "generated": Fréchet ~0, PSNR inf
    res = suite.compute()
    assert res["fvd4_9f"] == pytest.approx(0, abs=1e-6) and res["fid4_9f"] == pytest.approx(0, abs=1e-6)
    assert res["traj_err_px"] < 0.3 and res["midf_ssim"] == pytest.approx(1.0)

    cache = RealStatsCache(tmp_path)
    suite.save_real_cache(cache, {"clips": "a"}, digest=1, count=4)
    fresh = EvalSuite(p, stand_ins())
    assert fresh.load_real_cache(cache, {"clips": "b"}) is None  # other data: miss
    assert fresh.load_real_cache(cache, {"clips": "a"}) is not None  # hit
    other = EvalSuite(EvalProtocol(task="image_to_video", frames=9, resolution=32, num_clips=4), stand_ins())
    assert other.load_real_cache(cache, {"clips": "a"}) is None  # other protocol: miss
    blend = LinearBlend()(real, mask, 0)
    fresh.update(real, blend, mask, pos)  # real side comes from the cache
    assert int(fresh.metrics["fvd"].real_features_num_samples) == 0
    direct = EvalSuite(p, stand_ins())
    direct.update(real, blend, mask, pos)
    a, b = fresh.compute(), direct.compute()
    assert a["fvd4_9f"] > 1e-4
    for k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


def test_suite_states_merge_like_ddp():
    """Two suites fed halves, merged the way torchmetrics syncs ranks, equal one suite fed everything."""
    real, pos, _ = synthetic_batch(6, size=32)
    p = EvalProtocol(frames=9, resolution=32, num_clips=6)
    fake = NearestFrame()(real, p.mask(6), 0)
    whole, a, b = EvalSuite(p, stand_ins()), EvalSuite(p, stand_ins()), EvalSuite(p, stand_ins())
    whole.update(real, fake, p.mask(6), pos)
    a.update(real[:3], fake[:3], p.mask(3), pos[:3])
    b.update(real[3:], fake[3:], p.mask(3), pos[3:])
    for name, m in a.metrics.items():
        m.merge_state(b.metrics[name]) if not hasattr(m, "items") else [
            m[k].merge_state(b.metrics[name][k]) for k in m.keys()]
    ra, rw = a.compute(), whole.compute()
    for k in rw:
        assert ra[k] == pytest.approx(rw[k], rel=1e-6), k
    assert np.isfinite(list(rw.values())).all()


def test_the_pipeline_sampler_clamps_finite_values_and_keeps_non_finite_ones_for_the_check():
    from mardini.evaluation.samplers import PipelineSampler

    class Pipe:
        planner = object()

        def generate(self, video, mask, steps, guidance_scale, seed):
            out = video * 3  # (B, T, 3, H, W): out of range
            out[0, 1, 0, 0, 0] = float("inf")
            out[0, 1, 0, 0, 1] = float("nan")
            return out

    video = torch.full((1, 3, 3, 2, 2), 0.5)  # (B, T, 3, H, W)
    out = PipelineSampler(Pipe(), steps=1)(video, torch.tensor([[False, True, False]]), 0)
    assert out[0, 0].eq(1).all()  # clamped
    assert out[0, 1, 0, 0, 0].isinf() and out[0, 1, 0, 0, 1].isnan()  # left for evaluate.py's non-finite check
