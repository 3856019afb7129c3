"""A tiny trained checkpoint of each kind, made in seconds, for the sampling tests (``mardini.testing``)."""

from __future__ import annotations

import pytest
import torch

from mardini.testing import make_checkpoint  # noqa: F401 (re-exported for the tests)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """One intra-op thread for the module (restored after): on a shared 2-core machine two threads spin-wait
    on each other and make these small networks many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WINDOW, SIDE = 5, 16  # window and frame side of the sampling tests' checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one_thread):
    """A tiny ``joint`` and ``generation`` checkpoint (``WINDOW`` frames of ``SIDE`` px), made once per module."""
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: make_checkpoint(root / f"{kind}.ckpt", kind, frames=WINDOW, size=SIDE)
            for kind in ("joint", "generation")}


@pytest.fixture()
def pipe(ckpts):
    """A fresh pipeline of the joint checkpoint (tests may change its flags and hooks)."""
    from mardini.pipeline import MarDiniPipeline

    return MarDiniPipeline.from_checkpoint(ckpts["joint"])


def record_sampled_and_scored(monkeypatch) -> tuple[list, list]:
    """``(sampled, scored)``, filled as ``MarDiniPipeline.generate`` and ``EvalSuite.update`` run: the ``(H, W)`` the
    pipeline samples at, and per update ``(real (H, W), generated (H, W), given frames equal to the real ones)``."""
    from mardini.evaluation.protocol import EvalSuite
    from mardini.pipeline import MarDiniPipeline

    sampled, scored = [], []
    generate, update = MarDiniPipeline.generate, EvalSuite.update

    def recording_generate(self, video, mask, **kw):  # video (B, T, 3, S, S)
        sampled.append(tuple(video.shape[-2:]))
        return generate(self, video, mask, **kw)

    def recording_update(self, real, fake, mask, positions=None):  # (B, T, 3, R, R) each
        given = ~mask[..., None, None, None].expand_as(real)
        scored.append((tuple(real.shape[-2:]), tuple(fake.shape[-2:]), torch.equal(fake[given], real[given])))
        return update(self, real, fake, mask, positions)

    monkeypatch.setattr(MarDiniPipeline, "generate", recording_generate)
    monkeypatch.setattr(EvalSuite, "update", recording_update)
    return sampled, scored


def killed_on_the_second_gif(save_gif):
    """``save_gif`` (a writer ``(video, path, fps)``) killed in the middle of its second file: it writes part of a GIF
    there and raises KeyboardInterrupt, as a kill would stop the run."""
    calls = []

    def killed_on_the_second(video, path, fps=8.0):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"GIF89a half")  # the kill comes mid-file
            raise KeyboardInterrupt
        return save_gif(video, path, fps)

    return killed_on_the_second
