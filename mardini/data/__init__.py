"""Video data: the synthetic set, shard writers, decoding, transforms, the streaming DataModule, the latent cache.

Modules (imported on demand, so ``import mardini.data`` stays light):
``synthetic`` (bouncing shapes), ``synthetic_shards``, ``video_shards`` (real videos -> clip shards),
``decode``, ``encode``, ``transforms`` (``resize_video``), ``sharding``, ``stream`` (with ``skip_log``, ``batching``
and ``stream_loader``), ``datamodule`` (``VideoDataModule``), its setup checks ``shard_checks`` and
``validation_split`` (warned once each: ``setup_warnings``), ``resumed_data`` (what a resume finds changed in the
data since its checkpoint), ``worker_signals`` (loader workers outlive the first
SIGTERM), ``latent_cache``.
"""
