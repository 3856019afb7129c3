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
