"""Fast tests of the metric layer: Fréchet distance, I3D port and loader, FVD/FID states, MidF metrics, LPIPS."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from mardini.metrics import (
    I3D,
    MIN_FRAMES,
    FrameFID,
    FrechetVideoDistance,
    MidFrameMetrics,
    build_lpips,
    frechet_distance,
    i3d_preprocess,
    load_i3d_weights,
)
from mardini.metrics.frechet import gaussian_from_sums, sums_from_gaussian
from mardini.metrics.i3d import Unit3D, max_pool_same, read_i3d_pickle, tf_same_pad
from mardini.metrics.preprocess import resize_frames


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def rand_video(b, t, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=g) * 2 - 1  # (B, T, 3, H, W) in [-1, 1]


class PoolFeatures(nn.Module):
    """Tiny stand-in feature net for FVD: (B, 3, T, 224, 224) -> (B, 12) by average pooling."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so state_dict leaks would show

    def forward(self, x):
        return self.scale * nn.functional.adaptive_avg_pool3d(x, (1, 2, 2)).flatten(1)  # (B, 12)


class FramePoolFeatures(PoolFeatures):
    """Same for FID: (N, 3, H, W) -> (N, 12)."""

    def forward(self, x):
        return self.scale * nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)  # (N, 12)


def random_psd(d, rank, rng):
    a = rng.normal(size=(d, rank))
    return a @ a.T / rank


def reference_frechet(mu1, s1, mu2, s2):
    """Independent formula: scipy's general matrix square root of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fake_i3d_pickle(model: I3D) -> dict:
    """A pickle tree in DeepMind/Flax layout written from ``model``'s tensors (kernels back to kT,kH,kW,Cin,Cout)."""
    params, stats = {}, {}
    for unit in (m for m in model.modules() if isinstance(m, Unit3D)):
        conv = {"kernel": unit.conv.weight.detach().permute(2, 3, 4, 1, 0).numpy().copy()}
        if unit.conv.bias is not None:
            conv["bias"] = unit.conv.bias.detach().numpy().copy()
        params[unit.scope] = {"Conv_0": conv}
        if unit.batch_norm:
            params[unit.scope]["BatchNorm_0"] = {"bias": unit.bn_bias.detach().numpy().copy()}
            c = unit.bn_mean.numel()
            stats[unit.scope] = {
                "BatchNorm_0": {
                    "mean": unit.bn_mean.numpy().reshape(1, 1, 1, 1, c),  # stored (1, 1, 1, 1, C) like the original
                    "var": unit.bn_var.numpy().reshape(1, 1, 1, 1, c),
                }
            }
    return {"params": params, "batch_stats": stats}


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,rank", [(3, 5), (16, 40), (64, 20), (128, 150)])
def test_frechet_matches_scipy(d, rank):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_psd(d, rank, rng), random_psd(d, rank + 3, rng)
    ours = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)


def test_frechet_identical_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8
    dists = [frechet_distance(mu, cov, (x + s).mean(0), np.cov(x + s, rowvar=False)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(dists, dists[1:]))
    assert dists[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)  # a pure shift adds |delta|^2


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_sums_gaussian_roundtrip():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(50, 6, generator=g, dtype=torch.float64)
    mu, cov = gaussian_from_sums(f.sum(0), f.T @ f, 50)
    np.testing.assert_allclose(mu.numpy(), f.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.numpy(), rowvar=False), atol=1e-12)
    s, s2, n = sums_from_gaussian(mu, cov, 50)
    np.testing.assert_allclose(s2.numpy(), (f.T @ f).numpy(), atol=1e-10)
    assert int(n) == 50 and torch.allclose(s, f.sum(0))


# ------------------------------------------------------------------------------------------------
# I3D port: padding, architecture, loader
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,s", [(7, 3, 2), (8, 3, 2), (9, 7, 2), (5, 1, 1), (6, 2, 2), (4, 3, 1)])
def test_tf_same_pad_shape_and_asymmetry(n, k, s):
    x = torch.ones(1, 1, n, n, n)
    y = tf_same_pad(x, (k, k, k), (s, s, s))
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    assert y.shape[-1] == n + total
    row = y[0, 0, total // 2, total // 2]  # a row of real pixels along W
    assert row[: total // 2].sum() == 0 and row[total // 2 : total // 2 + n].min() == 1  # less padding before
    assert row.sum() == n
    conv = nn.functional.conv3d(y, torch.ones(1, 1, k, k, k), stride=s)
    assert conv.shape[-3:] == (out, out, out)


def test_max_pool_same_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(1, 2, 5, 6, 7, generator=g) - 1  # all negative: zero padding would win, -inf must not
    kernel, stride = (3, 3, 3), (2, 2, 2)
    y = max_pool_same(x, kernel, stride)
    ref = torch.empty_like(y)
    for d, (n, k, s) in enumerate(zip(x.shape[2:], kernel, stride)):
        assert y.shape[2 + d] == -(-n // s)
    for t in range(y.shape[2]):
        for i in range(y.shape[3]):
            for j in range(y.shape[4]):
                lo = []
                for c, (n, k, s) in zip((t, i, j), zip(x.shape[2:], kernel, stride)):
                    before = max((-(-n // s) - 1) * s + k - n, 0) // 2
                    start = c * s - before
                    lo.append(slice(max(start, 0), min(start + k, n)))
                ref[:, :, t, i, j] = x[:, :, lo[0], lo[1], lo[2]].amax(dim=(2, 3, 4))
    torch.testing.assert_close(y, ref)


def test_i3d_param_count_and_forward_shape():
    torch.manual_seed(0)
    model = I3D().eval()
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == 12.69  # ../shared/DATA.md
    x = i3d_preprocess(rand_video(1, MIN_FRAMES, 48, 64))  # (1, 3, 9, 224, 224)
    assert x.shape == (1, 3, MIN_FRAMES, 224, 224)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 400) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(x[:, :, :8])


def test_i3d_preprocess_checks_and_padding():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        i3d_preprocess(rand_video(1, 9) * 127.5 + 127.5)
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d_preprocess(rand_video(1, 4))
    x = i3d_preprocess(rand_video(1, 4), pad_short=True)  # (1, 3, 9, 224, 224)
    assert x.shape[2] == MIN_FRAMES and torch.equal(x[:, :, 3], x[:, :, 8])


def test_non_finite_frames_are_refused_by_name_and_count():
    """NaN compares false, so a range check alone let it through (FVD then failed in the eigenvalue solver)."""
    from mardini.metrics.preprocess import check_video

    video = rand_video(2, 9)  # (2, 9, 3, 32, 40)
    video[1, 4, 0, :2, 0] = float("nan")
    video[0, 0, 2, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"I3D input: 3 of 69120 values are not finite \(NaN or inf\)"):
        i3d_preprocess(video)
    midf = MidFrameMetrics()
    with pytest.raises(ValueError, match="MidF preds: 3 of 69120 values are not finite"):
        midf.update(video, rand_video(2, 9))
    check_video(rand_video(2, 9), "fine")  # finite, in range: no error


def test_resize_crop_keeps_centre_and_stretch_keeps_all():
    frames = -torch.ones(1, 3, 20, 60)
    frames[..., 25:35] = 1  # a bright vertical stripe in the middle
    crop = resize_frames(frames, 20, "crop")  # (1, 3, 20, 20): the centre 20x20
    assert crop.shape == (1, 3, 20, 20) and crop[..., 8:12].min() == 1 and crop[..., :3].max() == -1
    stretch = resize_frames(frames, 20, "stretch")
    assert stretch.shape == (1, 3, 20, 20) and stretch[..., 9:11].mean() > 0.5 and stretch.mean() < 0


def test_i3d_loader_roundtrip_consumes_everything(tmp_path):
    torch.manual_seed(0)
    src = I3D()
    for name, buf in src.named_buffers():  # non-trivial statistics, so a wrong mapping would show
        buf.copy_(torch.rand_like(buf) + (0.5 if "var" in name else -0.5))
    path = tmp_path / "fake.ckpt"
    with open(path, "wb") as f:
        pickle.dump(fake_i3d_pickle(src), f)
    flat = read_i3d_pickle(path)
    assert len(flat) == len(src.state_dict())  # one pickle tensor per module tensor
    dst = load_i3d_weights(I3D(), path)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_i3d_loader_lists_missing_and_unused():
    tree = fake_i3d_pickle(I3D())
    del tree["params"]["Mixed_4c/Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]
    tree["batch_stats"]["Mixed_5c/Branch_9"] = {"BatchNorm_0": {"mean": np.zeros(3, np.float32)}}
    with pytest.raises(KeyError) as err:
        load_i3d_weights(I3D(), tree)
    assert "Mixed_4c/Branch_1/Conv3d_0b_3x3/Conv_0/kernel" in str(err.value)
    assert "Mixed_5c/Branch_9/BatchNorm_0/mean" in str(err.value)


def test_i3d_loader_rejects_wrong_shape_and_foreign_objects(tmp_path):
    tree = fake_i3d_pickle(I3D())
    tree["params"]["Conv3d_2b_1x1"]["BatchNorm_0"]["bias"] = np.zeros(65, np.float32)
    with pytest.raises(ValueError, match="Conv3d_2b_1x1/BatchNorm_0/bias"):
        load_i3d_weights(I3D(), tree)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"params": {"x": np.zeros(1)}, "batch_stats": {"y": copy.copy}}, f)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        read_i3d_pickle(path)


# ------------------------------------------------------------------------------------------------
# FVD metric (stand-in feature network)
# ------------------------------------------------------------------------------------------------
def make_fvd(**kw):
    return FrechetVideoDistance(num_videos=kw.pop("num_videos", 8), num_frames=9, network=PoolFeatures(), **kw)


def test_fvd_protocol_zero_and_shift():
    fvd = make_fvd()
    assert fvd.protocol == "fvd8_9f"
    real = rand_video(8, 9, seed=1) * 0.5
    fvd.update(real, real=True)
    fvd.update(real, real=False)
    assert abs(fvd.compute().item()) < 1e-6
    dists = []
    for shift in (0.05, 0.2, 0.4):
        fvd.reset()
        fvd.update(real, real=True)
        fvd.update(real + shift, real=False)
        dists.append(fvd.compute().item())
    assert 0 < dists[0] < dists[1] < dists[2]
    assert fvd.real_features_sum.dtype == torch.float64 and fvd.fake_features_cov_sum.dtype == torch.float64


def test_fvd_states_merge_like_ddp():
    real, fake = rand_video(8, 9, seed=2), rand_video(8, 9, seed=3) * 0.7
    whole, a, b = make_fvd(), make_fvd(), make_fvd()
    whole.update(real, True), whole.update(fake, False)
    a.update(real[:3], True), a.update(fake[:5], False)
    b.update(real[3:], True), b.update(fake[5:], False)
    a.merge_state(b)
    for name in ("real_features_sum", "real_features_cov_sum", "fake_features_cov_sum", "fake_features_num_samples"):
        torch.testing.assert_close(getattr(a, name), getattr(whole, name))
    assert a.compute().item() == pytest.approx(whole.compute().item(), rel=1e-9)


def test_fvd_checks_frames_and_warns_on_count():
    fvd = make_fvd(num_videos=4)
    with pytest.raises(ValueError, match="fvd4_9f takes clips of 9 frames, got 10"):
        fvd.update(rand_video(2, 10), real=True)
    with pytest.raises(ValueError, match="num_frames >= 9"):
        FrechetVideoDistance(num_videos=4, num_frames=5, network=PoolFeatures())
    fvd.update(rand_video(3, 9), True), fvd.update(rand_video(3, 9, seed=5), False)
    with pytest.warns(UserWarning, match="3 generated videos, the protocol names 4"):
        fvd.compute()


class Holder(nn.Module):
    """Stands in for a LightningModule with metrics attached."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.fvd = make_fvd()
        self.fid = FrameFID(num_videos=2, num_frames=9, network=FramePoolFeatures())


def test_metric_networks_stay_out_of_state_dict_and_module_tree():
    holder = Holder()
    keys = list(holder.state_dict())
    assert keys == ["layer.weight", "layer.bias"], keys
    assert sum(p.numel() for p in holder.parameters()) == 6
    assert isinstance(holder.fvd.network, PoolFeatures) and isinstance(holder.fid.inception, FramePoolFeatures)
    clone = pickle.loads(pickle.dumps(holder))  # spawn-style DDP pickles modules
    clone.fvd.update(rand_video(2, 9), True)
    assert clone.fvd.real_features_num_samples == 2


def test_fvd_real_stats_cache_roundtrip(tmp_path):
    real, fake = rand_video(6, 9, seed=7), rand_video(6, 9, seed=8) * 0.5
    a = make_fvd(num_videos=6)
    a.update(real, True), a.update(fake, False)
    path = a.save_real_stats(tmp_path / "real.pt")
    feats = a.features(real).double().numpy()
    stats = torch.load(path, weights_only=True)
    assert stats["protocol"] == "fvd6_9f" and stats["count"] == 6
    np.testing.assert_allclose(stats["cov"].numpy(), np.cov(feats, rowvar=False), atol=1e-10)

    b = make_fvd(num_videos=6)
    b.load_real_stats(path)
    b.update(fake, False)
    assert b.compute().item() == pytest.approx(a.compute().item(), rel=1e-9)
    b.reset()  # cached real statistics survive a reset, generated ones do not
    assert b.fake_features_num_samples == 0 and b.real_stats()["count"] == 6
    with pytest.raises(RuntimeError, match="clear_real_stats"):
        b.update(real, True)
    with pytest.raises(ValueError, match="protocol"):
        make_fvd(num_videos=7).load_real_stats(path)


# ------------------------------------------------------------------------------------------------
# FID over frames (stand-in feature network, torchmetrics states)
# ------------------------------------------------------------------------------------------------
def test_fid_frames_mask_and_zero():
    fid = FrameFID(num_videos=4, num_frames=5, network=FramePoolFeatures())
    assert fid.protocol == "fid4_5f"
    video = rand_video(4, 5, seed=9)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 1:4] = True  # first and last given
    fid.update(video, real=True)
    fid.update(video, real=False, mask=mask)
    assert int(fid.real_features_num_samples) == 20 and int(fid.fake_features_num_samples) == 12
    fid.reset()
    fid.update(video, True), fid.update(video, False)
    assert abs(fid.compute().item()) < 1e-6
    fid.reset()
    fid.update(video, True), fid.update((video + 0.3).clamp(-1, 1), False)
    assert fid.compute().item() > 1e-3
    with pytest.raises(ValueError, match="5 frames"):
        fid.update(rand_video(1, 3), True)


def test_cached_real_stats_must_share_the_preprocessing(tmp_path):
    a = make_fvd(num_videos=6, resize="crop")
    a.update(rand_video(6, 9, seed=7), True)
    path = a.save_real_stats(tmp_path / "real.pt")
    assert torch.load(path, weights_only=True)["preprocessing"] == {"resize": "crop", "quantize": True,
                                                                     "pad_short": False}
    make_fvd(num_videos=6, resize="crop").load_real_stats(path)  # the same: taken
    for other in ({"resize": "stretch"}, {"quantize": False}):
        with pytest.raises(ValueError, match="preprocessing"):
            make_fvd(num_videos=6, **other).load_real_stats(path)
    stats = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"covariance \(12, 11\)"):
        make_fvd(num_videos=6).set_real_stats({**stats, "cov": stats["cov"][:, :11]})
    old = {k: v for k, v in stats.items() if k != "preprocessing"}  # written before it was recorded
    with pytest.warns(UserWarning, match="do not record their preprocessing"):
        make_fvd(num_videos=6).set_real_stats(old)


def test_fid_warns_on_other_frames_or_another_count():
    video, mask = rand_video(4, 5, seed=9), torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 1:4] = True
    fid = FrameFID(num_videos=4, num_frames=5, network=FramePoolFeatures())
    fid.update(video, real=True, mask=mask)
    stats = fid.real_stats()
    assert stats["frames"] == [[False, True, True, True, False]]
    other = FrameFID(num_videos=4, num_frames=5, network=FramePoolFeatures())
    other.set_real_stats(stats)
    other.update(video, real=False)  # every frame, where the real side took the masked ones
    with pytest.warns(UserWarning, match="compare the same frames"):
        other.compute()
    other.reset()
    other.update(video[:3], real=False, mask=mask[:3])  # the same frames, 3 videos of the protocol's 4
    with pytest.warns(UserWarning, match="3 generated videos, the protocol names 4") as record:
        other.compute()
    assert not any("same frames" in str(w.message) for w in record)


# ------------------------------------------------------------------------------------------------
# Middle-frame metrics and LPIPS
# ------------------------------------------------------------------------------------------------
def test_midf_psnr_ssim_on_middle_frame_only():
    target = rand_video(3, 9, seed=10)
    other = target.clone()
    other[:, [0, 1, 7, 8]] = 0  # everything but the middle frame differs
    m = MidFrameMetrics()
    m.update(other, target)
    out = m.compute()
    assert out["midf_ssim"].item() == pytest.approx(1.0) and out["midf_psnr"].item() == 100.0  # capped, not inf

    noisy = (target + 0.1 * rand_video(3, 9, seed=11)).clamp(-1, 1)
    m.reset()
    m.update(noisy, target)
    mse = (((noisy[:, 4] + 1) / 2 - (target[:, 4] + 1) / 2) ** 2).flatten(1).mean(1)  # (B,) on [0, 1]
    assert m.compute()["midf_psnr"].item() == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)


@pytest.mark.parametrize("frames", [8, 9])
def test_the_scored_frame_is_frame_t_over_2_for_even_and_odd_t(frames):
    """Frame ``T // 2``: 4 of 8 frames (the later of the two middle ones), 4 of 9."""
    from mardini.metrics import middle_frame

    target = rand_video(2, frames, seed=14)
    assert torch.equal(middle_frame(target), target[:, frames // 2])
    other = torch.zeros_like(target)
    other[:, frames // 2] = target[:, frames // 2]  # only frame T // 2 agrees
    m = MidFrameMetrics()
    m.update(other, target)
    out = m.compute()
    assert out["midf_ssim"].item() == pytest.approx(1.0) and out["midf_psnr"].item() == 100.0


def test_one_exact_middle_frame_is_capped_at_100_db_not_an_infinite_mean():
    """Per-image PSNR capped at 100 dB (MSE on [0, 1] floored at 1e-10): one clip reproduced exactly no longer
    makes the mean ``inf``; the other clips' PSNR is the uncapped one."""
    target = rand_video(2, 9, seed=12)
    fake = target.clone()
    fake[1] = (target[1] + 0.1 * rand_video(1, 9, seed=13)[0]).clamp(-1, 1)  # clip 0 exact, clip 1 noisy
    m = MidFrameMetrics()
    m.update(fake, target)
    psnr = m.compute()["midf_psnr"].item()
    mse = (((fake[1, 4] - target[1, 4]) / 2) ** 2).mean()  # clip 1's middle frame, on [0, 1]
    print("MidF-PSNR of an exact and a noisy clip:", psnr)
    assert psnr == pytest.approx((100 + 10 * torch.log10(1 / mse).item()) / 2, rel=1e-5)


def test_midf_keeps_running_sums_not_a_value_per_clip():
    """An evaluation of thousands of clips: MidF's states stay scalars however many batches it scores (the PSNR
    kept three tensors per batch, on the clips' device, until compute), and the mean is still over the clips."""
    m = MidFrameMetrics()
    mse = []
    for b in range(12):
        target = rand_video(4, 9, seed=100 + b)
        fake = (target + 0.1 * rand_video(4, 9, seed=200 + b)).clamp(-1, 1)
        m.update(fake, target)
        mse.append((((fake[:, 4] - target[:, 4]) / 2) ** 2).flatten(1).mean(1))  # (B,) on [0, 1]
    states = {f"{key}.{name}": getattr(metric, name) for key, metric in m.items() for name in metric._defaults}
    print("MidF states after 12 batches:", {k: type(v).__name__ for k, v in states.items()})
    assert all(torch.is_tensor(v) and v.numel() == 1 for v in states.values()), states
    want = (10 * torch.log10(1 / torch.cat(mse))).mean().item()  # (48,) per clip, then the mean
    assert m.compute()["midf_psnr"].item() == pytest.approx(want, rel=1e-5)


def test_lpips_needs_user_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth"):
        build_lpips(None)
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        MidFrameMetrics(lpips_weights=tmp_path / "missing.pth")
    import torchvision

    wrong = tmp_path / "wrong.pth"  # right format, wrong values: caught by torchvision's hash check, no download
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="is not the alexnet-owt-7be5be79.pth"):
        build_lpips(wrong)


def test_lpips_builds_from_local_backbone_file(tmp_path, monkeypatch):
    import torchvision

    from mardini.metrics import frame_metrics

    state = torchvision.models.alexnet(weights=None).state_dict()
    local = tmp_path / "backbone.pth"
    torch.save(state, local)
    monkeypatch.setattr(frame_metrics, "sha256_file", lambda p: "7be5be79" + "0" * 56)  # pretend it is the real file
    m = MidFrameMetrics(lpips_weights=local)
    lpips = m["lpips"]
    torch.testing.assert_close(lpips.net.net.slice1[0].weight, state["features.0.weight"])  # the local file, no download
    assert "net" not in lpips._modules and not any("slice" in k for k in m.state_dict())
    target = rand_video(2, 9, 64, 64, seed=12)
    m.update((target + 0.2 * rand_video(2, 9, 64, 64, seed=13)).clamp(-1, 1), target)
    out = m.compute()
    assert set(out) == {"midf_psnr", "midf_ssim", "midf_lpips"} and out["midf_lpips"].item() > 0


def test_fid_keeping_its_real_features_keeps_their_frames_across_a_reset():
    video, mask = rand_video(4, 5, seed=9), torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 1:4] = True
    fid = FrameFID(num_videos=4, num_frames=5, network=FramePoolFeatures(), reset_real_features=False)
    fid.update(video, real=True, mask=mask)
    fid.reset()  # the real statistics stay, so does which frames they used
    assert fid.real_stats()["frames"] == [[False, True, True, True, False]]
    fid.update(video, real=False)
    with pytest.warns(UserWarning, match="compare the same frames"):
        fid.compute()
