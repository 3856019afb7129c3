"""SIGTERM protection of DataLoader workers: a worker outlives the first SIGTERM its process group gets, so that the
main process can save (``PreemptionSave``) before the workers end; a second SIGTERM ends them."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader


def leave_first_sigterm_to_main(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: the worker outlives the first SIGTERM it gets. SLURM, ``timeout`` and a
    container stop signal the whole process group; a worker ended there made the main process fail at once
    ("DataLoader worker ... killed by signal: Terminated") before the checkpoint ``PreemptionSave`` saves at the end of
    the step. The main process shuts the worker down after it (or ends with it); a second SIGTERM ends it."""
    signal.signal(signal.SIGTERM, _end_on_the_next_sigterm)


def _end_on_the_next_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LeaveFirstSigtermToMain:
    """A loader's ``worker_init_fn``: :func:`leave_first_sigterm_to_main`, then ``then`` (the loader's own, or None).
    A class, so that loaders of the ``spawn`` start method can pickle it."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        leave_first_sigterm_to_main(worker_id)
        if self.then is not None:
            self.then(worker_id)


def protect_loader_workers(loaders: Any, rank: int = 0) -> Any:
    """Make the workers of every DataLoader in ``loaders`` (a loader, or a list, tuple, dict or ``CombinedLoader`` of
    them: what a ``*_dataloader`` hook returns) outlive their first SIGTERM: a loader with workers gets
    :class:`LeaveFirstSigtermToMain` as its ``worker_init_fn``, chaining its own after it (one without its own, under
    ``seed_everything(workers=True)`` as LightningCLI runs it, chains the seeding Lightning would give it:
    ``pl_worker_init_function`` of ``rank``). Loaders already protected (VideoDataModule's) stay as they are.
    Returns ``loaders``."""
    for loader in dataloaders_in(loaders):
        then = loader.worker_init_fn
        if loader.num_workers == 0 or then is leave_first_sigterm_to_main or isinstance(then, LeaveFirstSigtermToMain):
            continue
        if then is None and int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning adds it to loaders without one
            then = partial(pl_worker_init_function, rank=rank)
        loader.worker_init_fn = LeaveFirstSigtermToMain(then)
    return loaders


def dataloaders_in(loaders: Any) -> Iterator[DataLoader]:
    """The DataLoaders in ``loaders``: itself, or those inside a list, tuple, dict or ``CombinedLoader``."""
    if isinstance(loaders, DataLoader):
        yield loaders
    elif isinstance(loaders, CombinedLoader):
        for inner in loaders.flattened:
            yield from dataloaders_in(inner)
    elif isinstance(loaders, Mapping):
        for inner in loaders.values():
            yield from dataloaders_in(inner)
    elif isinstance(loaders, (list, tuple)):
        for inner in loaders:
            yield from dataloaders_in(inner)
