"""Shared test settings: offline hub, deterministic threads, small sizes; Lightning's seed variables undone after
each test."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# set in os.environ by seed_everything (LightningCLI runs it): read by later seed_everything() calls, Trainer.fit
# (worker seeding of loaders without a worker_init_fn) and mardini.data.datamodule.protect_loader_workers
LIGHTNING_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _seed_variables_kept():
    """Puts PL_GLOBAL_SEED and PL_SEED_WORKERS back as they were on entry."""
    before = {name: os.environ.get(name) for name in LIGHTNING_SEED_VARIABLES}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def lightning_seed_variables_restored():
    """Puts PL_GLOBAL_SEED and PL_SEED_WORKERS back as they were before the test (an in-process CLI fit sets them
    for the rest of the process), so that no test's seeding depends on which tests ran before it."""
    with _seed_variables_kept():
        yield


@pytest.fixture(scope="session")
def seed_variables_kept():
    """The context manager that puts PL_GLOBAL_SEED and PL_SEED_WORKERS back on exit, for a module or session
    fixture's in-process fit (it runs before, and outside, the test's ``lightning_seed_variables_restored``)."""
    return _seed_variables_kept
