"""Shared test settings: offline hub, deterministic threads, small sizes; the variables Lightning leaves in
os.environ (its seed variables, a spawned fit's MASTER_PORT) undone after each test."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# set in os.environ by seed_everything (LightningCLI runs it): read by later seed_everything() calls, Trainer.fit
# (worker seeding of loaders without a worker_init_fn) and mardini.data.datamodule.protect_loader_workers; and
# MASTER_PORT, set by the ddp_spawn launcher (a free port the OS picked) and read by every later fit's launcher and by
# the train.py subprocesses started with this environment: all of them would use the first spawned fit's port
LIGHTNING_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_PORT")


@contextlib.contextmanager
def _lightning_variables_kept():
    """Puts PL_GLOBAL_SEED, PL_SEED_WORKERS and MASTER_PORT back as they were on entry."""
    before = {name: os.environ.get(name) for name in LIGHTNING_VARIABLES}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def lightning_variables_restored():
    """Puts PL_GLOBAL_SEED, PL_SEED_WORKERS and MASTER_PORT back as they were before the test (an in-process CLI fit
    sets the first two for the rest of the process, a ddp_spawn fit the port), so that no test's seeding depends on
    which tests ran before it, and each spawned fit gets a port of its own."""
    with _lightning_variables_kept():
        yield


@pytest.fixture(scope="session")
def seed_variables_kept():
    """The context manager that puts Lightning's variables (``LIGHTNING_VARIABLES``) back on exit, for a module or
    session fixture's in-process fit (it runs before, and outside, the test's ``lightning_variables_restored``)."""
    return _lightning_variables_kept
