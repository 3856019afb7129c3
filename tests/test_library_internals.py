"""The private (underscore) and undocumented APIs of torch, Lightning, torchmetrics, webdataset, PyAV and jsonargparse
that our code relies on, checked on the installed versions. Run this file first after bumping a pin in
requirements.txt (RELIABILITY.md, "Upgrading the libraries"): each failure names our file that depends on the API and
what to do, before a fit fails deep inside (or, worse, goes on with other behaviour)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

FIX = "read the library's changelog, port the code that relies on it, then update this test and RELIABILITY.md"

# (the private or undocumented API, our file that relies on it and how)
ATTRIBUTES = [
    ("lightning.pytorch.loops.fit_loop._FitLoop._can_stop_early",
     "mardini/lit/step_checkpoint.py (stops_inside_epoch: whether a stop set by a callback ends the fit now)"),
    ("lightning.pytorch.trainer.connectors.logger_connector.logger_connector._LoggerConnector.should_update_logs",
     "mardini/lit/step_logs.py (MarDiniBase._logs_written: trainer._logger_connector.should_update_logs)"),
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector._slurm_sigusr_handler_fn",
     "mardini/lit/preemption.py (PreemptionSave.on_train_start: which SIGUSR1 handler is Lightning's)"),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector._CheckpointConnector.hpc_save_path",
     "mardini/lit/preemption.py (PreemptionSave._save_path: the next hpc_ckpt_N.ckpt)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._save_checkpoint",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._save_checkpoint overrides it: a renamed one is never called)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._save_last_checkpoint",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._save_this_step)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._save_topk_checkpoint",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._save_this_step)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._ModelCheckpoint__resolve_ckpt_dir",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._own_folder: the folder whose not-empty warning it ignores)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._monitor_candidates",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._save_this_step)"),
    ("lightning.pytorch.callbacks.ModelCheckpoint._should_skip_saving_checkpoint",
     "mardini/lit/step_checkpoint.py (StepCheckpoint._save_this_step)"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter._check_log_dir_exists",
     "mardini/lit/resumed_logs.py (ContinuedWriter overrides it to keep metrics.csv: a renamed one is never called)"),
    ("lightning.pytorch.cli.LightningCLI._prepare_subcommand_parser",
     "mardini/cli.py (MarDiniCLI overrides it: ckpt_path 'last' and weights_only by default)"),
    ("lightning.pytorch.cli.LightningCLI._parse_ckpt_path",
     "mardini/cli.py (MarDiniCLI overrides it with nothing: a checkpoint's hyper-parameters are not merged)"),
    ("lightning.pytorch.cli.LightningCLI._get", "mardini/cli.py (MarDiniCLI.instantiate_trainer and others)"),
    ("lightning.pytorch.trainer.trainer.Trainer._fit_impl",
     "mardini/cli.py, cli_failed_fit.py (SpawnedFit replaces it on the trainer under ddp_spawn and calls it)"),
    ("lightning.pytorch.trainer.trainer.Trainer._teardown",
     "mardini/cli_failed_fit.py (SpawnedFit: a ddp_spawn worker's teardown before its clean-up)"),
    ("lightning.pytorch.trainer.call._interrupt",
     "mardini/cli_failed_fit.py (SpawnedFit: the on_exception hooks of a ddp_spawn worker's failed fit)"),
    ("lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher",
     "mardini/cli.py (MarDiniCLI.fit: whether the fit is spawned; wait_for_workers joins its procs)"),
    ("torch._foreach_mul_", "mardini/lit/loss_reduction.py (the element-reduction gradient rescale)"),
    ("torch._foreach_copy_", "mardini/lit/ema_weights.py (the EMA weights swapped in and out)"),
    ("torch._foreach_lerp_", "mardini/lit/fsdp.py (the sharded EMA update, timm ModelEmaV3's arithmetic)"),
    ("lightning.fabric.strategies.model_parallel._load_raw_module_state",
     "mardini/lit/fsdp.py (MarDiniFSDPStrategy.load_checkpoint: validate's pinned read into the FSDP model)"),
    ("torch._assert_async", "mardini/diffusion/checks.py (the range check of GPU diffusion times)"),
    ("torch.utils._python_dispatch.TorchDispatchMode",
     "mardini/sizing_autoencoder.py (peak_live_bytes: the storages each op of the VAE's encode creates)"),
    ("torch.utils._pytree.tree_flatten", "mardini/sizing_autoencoder.py (peak_live_bytes: an op's output tensors)"),
    ("torch._dynamo.config.recompile_limit", "bench/train_mfu.py (--compile: room for the blocks' variants)"),
    ("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
     "bench/common.py (flop_counter: CPU attention FLOPs; a renamed op is silently not counted)"),
    ("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward", "bench/common.py (flop_counter)"),
    ("webdataset.shardlists.expand_urls", "mardini/data/sharding.py (shard patterns with braces and '::')"),
    ("webdataset.tariterators.url_opener",
     "mardini/data/stream.py (_shard_samples: tarfile_samples' chain, the shard file closed by us)"),
    ("webdataset.tariterators.tar_file_expander",
     "mardini/data/stream.py (_shard_samples: tarfile_samples' chain, the shard file closed by us)"),
    ("webdataset.tariterators.group_by_keys",
     "mardini/data/stream.py (_shard_samples: tarfile_samples' chain, the shard file closed by us); "
     "mardini/pipeline/shard_clips.py (_index: a shard's clips keyed as the stream keys them)"),
    ("webdataset.tariterators.meta_prefix",
     "mardini/pipeline/shard_clips.py (_members: the members tar_file_iterator skips, skipped alike)"),
    ("webdataset.tariterators.meta_suffix", "mardini/pipeline/shard_clips.py (_members)"),
    ("av.sidedata.sidedata.SideDataContainer",
     "mardini/data/decode.py (display_matrix; without it frame.side_data, which keeps every frame alive)"),
    ("warnings.filters",
     "mardini/lit/expected_warnings.py (ignore, remove_filters: our entries taken out of the list in place)"),
    ("jsonargparse._common.debug_mode_active",
     "mardini/cli_parser.py (_jsonargparse_debug; without it JSONARGPARSE_DEBUG is read directly)"),
]


def resolve(dotted: str):
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def check_attribute(dotted: str, user: str) -> None:
    """Assert that ``dotted`` exists in the installed libraries, naming ``user`` when it does not."""
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as err:
        raise AssertionError(f"{dotted} is gone from the installed version ({err}); {user} relies on it: {FIX}") from err


@pytest.mark.parametrize("dotted,user", ATTRIBUTES, ids=[d.rsplit(".", 1)[-1] for d, _ in ATTRIBUTES])
def test_each_private_api_we_rely_on_exists(dotted, user):
    check_attribute(dotted, user)


def test_a_missing_private_api_fails_naming_the_file_that_relies_on_it(monkeypatch):
    from lightning.pytorch.loops.fit_loop import _FitLoop

    monkeypatch.delattr(_FitLoop, "_can_stop_early")
    dotted, user = ATTRIBUTES[0]
    with pytest.raises(AssertionError, match="mardini/lit/step_checkpoint.py .* relies on it: read the library's"):
        check_attribute(dotted, user)


class LoggingModel(BoringModel):
    """BoringModel logging one scalar per training step."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("x", float(batch_idx))
        return out


class StepLogger(L.pytorch.loggers.Logger):
    """The steps the trainer logs scalars at."""

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    name, version = "steps", 0

    def log_metrics(self, metrics, step=None):
        if "x" in metrics:
            self.steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer for BoringModel fits."""
    defaults = dict(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, logger=False, enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


def test_the_logged_step_is_batches_that_stepped_and_writing_it_moves_it(tmp_path):
    """mardini/lit/resumed_logs.py writes ``fit_loop.epoch_loop._batches_that_stepped`` (a resume's x-axis),
    mardini/lit/sample_grids.py reads it as the scalars' step, mardini/lit/step_logs.py reads
    ``_logger_connector.should_update_logs`` as "this batch's scalars are written"."""
    seen: list[tuple[int, bool]] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                trainer.fit_loop.epoch_loop._batches_that_stepped = 10  # as ResumedLogs does

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.fit_loop.epoch_loop._batches_that_stepped, trainer._logger_connector.should_update_logs))

    logger = StepLogger()
    trainer(tmp_path, max_steps=4, log_every_n_steps=2, logger=logger, callbacks=[Probe()]).fit(LoggingModel())
    assert [s for s, _ in seen] == [10, 11, 12, 13], (
        f"_batches_that_stepped at on_train_batch_end went {seen} after setting it to 10: mardini/lit/resumed_logs.py "
        f"(ResumedLogs) and mardini/lit/sample_grids.py rely on it being the logged step; {FIX}")
    assert {due for _, due in seen} == {True, False}, f"log_every_n_steps=2 gave should_update_logs {seen}"
    assert logger.steps == [s for s, due in seen if due], (
        f"Lightning logged at steps {logger.steps}, not at the _batches_that_stepped of the batches whose "
        f"should_update_logs was True ({seen}): mardini/lit/step_logs.py (_logs_written) and "
        f"mardini/lit/sample_grids.py rely on both; {FIX}")


def test_a_lightning_without_batches_that_stepped_is_one_error_at_a_resume(tmp_path):
    """Before, ResumedLogs assigned ``_batches_that_stepped`` whether Lightning had it or not: on a Lightning that
    logs at another counter a resumed fit's scalars silently went back to logging one step further on."""
    from types import SimpleNamespace

    from mardini.lit.resumed_logs import ResumedLogs

    fit = trainer(tmp_path)
    del fit.fit_loop.epoch_loop._batches_that_stepped  # as in a Lightning that no longer has it
    callback = ResumedLogs()
    callback._restored = True  # a fit resumed from a checkpoint
    with pytest.raises(RuntimeError, match="no _batches_that_stepped.*install requirements.txt's lightning"):
        callback.on_train_batch_start(fit, SimpleNamespace(automatic_optimization=True), None, 0)


def test_can_stop_early_is_whether_a_set_should_stop_ends_the_fit(tmp_path):
    """mardini/lit/step_checkpoint.py (stops_inside_epoch) reads ``fit_loop._can_stop_early`` as Lightning's
    "min_steps and min_epochs met"."""
    seen: list[bool] = []

    class Stopper(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = True
            seen.append(trainer.fit_loop._can_stop_early)

    fit = trainer(tmp_path, max_steps=6, min_steps=3, min_epochs=0, callbacks=[Stopper()])
    fit.fit(BoringModel())
    assert (fit.global_step, seen) == (3, [False, False, True]), (
        f"with min_steps=3 and should_stop set at every step the fit ran {fit.global_step} steps, _can_stop_early "
        f"{seen}: mardini/lit/step_checkpoint.py (stops_inside_epoch) relies on it; {FIX}")


def test_a_lightning_without_can_stop_early_is_one_error_naming_the_fix(tmp_path, monkeypatch):
    """Before, stops_inside_epoch took a missing ``_can_stop_early`` for True: a fit set to stop below ``min_steps``
    saved a checkpoint at every step it trained on."""
    from lightning.pytorch.loops.fit_loop import _FitLoop

    from mardini.lit.step_checkpoint import stops_inside_epoch

    fit = trainer(tmp_path)
    fit.should_stop = True  # and the epoch's last batch not reached
    monkeypatch.delattr(_FitLoop, "_can_stop_early")
    with pytest.raises(RuntimeError, match="no _can_stop_early; install requirements.txt's lightning"):
        stops_inside_epoch(fit)


def test_loaders_passed_to_fit_are_in_the_loops_data_source(tmp_path):
    """mardini/lit/preemption.py (passed_loaders) finds loaders passed to ``Trainer.fit`` in ``_data_source``."""
    from mardini.lit.preemption import passed_loaders

    train, val = DataLoader(RandomDataset(32, 8), batch_size=2), DataLoader(RandomDataset(32, 4), batch_size=2)
    found = []

    class Probe(L.Callback):
        def setup(self, trainer, pl_module, stage):
            found.extend(passed_loaders(trainer))

    trainer(tmp_path, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[Probe()]).fit(
        BoringModel(), train_dataloaders=train, val_dataloaders=val)
    assert found == [train, val], (f"passed_loaders found {found}: mardini/lit/preemption.py reads the fit loops' "
                                   f"_data_source (.instance, .is_module()); {FIX}")


def test_the_loop_counters_loop_state_edits_are_where_it_looks(tmp_path):
    """mardini/lit/loop_state.py (start_next_epoch) edits ``checkpoint["loops"]["fit_loop"]`` of a fit stopped at
    an epoch's last batch."""
    from mardini.lit.loop_state import start_next_epoch

    fit = trainer(tmp_path, max_steps=2, limit_train_batches=2)
    fit.fit(BoringModel())
    fit.save_checkpoint(tmp_path / "end.ckpt")
    checkpoint = torch.load(tmp_path / "end.ckpt", weights_only=False)
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    layout = (sorted(loops.get("epoch_progress", {}).get("current", {})),
              sorted(loops.get("epoch_loop.batch_progress", {}).get("current", {})),
              "is_last_batch" in loops.get("epoch_loop.batch_progress", {}))
    assert layout == (["completed", "processed", "ready", "started"], ["completed", "processed", "ready", "started"],
                      True), (f"checkpoint['loops']['fit_loop'] holds {sorted(loops)}: mardini/lit/loop_state.py "
                              f"looks for epoch_progress.current and epoch_loop.batch_progress there; {FIX}")
    assert start_next_epoch(checkpoint), "mardini/lit/loop_state.py found no finished epoch to start the next of"
    assert not any(checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"].values())


def test_model_checkpoint_saves_through_save_checkpoint(tmp_path):
    """StepCheckpoint (mardini/lit/step_checkpoint.py) drops superseded hpc_ckpt files in its ``_save_checkpoint``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saved = []

    class Recording(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            saved.append(filepath)
            super()._save_checkpoint(trainer, filepath)

    trainer(tmp_path, max_steps=2, enable_checkpointing=True,
            callbacks=[Recording(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)]).fit(BoringModel())
    assert len(saved) == 2, (f"ModelCheckpoint saved {saved} through _save_checkpoint over 2 steps of "
                             f"every_n_train_steps=1: mardini/lit/step_checkpoint.py overrides it; {FIX}")


def test_hpc_save_path_numbers_the_next_preemption_checkpoint(tmp_path):
    """mardini/lit/preemption.py saves where ``trainer._checkpoint_connector.hpc_save_path`` says."""
    fit = trainer(tmp_path)
    first = fit._checkpoint_connector.hpc_save_path(str(tmp_path))
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    second = fit._checkpoint_connector.hpc_save_path(str(tmp_path))
    assert (first, second) == (str(tmp_path / "hpc_ckpt_1.ckpt"), str(tmp_path / "hpc_ckpt_2.ckpt")), (
        f"hpc_save_path gave {first}, {second}: mardini/lit/preemption.py (PreemptionSave._save_path) and "
        f"mardini/cli_resume.py (resume_checkpoint: hpc_ckpt_N.ckpt) rely on it; {FIX}")
    assert fit._accelerator_connector.cluster_environment is not None, "mardini/lit/preemption.py reads it"


def _attribute_reads(name: str) -> list[str]:
    """``file:line`` of each read of the attribute ``name`` in the package (``x.name`` or ``getattr(x, "name")``)."""
    package = Path(__file__).resolve().parents[1] / "mardini"
    return [f"{path.relative_to(package.parent).as_posix()}:{n.lineno}" for path in sorted(package.rglob("*.py"))
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if (isinstance(n, ast.Attribute) and n.attr == name) or (isinstance(n, ast.Constant) and n.value == name)]


def test_attached_trainer_is_the_one_way_to_the_trainer_and_reads_no_private_attribute(tmp_path):
    """mardini/lit/fsdp.py's ``attached_trainer`` is where the package asks whether a module has a trainer: through the
    public ``LightningModule.trainer``, which raises a RuntimeError while detached (what it relies on), so no module
    reads the private ``LightningModule._trainer``. Before, mardini/lit/base.py and joint.py read it in 24 places
    (``if self._trainer is not None and ...``)."""
    from mardini.lit.fsdp import attached_trainer

    model, fit = BoringModel(), trainer(tmp_path)
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # mardini/lit/fsdp.py's attached_trainer takes this error for no trainer
    assert attached_trainer(model) is None, f"mardini/lit/fsdp.py (attached_trainer): {FIX}"
    model.trainer = fit
    assert attached_trainer(model) is fit, f"mardini/lit/fsdp.py (attached_trainer): {FIX}"
    reads = _attribute_reads("_trainer")
    assert reads == [], (f"LightningModule._trainer is read at {reads}; ask mardini.lit.fsdp.attached_trainer(module) "
                         "instead")


def test_experiment_writer_deletes_metrics_csv_only_in_check_log_dir_exists(tmp_path):
    """ContinuedWriter (mardini/lit/resumed_logs.py) keeps metrics.csv by overriding ``_check_log_dir_exists``."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from mardini.lit.resumed_logs import ContinuedWriter

    kept = {}
    for writer in (ContinuedWriter, ExperimentWriter):
        (tmp_path / "metrics.csv").write_text("step,x\n0,1\n")
        writer(log_dir=str(tmp_path))
        kept[writer.__name__] = (tmp_path / "metrics.csv").exists()
    assert kept == {"ContinuedWriter": True, "ExperimentWriter": False}, (
        f"metrics.csv kept by each writer's start: {kept}: mardini/lit/resumed_logs.py (ContinuedWriter) relies on "
        f"Lightning deleting it in _check_log_dir_exists alone; {FIX}")


def test_experiment_writer_opens_metrics_csv_through_its_fs_in_text_mode(tmp_path):
    """ContinuedWriter (mardini/lit/resumed_logs.py) writes metrics.csv in UTF-8 whatever the locale by wrapping the
    writer's ``_fs`` (Utf8Files: text-mode opens get ``encoding="utf-8"``); it relies on Lightning's writer opening
    the file through ``self._fs.open`` in text mode, both to write it and to rewrite it under a new header."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    writer, opened = ExperimentWriter(log_dir=str(tmp_path)), []

    class Recording:
        def __init__(self, fs) -> None:
            self.fs = fs

        def open(self, path, mode="rb", **kwargs):
            opened.append((str(path).rsplit("/", 1)[-1], mode))
            return self.fs.open(path, mode, **kwargs)

        def __getattr__(self, name):
            return getattr(self.fs, name)

    writer._fs = Recording(writer._fs)
    writer.log_metrics({"a": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"b": 2.0}, step=1)  # a new name: the file is read and written again under a new header
    writer.save()
    modes = {mode for name, mode in opened if name == "metrics.csv"}
    assert "r" in modes and "w" in modes and not any("b" in m for m in modes), (
        f"ExperimentWriter opened metrics.csv through _fs as {sorted(modes)}: mardini/lit/resumed_logs.py "
        f"(ContinuedWriter's Utf8Files) relies on every read and write of it going through _fs.open in text mode; {FIX}")


def test_distributed_sampler_wrapper_pads_by_position_as_the_distributed_sampler_does():
    """mardini/lit/clip_draws.py (validation_order: ``_distinct_share`` of Lightning's DistributedSamplerWrapper) reads
    the padding of the wrapper of a sampler of one's own as a DistributedSampler's: its ``dataset`` is as long as the
    wrapped sampler, and rank r's positions from ``len(range(r, N, R))`` on repeat clips other ranks validate."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from mardini.lit.clip_draws import _distinct_share

    for clips, ranks in [(3, 2), (5, 3), (4, 2), (7, 4)]:
        own = list(range(10, 10 + clips))  # a sampler of one's own: any iterable of indices
        shares = [list(DistributedSamplerWrapper(own, num_replicas=ranks, rank=r, shuffle=False)) for r in range(ranks)]
        wrappers = [DistributedSamplerWrapper(own, num_replicas=ranks, rank=r, shuffle=False) for r in range(ranks)]
        distinct = [share[:_distinct_share(w)] for share, w in zip(shares, wrappers)]
        assert sorted(i for d in distinct for i in d) == own and all(len(w.dataset) == clips for w in wrappers), (
            f"{clips} clips on {ranks} ranks: shares {shares}, taken as distinct {distinct}: mardini/lit/clip_draws.py "
            f"(validation_order) relies on DistributedSamplerWrapper padding by position; {FIX}")


def test_lightning_cli_builds_its_parsers_through_the_methods_mardini_cli_overrides(tmp_path):
    """MarDiniCLI (mardini/cli.py) overrides ``_prepare_subcommand_parser`` and ``_parse_ckpt_path``."""
    from lightning.pytorch.cli import LightningCLI

    called = []

    class Recording(LightningCLI):
        def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
            called.append(subcommand)
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)

        def _parse_ckpt_path(self):
            called.append("_parse_ckpt_path")

    quiet = {"fast_dev_run": True, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
             "default_root_dir": str(tmp_path)}
    Recording(BoringModel, args=["fit"], trainer_defaults=quiet, save_config_callback=None)
    assert {"fit", "validate", "_parse_ckpt_path"} <= set(called), (
        f"LightningCLI called {called}: mardini/cli.py (MarDiniCLI) overrides _prepare_subcommand_parser (the default "
        f"ckpt_path 'last') and _parse_ckpt_path (no hyper-parameters merged from a checkpoint); {FIX}")


def test_an_option_s_help_is_edited_in_argparse_s_actions_of_lightning_s_subcommand_parser():
    """mardini/cli_parser.py (set_help: describe_resume_options, describe_seed_option) gives options Lightning adds
    the help of what they do here by editing ``action.help`` in argparse's private ``parser._actions`` of each
    subcommand's parser, found by ``dest`` (jsonargparse has no setter for a help text)."""
    from lightning.pytorch.cli import LightningCLI

    parsers = {}

    class Built(Exception):
        pass

    class Recording(LightningCLI):
        def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
            parsers[subcommand] = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            return parsers[subcommand]

        def parse_arguments(self, parser, args):
            raise Built  # the parsers are built: nothing is parsed or run

    with pytest.raises(Built):
        Recording(BoringModel, args=["fit"])
    for subcommand in ("fit", "validate"):
        parser = parsers[subcommand]
        actions = {action.dest: action for action in getattr(parser, "_actions", [])}
        assert {"seed_everything", "ckpt_path", "weights_only"} <= set(actions), (
            f"{subcommand}'s parser._actions holds {sorted(actions)}: mardini/cli_parser.py (set_help) finds "
            f"--seed_everything, --ckpt_path and --weights_only there by dest; {FIX}")
        actions["seed_everything"].help = "the help given here"
        assert "the help given here" in parser.format_help(), (
            f"an edited action.help in {subcommand}'s parser._actions is not what --help prints: "
            f"mardini/cli_parser.py (set_help) relies on it; {FIX}")


def test_torch_foreach_ops_do_the_arithmetic_we_assume():
    """mardini/lit/loss_reduction.py, ema_weights.py and fsdp.py: ``_foreach_mul_`` by a 0-dim tensor,
    ``_foreach_copy_``, ``_foreach_lerp_``; mardini/diffusion/checks.py: ``_assert_async`` raises on the CPU."""
    a, b = [torch.ones(3), torch.full((2,), 2.0)], [torch.zeros(3), torch.full((2,), 4.0)]
    torch._foreach_mul_(a, torch.tensor(3.0))
    assert [t.tolist() for t in a] == [[3.0] * 3, [6.0] * 2], "torch._foreach_mul_ (mardini/lit/loss_reduction.py)"
    torch._foreach_lerp_(a, b, weight=0.5)
    assert [t.tolist() for t in a] == [[1.5] * 3, [5.0] * 2], "torch._foreach_lerp_ (mardini/lit/fsdp.py)"
    torch._foreach_copy_(a, b)
    assert [t.tolist() for t in a] == [t.tolist() for t in b], "torch._foreach_copy_ (mardini/lit/ema_weights.py)"
    with pytest.raises(RuntimeError, match="out of range"):
        torch._assert_async(torch.tensor(False), "out of range")


def test_fid_keeps_the_states_our_frechet_mixin_reads():
    """mardini/metrics/stats.py (FrechetStatsMixin) reads and writes torchmetrics FID's six states by name."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Mean(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.float().mean((2, 3))  # (N, 3)

    states = sorted(FrechetInceptionDistance(feature=Mean(), normalize=False).metric_state)
    assert states == sorted(f"{k}_features_{s}" for k in ("real", "fake") for s in ("sum", "cov_sum", "num_samples")), (
        f"torchmetrics FID's states are {states}: mardini/metrics/stats.py and fid.py rely on the six names; {FIX}")


def test_metric_state_registries_are_what_dropping_the_real_side_edits():
    """mardini/metrics/stats.py (FrechetStatsMixin._drop_real_states, for FrameFID(real_side=False)) removes FID's
    real states from torchmetrics Metric's ``_defaults``, ``_persistent`` and ``_reductions``: every state must be
    named there (and nowhere else) for the metric to reset, sync and save without them."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from mardini.metrics import FrameFID

    class Mean(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.float().mean((2, 3))  # (N, 3)

    full = FrechetInceptionDistance(feature=Mean(), normalize=False)
    names = set(full.metric_state)
    assert set(full._defaults) == set(full._persistent) == set(full._reductions) == names, (
        f"torchmetrics' state registries no longer list the states {sorted(names)}: mardini/metrics/stats.py "
        f"(_drop_real_states) edits _defaults, _persistent and _reductions; {FIX}")
    fake = FrameFID(2, 1, network=Mean(), real_side=False)
    fake.update(torch.rand(4, 1, 3, 8, 8) * 2 - 1, real=False)
    fake.reset()
    assert set(fake.metric_state) == set(fake._reductions) == names - {n for n in names if n.startswith("real_")} | \
        {"fake_num_videos"} and float(fake.fake_features_num_samples) == 0, (
        f"FrameFID(real_side=False) has states {sorted(fake.metric_state)} after a reset: mardini/metrics/stats.py "
        f"(_drop_real_states) relies on torchmetrics resetting the states its registries name; {FIX}")


def test_the_evaluation_loop_holds_its_pass_s_iterator_in_data_fetcher(tmp_path):
    """mardini/lit/loop_state.py (end_validation_workers, MarDiniBase.on_validation_end) tears down
    ``_data_fetcher`` of the evaluation loop that runs (the fit's ``val_loop``, or ``validate_loop``) at the end of a
    pass and sets it to None, as ``_EvaluationLoop.teardown`` does: the fetcher must be there then, holding the pass's
    ``CombinedLoader``, and the next pass must make a new one."""
    from lightning.pytorch.loops.fetchers import _DataFetcher
    from lightning.pytorch.utilities import CombinedLoader

    from mardini.lit.loop_state import end_validation_workers

    seen: list[str] = []

    class EndWorkers(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            validating = trainer.state.fn == "validate"
            loop = trainer.validate_loop if validating else trainer.fit_loop.epoch_loop.val_loop
            fetcher = loop._data_fetcher
            assert isinstance(fetcher, _DataFetcher) and isinstance(fetcher.combined_loader, CombinedLoader), (
                f"{'validate_loop' if validating else 'val_loop'}._data_fetcher is {fetcher!r} at on_validation_end: "
                f"mardini/lit/loop_state.py (end_validation_workers) relies on it; {FIX}")
            end_validation_workers(trainer)
            assert loop._data_fetcher is None
            seen.append(trainer.state.fn.value)

    fit = trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=1,
                  callbacks=[EndWorkers()])
    fit.fit(BoringModel())
    fit.validate(BoringModel(), verbose=False)
    assert seen == ["fit"] * 3 + ["validate"]


def test_fsdp_keeps_use_orig_params_on_the_root():
    """mardini/lit/fsdp.py (fsdp_root) reads ``FullyShardedDataParallel._use_orig_params`` (tests/test_fsdp_ema.py
    runs it under raw FSDP)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    assert "self._use_orig_params" in inspect.getsource(FullyShardedDataParallel.__init__) or \
        "_use_orig_params" in inspect.getsource(inspect.getmodule(FullyShardedDataParallel)), (
        f"FullyShardedDataParallel no longer sets _use_orig_params: mardini/lit/fsdp.py (fsdp_root) reads it; {FIX}")


def test_webdataset_and_pyav_helpers_behave_as_we_assume(monkeypatch):
    """mardini/data/sharding.py, stream.py (webdataset), mardini/data/decode.py (PyAV),
    mardini/cli_parser.py (jsonargparse)."""
    import av
    import webdataset as wds
    from av.sidedata.sidedata import SideDataContainer
    from jsonargparse._common import debug_mode_active

    assert wds.shardlists.expand_urls("a-{0..1}.tar::b.tar") == ["a-0.tar", "a-1.tar", "b.tar"], \
        "webdataset.shardlists.expand_urls (mardini/data/sharding.py)"
    assert {"worker_seed", "deterministic"} <= set(inspect.signature(wds.ResampledShards).parameters), \
        "webdataset.ResampledShards(worker_seed=, deterministic=) (mardini/data/stream.py: the exact resume)"
    with pytest.raises(KeyError):  # a container of the frame's side data, built apart from the frame
        SideDataContainer(av.VideoFrame(16, 16, "rgb24"))["DISPLAYMATRIX"]
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    assert debug_mode_active(), "jsonargparse._common.debug_mode_active (mardini/cli_parser.py)"


def test_an_ignore_filter_deleted_from_warnings_filters_stops_ignoring_at_once():
    """mardini/lit/expected_warnings.py (ignore, remove_filters): ``filterwarnings`` puts its entry first in
    ``warnings.filters``, the list ``warn`` reads, and deleting that entry in place shows the warning again without
    resetting the registries of warnings already shown (no public API removes one filter; the reset,
    ``warnings._filters_mutated``, is private and gone in Python 3.14): an ignored warning is never recorded."""
    from mardini.lit.expected_warnings import ignore, remove_filters

    def warn() -> None:  # one call site: one registry, one key
        warnings.warn("a probe of the filter list", UserWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # shown once per call site, then recorded in its registry
        added = ignore("a probe of the filter list", re.escape(__name__))
        assert added and warnings.filters[0] is added[0], (
            f"filterwarnings did not put its entry first in warnings.filters ({warnings.filters[:2]}): "
            f"mardini/lit/expected_warnings.py (ignore) relies on it; {FIX}")
        warn()
        ignored = list(caught)
        remove_filters(added)
        warn()
        warn()
    assert ignored == [] and [str(w.message) for w in caught] == ["a probe of the filter list"], (
        f"ignored ({ignored}), then shown once after its filter was deleted from warnings.filters ({caught}); "
        f"mardini/lit/expected_warnings.py (remove_filters) relies on it; {FIX}")
