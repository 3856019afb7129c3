"""What users on macOS and Windows meet, simulated on Linux: a locale whose encoding is not UTF-8 (Windows' cp1252,
here an ASCII C locale), DataLoader workers started with ``spawn`` (the macOS and Windows default), a ``signal``
module without POSIX's signals, and devices the stages cannot train on (Apple's MPS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run_in_ascii_locale(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -X utf8=0 -c code`` in the C locale without UTF-8 mode: its default text encoding is ASCII, which,
    like Windows' cp1252, lacks the arrows and dashes of the reports (stdout a pipe, as when redirected to a file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, *args], capture_output=True, cwd=REPO,
                          env=env, timeout=300)


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """Reports were written and configs read in the locale's encoding: on Windows (cp1252) the evaluation report's
    arrows raised UnicodeEncodeError after the whole evaluation ("'charmap' codec can't encode character '\\u2191'"),
    and ``python -m mardini.configs_table`` failed on the paper configs' comments ("'ascii' codec can't decode byte
    0xc2" in this locale). Both are UTF-8 now, whatever the locale."""
    code = ("import sys, locale; assert locale.getpreferredencoding(False) != 'UTF-8';"
            "from mardini.data.sharding import write_text_atomic;"
            "write_text_atomic(sys.argv[1], 'PSNR \\u2191 \\u2013 \\u00a7');"
            "from mardini.configs_table import main; main([])")
    done = _run_in_ascii_locale(code, str(tmp_path / "report.md"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert (tmp_path / "report.md").read_bytes() == "PSNR \u2191 \u2013 \u00a7".encode()
    assert b"mardini-s" in done.stdout


def test_every_shipped_config_is_ascii():
    """jsonargparse reads a config in the locale's encoding: the paper configs' comments held "\u00a7" (section),
    which failed to load in an ASCII locale and decoded garbled under cp1252. Every file under configs/ is ASCII."""
    files = sorted(p for p in (REPO / "configs").rglob("*") if p.is_file())
    assert files
    bad = [f"{p.relative_to(REPO)}: {sorted({c for c in p.read_text(encoding='utf-8') if not c.isascii()})}"
           for p in files if not p.read_bytes().isascii()]
    assert not bad, f"non-ASCII characters in shipped configs (write them in ASCII): {bad}"


# the modules whose string literals are report text, written as UTF-8 whatever the locale
# (test_text_files_are_utf8_whatever_the_locale); every other literal of the package is ASCII
REPORT_WRITERS = {"mardini/evaluation/report_markdown.py", "mardini/evaluation/notices.py", "mardini/demo/report.py",
                  "mardini/reproduce/main.py", "mardini/reproduce/report.py", "mardini/reproduce/verdicts.py"}


def _non_ascii_literals(path: Path) -> list[str]:
    """The non-ASCII string literals of the Python file ``path`` outside docstrings, as ``path:line``."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isascii()
            and id(node) not in docstrings]


def test_the_names_the_package_logs_and_records_are_ascii(tmp_path):
    """Lightning's CSV logger writes metrics.csv in the locale's encoding (its header: the metric names), so a
    non-ASCII name would fail to write in an ASCII locale and come out garbled under cp1252. Every metric name, hparam
    name and default the package logs or records is built from its string literals (and the template names), and
    these are ASCII outside the report writers; hparams.yaml escapes any non-ASCII value a user gives (a path), so it
    is ASCII in any locale too."""
    from mardini.masking import TEMPLATES

    files = [p for p in sorted((REPO / "mardini").rglob("*.py"))
             if str(p.relative_to(REPO)).replace(os.sep, "/") not in REPORT_WRITERS]
    bad = [where for p in files for where in _non_ascii_literals(p)]
    assert not bad, f"non-ASCII string literals (metric or hparam names? write them in ASCII): {bad}"
    assert all(name.isascii() for name in TEMPLATES)
    code = ("import sys; from lightning.pytorch.core.saving import save_hparams_to_yaml;"
            "save_hparams_to_yaml(sys.argv[1], {'init_from': 'donn\\u00e9es/last.ckpt', 'lr': 0.001})")
    done = _run_in_ascii_locale(code, str(tmp_path / "hparams.yaml"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    written = (tmp_path / "hparams.yaml").read_bytes()
    assert written.isascii() and yaml.safe_load(written)["init_from"] == "donn\u00e9es/last.ckpt"


def test_the_fit_s_csv_logger_writes_metrics_csv_in_utf8_in_an_ascii_locale(tmp_path):
    """Lightning's CSV writer opens metrics.csv in the locale's encoding: a metric named with a non-ASCII letter (a
    user's callback, "loss_\u03c3") failed in an ASCII locale ("'ascii' codec can't encode character"). The CSV logger
    train.py fits log to (ContinuedCSVLogger) writes it in UTF-8, also when a new metric rewrites the header and when
    a resumed fit continues the file."""
    code = ("import sys; from mardini.lit.resumed_logs import ContinuedCSVLogger\n"
            "for step, names in ((0, ['loss_\\u03c3']), (1, ['loss_\\u03c3', 'val/\\u00e9cart'])):\n"
            "    log = ContinuedCSVLogger(save_dir=sys.argv[1], name='', version='')\n"
            "    log.experiment.continue_at = step or None\n"
            "    log.log_metrics({n: 1.5 for n in names}, step=step); log.save()\n"
            "    log.log_metrics({'val/\\u00e9cart': 2.5}, step=step + 1); log.save()\n")
    done = _run_in_ascii_locale(code, str(tmp_path))
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    rows = (tmp_path / "metrics.csv").read_bytes().decode("utf-8").splitlines()
    assert rows == ["loss_\u03c3,step,val/\u00e9cart", "1.5,0,", "1.5,1,1.5", ",2,2.5"]


def test_validate_s_csv_logger_writes_metrics_csv_in_utf8_in_an_ascii_locale(tmp_path):
    """``train.py validate`` rebuilt a configured CSVLogger as Lightning's own (validation_logger), which writes
    metrics.csv in the locale's encoding: a metric named "val/\u00e9cart" failed in an ASCII locale ("'ascii' codec
    can't encode character"). It logs to a UTF-8 one now, as the fit does."""
    code = ("import sys; from jsonargparse import Namespace\n"
            "from lightning.pytorch.loggers import CSVLogger\n"
            "from mardini.cli_loggers import validation_logger\n"
            "args = Namespace(save_dir=sys.argv[1], name='stage', version=0); locks = []\n"
            "log = validation_logger(CSVLogger(**args.as_dict()), {'init_args': args}, locks)\n"
            "log.log_metrics({'val/\\u00e9cart': 1.5}, step=0); log.save()\n"
            "[lock.release() for lock in locks]\n")
    done = _run_in_ascii_locale(code, str(tmp_path))
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    written = tmp_path / "stage" / "version_0" / "validate" / "version_0" / "metrics.csv"
    assert written.read_bytes().decode("utf-8").splitlines() == ["step,val/\u00e9cart", "0,1.5"]


def test_a_csv_logger_that_has_written_pickles_and_copies_as_lightning_s_does(tmp_path):
    """The fit's CSV logger once its writer is live (anything logged: hyper-parameters, a metric) is pickled (a
    ddp_spawn fit sends the trainer to its workers) and deep-copied as Lightning's is, and its copy goes on writing
    metrics.csv in UTF-8. Before, the UTF-8 wrapper's __getattr__ looked ``_fs`` up through itself while pickle and
    copy rebuilt it: "RecursionError: maximum recursion depth exceeded"."""
    import copy
    import pickle

    from mardini.lit.resumed_logs import ContinuedCSVLogger

    log = ContinuedCSVLogger(save_dir=str(tmp_path), name="", version="")
    log.log_metrics({"loss_\u03c3": 1.5}, step=0)
    log.save()
    for again in (pickle.loads(pickle.dumps(log)), copy.deepcopy(log)):
        again.log_metrics({"loss_\u03c3": 2.5}, step=1)
        again.save()
    rows = (tmp_path / "metrics.csv").read_bytes().decode("utf-8").splitlines()
    assert rows == ["loss_\u03c3,step", "1.5,0", "2.5,1", "2.5,1"]  # the original's row, then each copy's


def test_a_paper_config_loads_in_an_ascii_locale():
    """What ``train.py fit --config <paper stage>`` parses, in the C locale without UTF-8 mode."""
    code = ("import sys; from mardini.cli import main;"
            "main(['fit', '--config', sys.argv[1], '--config', sys.argv[2], '--print_config'])")
    done = _run_in_ascii_locale(code, "configs/paper/mardini-s/01_dm_warmup_a.yaml", "configs/paper/cluster.yaml")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"mardini-s" in done.stdout


def test_a_command_prints_what_stdout_cannot_encode_as_escapes():
    """evaluate.py prints its report table (arrows in the header) after writing it: a stdout in cp1252 (redirected to
    a file on Windows) failed there with "evaluate.py: error: 'charmap' codec can't encode character '\\u2191'" and
    exit status 2 after the whole evaluation. The entry points print what stdout cannot encode as escapes."""
    code = ("import sys; from mardini.user_errors import run_reporting_user_errors;"
            "sys.exit(run_reporting_user_errors('prog', lambda: print('psnr \\u2191')))")
    done = _run_in_ascii_locale(code)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.decode("ascii").strip() == "psnr \\u2191"


def test_apple_mps_is_refused_with_the_reason_and_the_fix_for_sampling_and_training():
    """``--device mps`` (sample.py, evaluate.py, the latent cache) and ``--trainer.accelerator mps`` were taken, then
    failed at the first float64 tensor of the diffusion schedule with torch's "Cannot convert a MPS Tensor to float64
    dtype" (on a Mac; torch.device("mps") itself is accepted everywhere). Both name the reason and the fix now."""
    import types

    import torch

    from mardini.devices import resolve_device
    from mardini.lit import GenerationModule

    with pytest.raises(ValueError, match=r"^device mps is not supported: Apple's MPS has no float64.*; use --device cpu"):
        resolve_device("mps")
    module = GenerationModule(size="tiny", frames=4, generator={"depth": 1}, planner_resolution=8)
    module._trainer = types.SimpleNamespace(precision="bf16-mixed", strategy=types.SimpleNamespace(
        root_device=torch.device("mps")), accumulate_grad_batches=1, datamodule=None)
    with pytest.raises(ValueError, match=r"^device mps is not supported: .*; use --trainer.accelerator cpu"):
        module.setup("fit")
    module._trainer.strategy.root_device = torch.device("cpu")
    module.setup("fit")  # the CPU is fine


@pytest.mark.parametrize("flags, warned", [
    (frozenset({"avx2", "avx512f"}), "this CPU has no native bf16 matrix multiplies"),
    (frozenset(), "this CPU's bf16 support could not be read"),  # no /proc/cpuinfo: macOS, Windows
    (frozenset({"avx512f", "avx512_bf16"}), None),
], ids=["no-bf16", "unknown", "avx512-bf16"])
def test_bf16_mixed_on_a_cpu_without_native_bf16_warns_and_names_32_true(monkeypatch, recwarn, flags, warned):
    """The tiny configs train in bf16-mixed on the CPU. On a CPU without AVX-512 BF16 or AMX (most laptops) torch
    emulates bf16 matrix multiplies, slower than fp32, and the fit said nothing.
    It warns now, naming --trainer.precision 32-true; a CPU with native bf16, as the demo's, gets no warning."""
    import types

    import torch

    from mardini import cpu_kernels
    from mardini.lit import GenerationModule

    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda path="/proc/cpuinfo": flags)
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    module = GenerationModule(size="tiny", frames=4, generator={"depth": 1}, planner_resolution=8)
    for precision in ("32-true", "bf16-mixed"):
        module._trainer = types.SimpleNamespace(precision=precision, strategy=types.SimpleNamespace(
            root_device=torch.device("cpu")), accumulate_grad_batches=1, datamodule=None)
        module.setup("fit")
    messages = [str(w.message) for w in recwarn.list if "bf16" in str(w.message)]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0] and "pass --trainer.precision 32-true" in messages[0]


def test_a_tiny_fit_runs_with_two_spawn_workers_through_train_py(tmp_path):
    """macOS and Windows start DataLoader workers with ``spawn``: the datasets, ``worker_init_fn``\\ s and the
    workers' batches must pickle, and the workers import the package afresh. Two spawn workers train a tiny stage
    through train.py, in a folder whose name has a space and a non-ASCII letter."""
    from mardini.data.testing import tiny_synthetic

    work = tmp_path / "run é x"
    tiny_synthetic(work / "data" / "shards" / "synthetic", train=24, val=16, frames=18, size=32)
    tiny = REPO / "configs" / "tiny"
    argv = ["train.py", "fit", "--config", str(tiny / "common.yaml"), "--config", str(tiny / "01_dm_warmup_4f.yaml"),
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.num_workers=2", "--data.init_args.epoch_size=8", "--data.init_args.batch_size=4",
            "--data.init_args.val_shards=null", "--trainer.precision=32-true"]  # validation: the same loader code
    code = ("import runpy, sys, torch.multiprocessing as mp; mp.set_start_method('spawn');"
            f"sys.argv = {argv!r}; runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = work / "outputs" / "tiny" / "01_dm_warmup_4f" / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    stream = state["VideoDataModule"]  # where each worker's stream stood: both delivered a batch
    assert state["global_step"] == 2 and stream["workers"] == 2 and [w for w, _, batches in stream["progress"]
                                                                       if batches == 1] == [0, 1]


def test_the_entry_points_import_and_protect_loader_workers_without_posix_only_signals():
    """Windows' ``signal`` has SIGTERM and SIGINT but no SIGUSR1, SIGHUP, SIGKILL, SIGALRM: nothing of ours may name
    them outside SLURM's own code path (Lightning's SLURM environment takes SIGUSR1 only off Windows)."""
    code = ("import signal\n"
            "for name in ('SIGUSR1', 'SIGUSR2', 'SIGHUP', 'SIGKILL', 'SIGALRM', 'SIGCHLD', 'SIGQUIT', 'SIGPIPE'):\n"
            "    delattr(signal, name)\n"
            "import mardini.cli, mardini.pipeline.cli, mardini.evaluation.cli, mardini.demo.main\n"
            "from mardini.data.datamodule import leave_first_sigterm_to_main\n"
            "from mardini.lit.preemption import TERMINATED\n"
            "leave_first_sigterm_to_main(0)\n"
            "assert TERMINATED == 143\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]


def test_reproduce_stops_before_anything_runs_where_table_3_cannot_measure_memory(monkeypatch, tmp_path):
    """``python -m mardini.reproduce`` ends with Table 3, whose benchmark reads the peak resident set through Linux's
    /proc/self: on macOS or Windows it failed there, after half an hour of training, and wrote no report. It stops
    before the data set is built now, naming the --only that leaves Table 3 out."""
    from mardini.reproduce import main as reproduce

    def reached(*args, **kwargs):
        raise AssertionError("the reproduction went on to build the data set")

    monkeypatch.setattr(reproduce, "check_demo_set", reached)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match=r"^Table 3 \(bench.asymmetric\) measures memory through Linux's /proc/self, "
                                         r"which this system \(darwin\) lacks: run with --only table2 fig6a fig6c"):
        reproduce.main(["--out", str(tmp_path), "--quick"])
    with pytest.raises(AssertionError, match="went on to build"):  # without Table 3 it goes on
        reproduce.main(["--out", str(tmp_path), "--quick", "--only", "fig6c"])


def test_shards_under_a_path_that_parses_as_a_url_scheme_are_read(monkeypatch, tmp_path):
    """webdataset takes ``C:\\data\\a.tar`` (any absolute Windows path) for a URL of scheme ``c``: every shard was
    skipped as corrupt ("no gopen handler defined") and the loader ended without a batch. The same happens on Linux
    to a relative folder named ``c:shards``, read here as a Windows drive would be."""
    from mardini.data.datamodule import VideoDataModule
    from mardini.data.testing import tiny_synthetic

    monkeypatch.chdir(tmp_path)
    tiny_synthetic(Path("c:shards"), train=6, val=4, frames=12, size=16)
    dm = VideoDataModule(train_shards="c:shards/train", val_shards="c:shards/val", frames=4, fps=None, resolution=16,
                         batch_size=2, num_workers=0, val_clips=4, shuffle_buffer=0, epoch_size=2)
    dm.setup("fit")
    assert [b["key"] for b in dm.val_dataloader()] == [["val-0000000", "val-0000001"], ["val-0000002", "val-0000003"]]
    assert next(iter(dm.train_dataloader()))["video"].shape == (2, 4, 3, 16, 16)
    assert dm.skipped == 0


def test_a_chain_rebatched_into_a_non_ascii_folder_is_read_by_train_py_in_any_locale(tmp_path):
    """``python -m mardini.rebatch`` (and the reproduction's config copies) head each config with a comment naming
    the folders. LightningCLI reads a config in the locale's encoding, so a folder named with a non-ASCII letter
    made a UTF-8 comment that train.py could not read where the locale is not UTF-8 ("train.py: error: 'ascii' codec
    can't decode byte 0xc3"; cp1252 decodes most such bytes, not all). The configs written are ASCII now."""
    from mardini.rebatch import main as rebatch

    dst = tmp_path / "chaîne é"
    written = rebatch([str(REPO / "configs" / "tiny"), str(dst), "--batch", "4", "--save-dir", "outputs/tiny_é"])
    assert all(path.read_bytes().isascii() for path in written)
    code = ("import sys; from mardini.cli import library_error, main;"
            "from mardini.user_errors import run_reporting_user_errors;"
            "sys.exit(run_reporting_user_errors('train.py', main, unwrap=library_error))")
    done = _run_in_ascii_locale(code, "fit", "--print_config", "--config", str(dst / "common.yaml"),
                                "--config", str(dst / "01_dm_warmup_4f.yaml"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"save_dir: outputs/tiny_" in done.stdout  # the rebatched chain's own folder, read
