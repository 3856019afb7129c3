"""``make demo``: the main job on CPU -- data, the tiny curriculum chain, evaluation, pictures and a report.

``python -m mardini.demo`` runs it (see :mod:`mardini.demo.main`); ``python -m mardini.demo.data`` only builds and
streams the synthetic set. The names below load on first use, so that ``python -m mardini.demo`` can choose
OpenMP's wait policy (:mod:`mardini.demo.wait_policy`) before anything imports torch.
"""

from __future__ import annotations

__all__ = ["SHARDS", "build_synthetic", "demo_datamodule", "stream_for"]


def __getattr__(name: str):
    if name in __all__:
        from mardini.demo import data

        return getattr(data, name)
    raise AttributeError(f"module 'mardini.demo' has no attribute {name!r}")
