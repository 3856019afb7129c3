"""The protocol command end to end on a few synthetic clips and a folder of videos, with the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mardini.data.testing import moving_frames, tiny_synthetic, write_video
from mardini.evaluation import cli, clip_choice, task_run
from mardini.evaluation.data import iter_batches, resolve_source
from mardini.metrics.stand_ins import FramePool, VideoPool
from mardini.strict_json import loads_strict


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=2, val=6, frames=12, size=16) / "val"


@pytest.fixture(scope="module")
def fitted_joint(tmp_path_factory) -> Path:
    """One 1-step tiny joint checkpoint of a 9-frame 16 px window, made once for the module (make_checkpoint is
    seeded: every call with these arguments fits the same weights)."""
    from mardini.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("joint") / "joint.ckpt", "joint", frames=9, size=16)


@pytest.fixture
def joint_ckpt(fitted_joint, tmp_path) -> Path:
    """The test's own copy of ``fitted_joint``, at ``tmp_path/joint.ckpt``."""
    import shutil

    return Path(shutil.copyfile(fitted_joint, tmp_path / "joint.ckpt"))


def test_cli_end_to_end_on_synthetic_shards(shards, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["--data", str(shards), "--tasks", "interpolation", "image_to_video", "--frames", "9", "--resolution",
            "16", "--num-clips", "6", "--batch-size", "4", "--metrics", "midf", "traj", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "| linear_blend |" in md and "| nearest_frame |" in md and "## image_to_video" in md
    interp = report["tasks"]["interpolation"]
    assert interp["clips"] == 6 and set(interp["results"]) == {"linear_blend", "nearest_frame"}
    lb, nf = interp["results"]["linear_blend"], interp["results"]["nearest_frame"]
    assert lb["midf_psnr"] != nf["midf_psnr"] and np.isfinite(lb["midf_ssim"])
    i2v = report["tasks"]["image_to_video"]["results"]
    assert i2v["linear_blend"] == i2v["nearest_frame"]  # one given frame: both baselines repeat it
    assert 0 <= nf["traj_detected"] <= 1 and nf["traj_err_px"] > 0
    clips = report["clip_list"]  # shard keys, and the source frames of each centred window (12 frames -> 1..9)
    assert len(clips) == 6 and len({c["key"] for c in clips}) == 6
    assert all(c["frame_indices"] == list(range(1, 10)) and c["fps"] > 0 for c in clips)
    assert cli.main(argv) == 0  # deterministic: same report again
    assert json.loads((out / "report.json").read_text())["tasks"]["interpolation"]["results"] == interp["results"]


def test_finished_tasks_are_on_disk_when_a_later_one_fails_and_progress_goes_to_stderr(
        shards, tmp_path, monkeypatch, capsys):
    run_task = cli.run_task

    def second_fails(task, *a, **k):
        if task == "image_to_video":
            raise RuntimeError("CUDA out of memory")
        return run_task(task, *a, **k)

    monkeypatch.setattr(cli, "run_task", second_fails)
    out = tmp_path / "report"
    argv = ["--data", str(shards), "--tasks", "interpolation", "image_to_video", "--resolution", "16",
            "--num-clips", "6", "--batch-size", "4", "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(argv)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "partial" and list(report["tasks"]) == ["interpolation"]
    assert report["tasks"]["interpolation"]["results"]["linear_blend"]["midf_psnr"] > 0
    md = (out / "report.md").read_text()
    assert "**Partial report**: 1 of 2 tasks finished" in md and "| linear_blend |" in md
    err = capsys.readouterr().err
    assert "evaluate.py: interpolation: 4/6 clips, " in err and "evaluate.py: interpolation: 6/6 clips, " in err
    assert " s/clip, about " in err
    monkeypatch.setattr(cli, "run_task", run_task)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads((out / "report.json").read_text())["status"] == "complete"
    assert "Partial" not in (out / "report.md").read_text() and "6/6 clips" not in captured.out  # progress: stderr only
    assert "evaluate.py: image_to_video: 6/6 clips" in captured.err


def test_run_as_a_module_its_errors_progress_and_recorded_command_name_it(shards, tmp_path, capsys):
    """``python -m mardini.evaluation.cli`` printed ``evaluate.py: interpolation: 6/6 clips, ...`` and
    ``evaluate.py: error: ...`` and recorded ``python evaluate.py ...`` as the report's command."""
    prog = "python -m mardini.evaluation.cli"
    with pytest.raises(SystemExit):
        cli.main(["--data", str(shards), "--batch-size", "0"], prog=prog)
    assert capsys.readouterr().err.startswith(f"usage: {prog} [-h]")
    assert cli.main(["--data", str(tmp_path / "none")], prog=prog) == 2
    assert capsys.readouterr().err.startswith(f"{prog}: error: ")
    out = tmp_path / "report"
    argv = ["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
            "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    assert cli.main(argv, prog=prog) == 0
    err = capsys.readouterr().err
    assert f"{prog}: interpolation: 6/6 clips, " in err and "evaluate.py" not in err
    assert json.loads((out / "report.json").read_text())["command"].startswith(f"{prog} --data ")
    assert cli.main(argv) == 0  # evaluate.py's names are kept
    assert "evaluate.py: interpolation: 6/6 clips, " in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["command"].startswith("python evaluate.py --data ")


def test_cli_scores_a_checkpoint_with_the_chosen_eta(shards, tmp_path, joint_ckpt):
    ckpt = joint_ckpt
    results = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--frames", "9", "--resolution", "16",
                         "--num-clips", "4", "--metrics", "midf", "--checkpoint", str(ckpt), "--steps", "3",
                         "--eta", eta, "--device", "cpu", "--cache-dir", "", "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())["tasks"]["interpolation"]
        assert report["protocol"]["eta"] == float(eta) and f"eta {float(eta)}" in (out / "report.md").read_text()
        results[eta] = report["results"]
    assert results["0"]["linear_blend"] == results["1"]["linear_blend"]
    assert results["0"]["mardini"]["midf_psnr"] != results["1"]["mardini"]["midf_psnr"]  # eta reached the sampler


def test_no_ema_samples_the_raw_weights_and_the_report_says_so(shards, tmp_path, joint_ckpt):
    ckpt = joint_ckpt  # raw and EMA weights differ
    results, reports = {}, {}
    for flag in ([], ["--no-ema"]):
        out = tmp_path / ("raw" if flag else "ema")
        assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--frames", "9", "--resolution", "16",
                         "--num-clips", "4", "--metrics", "midf", "--checkpoint", str(ckpt), "--steps", "2",
                         "--device", "cpu", "--cache-dir", "", "--out", str(out), *flag]) == 0
        reports[out.name] = report = json.loads((out / "report.json").read_text())
        results[out.name] = report["tasks"]["interpolation"]["results"]["mardini"]["midf_psnr"]
        assert ("raw weights (--no-ema)" in (out / "report.md").read_text()) == bool(flag)
    assert reports["ema"]["weights_sampled"] == "ema" and reports["raw"]["weights_sampled"] == "raw"
    assert results["ema"] != results["raw"]  # the other weights reached the sampler


def test_a_window_longer_than_the_checkpoint_trained_on_names_the_frames_to_use(shards, tmp_path, capsys,
                                                                              joint_ckpt):
    ckpt = joint_ckpt
    assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--frames", "12", "--resolution", "16",
                     "--num-clips", "2", "--metrics", "midf", "--checkpoint", str(ckpt), "--steps", "1",
                     "--cache-dir", "", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--frames 12 is more than the 9-frame window" in err and "evaluate it with --frames 9" in err
    assert "sample.py" not in err  # sample.py's remedy (long_video, slow_motion) is not one here


def test_window_gives_the_trained_window_of_a_checkpoint_that_records_none(shards, tmp_path, capsys, joint_ckpt):
    import torch

    ckpt = torch.load(joint_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["frames"] = None  # a module built without frames, fitted on a dataloader
    del ckpt["datamodule_hyper_parameters"]  # (no datamodule: no data recorded)
    bare = tmp_path / "no_window.ckpt"
    torch.save(ckpt, bare)
    run = ["--data", str(shards), "--tasks", "interpolation", "--frames", "9", "--resolution", "16", "--num-clips", "2",
           "--metrics", "midf", "--checkpoint", str(bare), "--steps", "1", "--cache-dir", "", "--out", str(tmp_path / "r")]
    with pytest.warns(UserWarning, match=r"no_window.ckpt records no trained window .* registry window of 4 frames"):
        assert cli.main(run) == 2  # the size's guess (tiny: 4 frames) is too short for the protocol
    assert "its size's guess, which --window T replaces" in capsys.readouterr().err
    assert cli.main([*run, "--window", "9"]) == 0


def test_each_clip_has_its_own_seed_whatever_the_batch_size(shards, tmp_path, joint_ckpt):
    from mardini.evaluation.protocol import batch_seed, clip_seeds

    # batches of 8 on one process: each clip keeps the seed its batch's seed gave it before (published figures hold)
    assert clip_seeds(3, 8, 8) == [batch_seed(3, 0, 1) + i for i in range(8)]
    assert clip_seeds(3, 0, 20)[10:13] == clip_seeds(3, 10, 3)
    ckpt = joint_ckpt
    results = {}
    for bs in ("4", "3"):
        out = tmp_path / f"bs{bs}"
        assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--frames", "9", "--resolution", "16",
                         "--num-clips", "6", "--batch-size", bs, "--metrics", "midf", "--checkpoint", str(ckpt),
                         "--steps", "2", "--eta", "1", "--device", "cpu", "--cache-dir", "", "--out", str(out)]) == 0
        results[bs] = json.loads((out / "report.json").read_text())["tasks"]["interpolation"]["results"]["mardini"]
    assert results["4"]["midf_psnr"] == pytest.approx(results["3"]["midf_psnr"], rel=1e-4)
    assert results["4"]["midf_ssim"] == pytest.approx(results["3"]["midf_ssim"], rel=1e-4)


def test_the_report_states_what_ran(shards, tmp_path, capsys):
    from mardini.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "generation.ckpt", "generation", frames=9, size=16)  # no planner: no guidance
    out = tmp_path / "out dir"
    argv = ["--data", str(shards), "--tasks", "image_to_video", "--frames", "9", "--resolution", "16", "--num-clips",
            "2", "--metrics", "midf", "--checkpoint", str(ckpt), "--steps", "1", "--cache-dir", "", "--out", str(out)]
    with pytest.warns(UserWarning, match="guidance 2.5 -> 1.0"):
        assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"]["image_to_video"]["protocol"]["guidance_scale"] == 1.0  # what the model ran with
    assert "Guidance 1.0," in (out / "report.md").read_text()
    import shlex
    assert shlex.split(report["command"])[2:] == argv  # quoted: '' and the space survive a copy and paste


def test_the_report_records_what_reproduces_it(shards, tmp_path, monkeypatch, joint_ckpt):
    """Before, report.json had the checkpoint's path only (last.ckpt is overwritten), ``"i3d_weights": None`` where
    the weights came from $MARDINI_WEIGHTS, and no code version, device or dtype. Now: the checkpoint's sha256 and
    global_step, each weight file's resolved path and sha256 (the protocol block names the file too), the git
    commit (and whether the checkout had changes), the package version, the device and the dtype."""
    import hashlib
    import subprocess

    import torch

    from mardini import weights

    stub_networks(monkeypatch, find_weights=True)  # FVD/FID on stand-in networks; the weight files are verified
    folder = tmp_path / "weights"
    folder.mkdir()
    for name, spec in weights.WEIGHTS.items():  # small files standing in for the real ones, under their names
        body = f"{name} weights".encode()
        (folder / spec.filename).write_bytes(body)
        monkeypatch.setitem(weights.WEIGHTS, name, weights.WeightSpec(
            name, spec.package, spec.archive, spec.member, spec.filename, hashlib.sha256(body).hexdigest(), len(body)))
    monkeypatch.setenv("MARDINI_WEIGHTS", str(folder))
    ckpt = joint_ckpt
    out = tmp_path / "r"
    assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "2",
                     "--checkpoint", str(ckpt), "--steps", "1", "--device", "cpu", "--cache-dir", "",
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    print({k: report[k] for k in ("checkpoint_file", "weights", "code", "device", "dtype")})
    assert report["checkpoint_file"] == {"path": str(ckpt.resolve()),
                                         "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
                                         "global_step": torch.load(ckpt, weights_only=True)["global_step"]}
    assert report["weights"] == {name: {"path": str((folder / spec.filename).resolve()), "sha256": spec.sha256}
                                 for name, spec in weights.WEIGHTS.items()}
    protocol = report["tasks"]["interpolation"]["protocol"]
    assert protocol["i3d_weights"] == report["weights"]["i3d"]["path"]
    assert protocol["inception_weights"] == report["weights"]["inception"]["path"]
    root = Path(cli.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert report["code"]["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert report["code"]["version"] == cli.mardini.__version__
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and "threads" in report["device_name"]
    assert cli.code_version(tmp_path) == {"version": cli.mardini.__version__, "git_commit": None, "git_dirty": None,
                                          "source": cli.run_info.source_digest()}  # no commit: the sources tell codes apart


def test_short_windows_take_fvd_only_padded(shards, capsys):
    argv = ["--data", str(shards), "--tasks", "interpolation", "--frames", "5", "--resolution", "16",
            "--num-clips", "2", "--metrics", "fvd"]
    assert cli.main(argv) == 2  # an impossible protocol: a message, not a traceback
    assert "--fvd-pad-short" in capsys.readouterr().err
    args = cli.parse_args([*argv, "--fvd-pad-short", "--cache-dir", ""])
    kind, files = resolve_source(args.data)
    res = cli.run_task("interpolation", args, cli.build_samplers(args), kind, files, 2, {"fvd": VideoPool()})
    assert [k for k in res["results"]["linear_blend"]] == ["fvd2_5f_pad"]  # padded to I3D's 9 frames, and named so


def test_non_finite_samples_stop_the_run_naming_the_method_and_clips(shards):
    def diverged(real, mask, seed):  # (B, T, 3, R, R): NaN in the second clip of each batch, inf in the first
        out = real.clone()
        out[0, 4] = float("inf")
        out[1:, 4, 0, 0, 0] = float("nan")
        return out

    args = cli.parse_args(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "4",
                           "--metrics", "midf", "--cache-dir", ""])
    kind, files = resolve_source(args.data)
    keys = next(iter_batches(kind, files, 9, None, 16, 4, 4))["key"]
    with pytest.raises(ValueError, match="method 'diverged' generated non-finite values") as err:
        cli.run_task("interpolation", args, {"linear_blend": cli.BASELINES["linear_blend"](), "diverged": diverged},
                     kind, files, 4)
    assert f"in 4 of 4 clips of a batch: {keys[0]} (768), {keys[1]} (1), " in str(err.value)
    md = cli.markdown({"data": "d", "clips": 2, "frames": 9, "resolution": 16, "fps": None, "seed": 0, "command": "c",
                       "tasks": {"interpolation": {
                           "results": {"m": {"midf_psnr": float("nan"), "midf_ssim": 0.5}, "n": {"midf_ssim": 0.4}},
                           "seconds_per_clip": {"m": 0.1, "n": 0.1}, "skipped_metrics": {}, "real_stats_cache": "none",
                           "protocol": {"guidance_scale": 1.0, "steps": 1}}}})
    assert "| m | NaN | 0.5000 | 0.100 |" in md and "| n | – | 0.4000 | 0.100 |" in md  # NaN apart from not computed


def _frechet_run(shards, tmp_path):
    """Interpolation on 6 shard clips with the stand-in FVD/FID networks and a real-statistics cache: a function
    running the task once, and the source's kind and files."""
    args = cli.parse_args(["--data", str(shards), "--tasks", "interpolation", "--frames", "9", "--resolution", "16",
                           "--num-clips", "6", "--cache-dir", str(tmp_path / "stats")])
    kind, files = resolve_source(args.data)
    nets = {"fvd": VideoPool(), "fid": FramePool()}
    samplers = cli.build_samplers(args)
    return lambda: cli.run_task("interpolation", args, samplers, kind, files, 6, nets), kind, files


def test_run_task_with_frechet_metrics_and_real_stats_cache(shards, tmp_path):
    run, _, _ = _frechet_run(shards, tmp_path)
    first = run()
    assert first["real_stats_cache"] == "computed" and len(list((tmp_path / "stats").iterdir())) == 2
    again = run()
    assert again["real_stats_cache"] == "hit" and again["results"] == first["results"]
    res = first["results"]
    assert res["linear_blend"]["fvd6_9f"] != res["nearest_frame"]["fvd6_9f"] and res["linear_blend"]["fid6_9f"] > 0


def test_every_method_is_scored_against_one_real_side_held_once(shards, monkeypatch):
    """Before, run_task built each method's suite with its own real FVD/FID states, only the first suite's ever
    filled (the real clips were scored once): per method past the first, FID's real 2048 x 2048 float64 covariance
    sum and torchmetrics' copy of its default, 64 MiB, and FVD's 400 x 400 ones. Now the other suites hold the
    generated side only: the real states and the real feature passes are those of one method however many are
    scored, and every method's FVD/FID is what an evaluation of it alone gives, to the last digit."""
    import torch

    from mardini.metrics import FrameFID, FrechetVideoDistance

    real_passes, suites = [], []
    for metric in (FrechetVideoDistance, FrameFID):  # record each update's side (before the metrics are built)
        def update(self, videos, real, *a, _update=metric.update, **k):
            real_passes.append(self.protocol) if real else None
            return _update(self, videos, real, *a, **k)

        monkeypatch.setattr(metric, "update", update)

    class Recorded(task_run.EvalSuite):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            suites.append(self)

    monkeypatch.setattr(task_run, "EvalSuite", Recorded)  # run_task builds the suites
    args = cli.parse_args(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
                           "--batch-size", "4", "--cache-dir", ""])
    kind, files = resolve_source(args.data)
    methods = {**{m: cli.BASELINES[m]() for m in cli.BASELINES}, "reversed": lambda real, mask, seed: real.flip(1)}

    def run(names: list[str]) -> tuple[dict, int, int]:
        """Results of scoring ``names`` together, the bytes of real-side states allocated, the real feature passes."""
        suites.clear(), real_passes.clear()
        res = cli.run_task("interpolation", args, {m: methods[m] for m in names}, kind, files, 6,
                           {"fvd": VideoPool(), "fid": FramePool()})
        real_bytes = sum(v.numel() * v.element_size() for s in suites for m in s.frechet.values()
                         for k, v in m.metric_state.items() if k.startswith("real_") and torch.is_tensor(v))
        return res["results"], real_bytes, len(real_passes)

    together, real_bytes, passes = run(list(methods))
    assert len(suites) == 3 and set(together) == set(methods)
    for name in methods:
        alone, alone_bytes, alone_passes = run([name])
        assert together[name] == alone[name], f"{name}: scored with the others {together[name]}, alone {alone}"
        assert (real_bytes, passes) == (alone_bytes, alone_passes) == (real_bytes, 4), (
            f"3 methods allocated {real_bytes} bytes of real states and ran {passes} real feature passes, one method "
            f"{alone_bytes} and {alone_passes}")
    assert together["linear_blend"]["fid6_9f"] != together["reversed"]["fid6_9f"]
    other = Recorded(suites[0].protocol, {"fvd": VideoPool(), "fid": FramePool()}, real_side=False)
    with pytest.raises(RuntimeError, match="holds no real side .* set_real_stats"):
        other.update_real(torch.zeros(1, 9, 3, 16, 16), suites[0].protocol.mask(1))
    with pytest.raises(RuntimeError, match="holds no real side .* before compute"):
        other.frechet["fvd"].real_stats()


def test_a_cached_real_statistics_file_of_other_clips_is_recomputed(shards, tmp_path, capsys):
    """The cache file records the digest of its clip keys; one that differs from this run's clips is not used."""
    import torch

    from mardini.evaluation.protocol import keys_digest

    run, kind, files = _frechet_run(shards, tmp_path)
    first = run()
    paths = sorted((tmp_path / "stats").iterdir())
    digest = torch.load(paths[0], weights_only=True)["keys_digest"]
    ids = [i for b in iter_batches(kind, files, 9, None, 16, 6, 4) for i in cli.clip_ids(b)]  # key, source frames
    assert digest == keys_digest(ids)
    for path in paths:  # statistics of other clips under the same cache key
        stats = torch.load(path, weights_only=True)
        torch.save({**stats, "mean": stats["mean"] + 1, "keys_digest": digest + 1}, path)
    capsys.readouterr()
    again = run()
    assert again["real_stats_cache"].startswith("recomputed") and again["results"] == first["results"]
    assert "were computed on other clips than the 6 this run read; recomputing them" in capsys.readouterr().err
    assert all(torch.load(p, weights_only=True)["keys_digest"] == digest for p in paths)  # the cache is rewritten
    assert run()["real_stats_cache"] == "hit"


def test_an_unreadable_real_statistics_cache_file_is_a_miss_recomputed_and_rewritten(shards, tmp_path):
    """A truncated cache file (an interrupted copy, a full disk) crashed the run with torch's
    ``PytorchStreamReader failed reading zip archive``; now it warns naming the file, recomputes the statistics and
    overwrites the file atomically."""
    import torch

    run, _, _ = _frechet_run(shards, tmp_path)
    first = run()
    path = sorted((tmp_path / "stats").iterdir())[0]
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=f"real-statistics cache file {path} cannot be read") as warned:
        again = run()
    print(warned[0].message)
    assert again["real_stats_cache"] == "computed" and again["results"] == first["results"]
    assert "keys_digest" in torch.load(path, weights_only=True)  # rewritten whole
    assert len(list((tmp_path / "stats").iterdir())) == 2  # no temp file left beside them
    assert run()["real_stats_cache"] == "hit"


def test_cached_real_statistics_of_other_source_frames_of_the_same_files_are_not_reused(tmp_path, monkeypatch,
                                                                                        capsys):
    """A cache written when a variable-frame-rate file was read by index (as before it was read by timestamp at a
    given --fps) has the same files, window settings and clip keys; its statistics are of other frames. The cache
    records the digest of each clip's key and source frames, so they are recomputed: the results are those of a run
    without the cache. Before, the stale statistics were taken ("hit") and FVD/FID scored against other frames."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the VFR test files of test_data_videos
    from test_data_videos import VFR_TIMES, _numbered_video, _timed_video

    from mardini.evaluation import data

    _timed_video(tmp_path / "videos" / "a_vfr.mkv", VFR_TIMES)
    _numbered_video(tmp_path / "videos" / "b_cfr.mp4", 40, 30)

    def run(cache: str) -> dict:
        args = cli.parse_args(["--data", str(tmp_path / "videos"), "--tasks", "interpolation", "--frames", "9",
                               "--fps", "7.5", "--resolution", "16", "--num-clips", "2", "--cache-dir", cache])
        kind, files = resolve_source(args.data)
        return cli.run_task("interpolation", args, cli.build_samplers(args), kind, files, 2,
                            {"fvd": VideoPool(), "fid": FramePool()})

    fresh = run("")  # no cache: the VFR file read by timestamp
    assert fresh["clip_list"][0]["timing"] == "pts"
    with monkeypatch.context() as m:  # the old rule: every file by index
        m.setattr(data, "choose_frames", lambda *a, **k: (None, "read by index"))
        old = run(str(tmp_path / "stats"))
    assert old["real_stats_cache"] == "computed" and "timing" not in old["clip_list"][0]
    assert old["clip_list"][0]["frame_indices"] != fresh["clip_list"][0]["frame_indices"]
    capsys.readouterr()
    again = run(str(tmp_path / "stats"))
    assert again["real_stats_cache"] != "hit", "statistics of other source frames were reused"
    assert again["real_stats_cache"].startswith("recomputed") and again["results"] == fresh["results"]
    assert "were computed on other clips than the 2 this run read" in capsys.readouterr().err
    assert run(str(tmp_path / "stats"))["real_stats_cache"] == "hit"


def test_cli_on_a_folder_of_videos(tmp_path):
    for i, (codec, ext) in enumerate([("libx264", "mp4"), ("mpeg4", "avi"), ("libx264", "mkv")]):
        write_video(tmp_path / "videos" / f"v{i}.{ext}", moving_frames(14, 24, 32, seed=i), 10, codec=codec)
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "report"
    argv = ["--data", str(tmp_path / "videos"), "--preset", "vidim", "--resolution", "16", "--num-clips", "3",
            "--metrics", "midf", "--out", str(out)]
    assert cli.main(argv) == 0
    task = json.loads((out / "report.json").read_text())["tasks"]["interpolation"]
    assert task["clips"] == 3 and any("broken" in k for k in task["skipped_videos"])
    assert task["results"]["linear_blend"]["midf_psnr"] > task["results"]["nearest_frame"]["midf_psnr"]


def strict_json(path: Path) -> dict:
    """``path`` parsed as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` refused, as many parsers do."""
    return loads_strict(path.read_text())


def test_an_exactly_reproduced_middle_frame_keeps_midf_psnr_finite_and_the_report_strict_json(tmp_path):
    """Two lossless (FFV1) videos, one static: its blended middle frame is exact. Before, its PSNR was inf, so the
    mean over the clips was ``inf`` and report.json held ``Infinity``; now each image's PSNR is capped at 100 dB."""
    videos = tmp_path / "videos"
    write_video(videos / "g1.avi", moving_frames(12, 24, 24, seed=1), 10, codec="ffv1", pix_fmt="bgr0")
    write_video(videos / "g2.avi", np.repeat(moving_frames(1, 24, 24, seed=2), 12, 0), 10, codec="ffv1",
                pix_fmt="bgr0")  # static
    out = tmp_path / "report"
    assert cli.main(["--data", str(videos), "--preset", "vidim", "--resolution", "24", "--metrics", "midf",
                     "--cache-dir", "", "--out", str(out)]) == 0
    print((out / "report.md").read_text())
    report = strict_json(out / "report.json")
    psnr = report["tasks"]["interpolation"]["results"]["linear_blend"]["midf_psnr"]
    assert 50 < psnr < 100  # (100 dB of the static clip + the moving one's) / 2
    assert "| inf |" not in (out / "report.md").read_text()


def test_non_finite_results_are_written_as_null_with_a_notice(tmp_path):
    """report.json is strict JSON: an undefined result (NaN, e.g. no object detected) is null, and its notices say
    which values; report.md keeps showing NaN."""
    report = {"data": "d", "clips": 2, "frames": 9, "resolution": 16, "fps": None, "seed": 0, "command": "c",
              "notices": ["an earlier note"], "tasks": {"interpolation": {
                  "results": {"m": {"traj_err_px": float("nan"), "midf_ssim": 0.5}, "n": {"x": float("inf")}},
                  "seconds_per_clip": {"m": 0.1, "n": 0.1}, "skipped_metrics": {}, "real_stats_cache": "none",
                  "protocol": {"guidance_scale": 1.0, "steps": 1}}}}
    cli.write_report(tmp_path, report)
    written = strict_json(tmp_path / "report.json")
    results = written["tasks"]["interpolation"]["results"]
    assert results["m"] == {"traj_err_px": None, "midf_ssim": 0.5} and results["n"] == {"x": None}
    assert written["notices"][0] == "an earlier note" and len(written["notices"]) == 2
    assert written["notices"][1].startswith("2 non-finite values are written as null (JSON has no NaN or infinity): "
                                            "tasks.interpolation.results.m.traj_err_px = nan, ")
    assert report["notices"] == ["an earlier note"]  # the report in memory is left as it is
    assert "| m | 0.5000 | NaN | – | 0.100 |" in (tmp_path / "report.md").read_text()


def test_clips_read_away_from_the_asked_fps_are_reported(tmp_path, capsys):
    """--fps 12 on sources at 10 and 25 fps: strides 1 and 2 read them at 10 (17 % off) and 12.5 fps (4 %)."""
    videos = tmp_path / "videos"
    write_video(videos / "a10.mp4", moving_frames(20, 24, 32, seed=0), 10)
    write_video(videos / "b25.mp4", moving_frames(20, 24, 32, seed=1), 25)
    write_video(videos / "c10.mp4", moving_frames(20, 24, 32, seed=2), 10)
    out = tmp_path / "report"
    argv = ["--data", str(videos), "--tasks", "interpolation", "image_to_video", "--resolution", "16",
            "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    assert cli.main([*argv, "--fps", "12"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fps_effective"] == {"min": 10.0, "max": 12.5}
    note = "2 of 3 clips were read at 10 fps, more than 10% from --fps 12"
    err = capsys.readouterr().err
    assert err.count(note) == 1 and any(n.startswith(note) for n in report["notices"])  # once per run
    md = (out / "report.md").read_text()
    assert "(fps: 12.0; read at 10-12.5)" in md and f"Note: {note}" in md
    assert report["clip_list"] == [  # the inputs, for another method: centred windows at strides 1, 2, 1 of 20 frames
        {"key": str(videos / "a10.mp4"), "frame_indices": list(range(5, 14)), "fps": 10.0},
        {"key": str(videos / "b25.mp4"), "frame_indices": list(range(1, 18, 2)), "fps": 12.5},
        {"key": str(videos / "c10.mp4"), "frame_indices": list(range(5, 14)), "fps": 10.0}]
    assert all("clip_list" not in t for t in report["tasks"].values())  # once, for every task
    assert cli.main(argv) == 0  # the native rate: each clip at its own, nothing to warn about
    assert "clips were read at" not in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["fps_effective"] == {"min": 10.0, "max": 25.0}
    assert "(fps: native)" in (out / "report.md").read_text()


def test_default_num_clips_is_the_usable_count(tmp_path, capsys):
    """Without --num-clips, corrupt and too-short videos lower N before any task: every task on the same clips."""
    videos = tmp_path / "videos"
    for i in range(3):
        write_video(videos / f"v{i}.mp4", moving_frames(14, 24, 32, seed=i), 10)
    write_video(videos / "short.mp4", moving_frames(5, 24, 32), 10)  # 5 frames, the window needs 9
    (videos / "broken.mp4").write_bytes((videos / "v0.mp4").read_bytes()[:200])  # truncated
    out = tmp_path / "report"
    argv = ["--data", str(videos), "--tasks", "interpolation", "image_to_video", "--resolution", "16",
            "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    skipped = report["skipped_videos"]
    assert sorted(skipped) == [str(videos / "broken.mp4"), str(videos / "short.mp4")]
    assert "has 5 frames" in skipped[str(videos / "short.mp4")]
    assert report["clips"] == 3 and {t: r["clips"] for t, r in report["tasks"].items()} == {
        "interpolation": 3, "image_to_video": 3}
    assert all(r["skipped_videos"] == skipped for r in report["tasks"].values())
    md = (out / "report.md").read_text()
    assert md.count("3 clips,") == 1 and "2 videos skipped (unusable)" in md and "short.mp4`: need 9 frames" in md
    assert cli.main([*argv, "--num-clips", "4"]) == 2  # asked for explicitly: an error, before any sampling
    err = capsys.readouterr().err
    assert "gives 3 usable clips" in err and "lower --num-clips to 3" in err and "short.mp4" in err
    for name in ("v1.mp4", "v2.mp4"):
        (videos / name).unlink()
    assert cli.main(argv) == 2 and "needs at least 2" in capsys.readouterr().err  # one usable clip: no protocol


def test_clips_left_out_by_the_default_cap_are_noted_with_the_option_that_scores_them(tmp_path, monkeypatch, capsys):
    """Without --num-clips at most DEFAULT_MAX_CLIPS (256) clips are scored; VIDIM-Bench has ~400 videos, and the
    rest were left out without a word. Here the cap is 2 on 3 videos."""
    monkeypatch.setattr(clip_choice, "DEFAULT_MAX_CLIPS", 2)  # choose_num_clips and capped_note read it
    videos = tmp_path / "videos"
    for i in range(3):
        write_video(videos / f"v{i}.mp4", moving_frames(12, 24, 32, seed=i), 10)
    out = tmp_path / "report"
    argv = ["--data", str(videos), "--preset", "vidim", "--resolution", "16", "--metrics", "midf", "--cache-dir", "",
            "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    note = f"2 of the 3 clips {videos} holds were scored: without --num-clips the protocol takes the first 2 usable " \
           "ones; --num-clips N scores more, up to the usable ones of the 3 (a file that does not decode, or is too " \
           "short, is skipped)"
    assert report["clips"] == 2 and report["clips_available"] == 3 and note in report["notices"]
    assert f"evaluate.py: note: {note}" in capsys.readouterr().err
    assert f"Note: {note}" in (out / "report.md").read_text()
    assert cli.main([*argv, "--num-clips", "3"]) == 0  # every clip: nothing left out, nothing to note
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == report["clips_available"] == 3 and report["notices"] == []
    assert "were scored" not in capsys.readouterr().err


def test_undecodable_shard_samples_lower_the_default_n_before_any_task(shards, tmp_path, capsys):
    """Shards read like video folders: bad samples are found before sampling, N is the usable count."""
    import shutil

    from mardini.data.sharding import atomic_tar, json_bytes

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    with atomic_tar(data / "zz-bad.tar") as sink:  # sorted last: after the 6 good clips
        sink.write({"__key__": "junk", "json": json_bytes({"frames": 12, "fps": 8.0}), "video.mp4": b"not a video"})
        sink.write({"__key__": "short", "json": json_bytes({"frames": 3, "fps": 8.0}), "video.mp4": b"x"})
    out = tmp_path / "report"
    argv = ["--data", str(data), "--tasks", "interpolation", "image_to_video", "--resolution", "16",
            "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == 6 and all(r["clips"] == 6 for r in report["tasks"].values())
    assert list(report["skipped_videos"]) == ["2 shard samples"]
    assert "Skipped while reading the shards" in (out / "report.md").read_text()
    assert cli.main([*argv, "--num-clips", "8"]) == 2  # the 8 samples held are asked for: refused before sampling
    err = capsys.readouterr().err
    assert "gives 6 usable clips" in err and "lower --num-clips to 6" in err and "2 shard samples" in err


def test_a_report_of_other_data_with_the_same_name_is_not_overwritten(shards, tmp_path, monkeypatch, capsys):
    import shutil

    other = tmp_path / "elsewhere" / shards.name  # another split with the same folder name
    shutil.copytree(shards, other)
    monkeypatch.chdir(tmp_path)
    argv = ["--tasks", "interpolation", "--resolution", "16", "--num-clips", "2", "--metrics", "midf", "--cache-dir", ""]
    assert cli.main(["--data", str(shards), *argv]) == 0
    first = tmp_path / "outputs" / "eval" / shards.name / "report.json"
    assert json.loads(first.read_text())["data_path"] == str(shards.resolve())
    assert cli.main(["--data", str(other), *argv]) == 0
    written = sorted(p.name for p in (tmp_path / "outputs" / "eval").iterdir())
    assert len(written) == 2 and written[0] == shards.name and written[1].startswith(f"{shards.name}-")
    assert json.loads(first.read_text())["data_path"] == str(shards.resolve())  # the first report is intact
    assert f"holds the report of {shards.resolve()}" in capsys.readouterr().err
    assert cli.main(["--data", str(shards), *argv]) == 0  # the same data again: its own folder, rewritten
    assert len(list((tmp_path / "outputs" / "eval").iterdir())) == 2


def test_sampling_at_other_settings_than_training_is_noted():
    from types import SimpleNamespace

    pipe = SimpleNamespace(resolution=(32, 32), fps=8.0)
    same = SimpleNamespace(resolution=32, fps=8.0)
    assert cli.training_mismatch(pipe, same) == [] and cli.training_mismatch(None, same) == []
    notes = cli.training_mismatch(pipe, SimpleNamespace(resolution=256, fps=None, sample_resolution="protocol"))
    assert notes == ["the checkpoint trained at 32x32 px, the protocol samples it at 256x256 (--sample-resolution)",
                     "the checkpoint trained on clips at 8 fps, the protocol reads every frame (native rate) (--fps)"]
    by_default = cli.training_mismatch(pipe, SimpleNamespace(resolution=256, fps=8.0, sample_resolution=None))
    assert by_default == []  # sampled at its own 32 px, scored at 256
    md = cli.markdown({"data": "d", "clips": 2, "frames": 9, "resolution": 256, "fps": None, "seed": 0,
                       "command": "c", "notices": notes, "tasks": {}})
    assert "Note: the checkpoint trained at 32x32 px" in md


def test_the_model_samples_at_its_training_size_and_is_scored_at_the_protocols(shards, tmp_path, monkeypatch):
    """A checkpoint trained at 32 px on a 16-px protocol: the pipeline is given the clips read at 32 px, and its
    outputs are scored downscaled to 16 px with the real given frames (``--sample-resolution protocol``: at 16)."""
    from pipeline_helpers import record_sampled_and_scored

    from mardini.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "at32.ckpt", "joint", frames=9, size=32)  # records its 32 px as train.py does
    sampled, scored = record_sampled_and_scored(monkeypatch)
    run = ["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "2", "--metrics",
           "midf", "--checkpoint", str(path), "--steps", "1", "--device", "cpu", "--cache-dir", ""]
    assert cli.main([*run, "--out", str(tmp_path / "own")]) == 0
    print("sampled at", sampled, "scored (real, fake, given frames real):", scored)
    assert sampled == [(32, 32)] and scored == [((16, 16), (16, 16), True)] * 3  # 2 baselines + the model
    report = json.loads((tmp_path / "own" / "report.json").read_text())
    assert report["sample_resolution"] == 32 and report["notices"] == [] and report["resolution"] == 16
    assert report["tasks"]["interpolation"]["protocol"]["extra"]["sample_resolution"] == 32
    assert "16 px; the model sampled at 32 px, downscaled (" in (tmp_path / "own" / "report.md").read_text()
    sampled.clear()
    assert cli.main([*run, "--sample-resolution", "protocol", "--out", str(tmp_path / "protocol")]) == 0
    report = json.loads((tmp_path / "protocol" / "report.json").read_text())
    assert sampled == [(16, 16)] and report["sample_resolution"] == 16
    assert report["notices"] == ["the checkpoint trained at 32x32 px, the protocol samples it at 16x16 "
                                 "(--sample-resolution)"]


def test_a_checkpoint_trained_at_hxw_is_sampled_and_scored_at_hxw(shards, tmp_path, monkeypatch, capsys):
    """A checkpoint trained at 16x32: ``--resolution 16x32`` samples it at 16x32 and scores 16x32 frames (FID/FVD
    included: their networks centre-crop), the report saying 16x32; a square ``--resolution 16`` samples it at 16x16
    with a note naming the ``--resolution`` to pass."""
    from pipeline_helpers import record_sampled_and_scored

    from mardini.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "at16x32.ckpt", "joint", frames=9, size=(16, 32))  # records 16x32 as train.py does
    sampled, scored = record_sampled_and_scored(monkeypatch)
    stub_networks(monkeypatch)
    run = ["--data", str(shards), "--tasks", "interpolation", "--num-clips", "2", "--checkpoint", str(path),
           "--steps", "1", "--device", "cpu", "--cache-dir", ""]
    assert cli.main([*run, "--resolution", "16x32", "--out", str(tmp_path / "hxw")]) == 0
    assert sampled == [(16, 32)] and scored == [((16, 32), (16, 32), True)] * 3  # 2 baselines + the model
    report = json.loads((tmp_path / "hxw" / "report.json").read_text())
    assert report["resolution"] == [16, 32] and report["sample_resolution"] == [16, 32]
    assert [n for n in report["notices"] if "checkpoint trained" in n] == []  # only the few-clips caveat
    assert report["tasks"]["interpolation"]["protocol"]["resolution"] == [16, 32]
    assert {"fvd2_9f", "fid2_9f", "midf_psnr"} <= set(report["tasks"]["interpolation"]["results"]["mardini"])
    assert "2 clips, 9 frames at 16x32 px (fps" in (tmp_path / "hxw" / "report.md").read_text()
    sampled.clear()
    assert cli.main([*run, "--resolution", "16", "--metrics", "midf", "--out", str(tmp_path / "side")]) == 0
    report = json.loads((tmp_path / "side" / "report.json").read_text())
    assert sampled == [(16, 16)] and report["resolution"] == 16 and report["sample_resolution"] == 16
    assert report["notices"] == ["the checkpoint trained at 16x32 px, the protocol samples it at 16x16 "
                                 "(--sample-resolution); score at its aspect ratio to sample it at its own size "
                                 "(--resolution 16x32)"]


@pytest.mark.parametrize(
    "argv, size",
    [(["--resolution", "36x64"], (36, 64)), (["--resolution", "36X64"], (36, 64)), (["--resolution", "32x32"], 32),
     (["--resolution", "48"], 48), ([], 256), (["--preset", "synthetic"], 32)],
)
def test_resolution_takes_a_side_or_hxw(argv, size):
    assert cli.parse_args(["--data", "x", *argv]).resolution == size


def test_sample_resolution_takes_hxw_of_the_protocols_aspect_ratio(capsys):
    base = ["--data", "x", "--checkpoint", "c", "--resolution", "36x64"]
    assert cli.parse_args([*base, "--sample-resolution", "72x128"]).sample_resolution == (72, 128)
    assert cli.parse_args([*base, "--sample-resolution", "protocol"]).sample_resolution == "protocol"
    with pytest.raises(SystemExit):
        cli.parse_args([*base, "--sample-resolution", "64"])
    assert ("--sample-resolution 64 has another aspect ratio than --resolution 36x64: its outputs would be stretched"
            in capsys.readouterr().err)


def stub_networks(monkeypatch, find_weights: bool = False):
    """Make every ``cli.run_task`` of ``cli.main`` score FVD/FID with the stand-in feature networks (no weights:
    unless ``find_weights``, the weight files are not looked for either)."""
    if not find_weights:
        monkeypatch.setattr(cli, "metric_weights", lambda args: {})
    run_task = cli.run_task
    monkeypatch.setattr(cli, "run_task", lambda *a, **k: run_task(*a, networks={"fvd": VideoPool(), "fid": FramePool()},
                                                                  **k))


def test_fvd_and_fid_from_few_clips_are_noted(shards, tmp_path, monkeypatch, capsys):
    """On the result names a run produces (fvd6_9f, fid6_9f), in the report and on stderr."""
    stub_networks(monkeypatch)
    out = tmp_path / "report"
    assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
                     "--cache-dir", "", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"fvd6_9f", "fid6_9f"} <= set(report["tasks"]["interpolation"]["results"]["linear_blend"])
    note = "FID and FVD from 6 clips: a Fréchet distance is biased upward"
    assert note in capsys.readouterr().err and any(n.startswith(note) for n in report["notices"])
    assert f"Note: {note}" in (out / "report.md").read_text()
    results = report["tasks"]["interpolation"]["results"]
    assert cli.small_sample_note({**report, "clips": cli.SMALL_FRECHET_SAMPLE}) is None
    none = {"linear_blend": {"midf_psnr": 16.0, "fvd6_9f": None}, "mardini": {"midf_psnr": 15.0}}
    assert cli.small_sample_note({"clips": 6, "tasks": {"interpolation": {"results": none}}}) is None  # none computed
    pad = {m: {"fvd6_5f_pad": r["fvd6_9f"]} for m, r in results.items()}
    assert cli.small_sample_note({"clips": 6, "tasks": {"i": {"results": pad}}}).startswith("FVD from 6 clips")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "interpolation"], "--data is required"),
        (["--data", "x", "--methods", "mardini"], "needs --checkpoint"),
        (["--data", "x", "--methods", "rife"], "unknown methods"),
        (["--data", "x", "--num-clips", "1"], "num-clips"),
        (["--data", "x", "--sample-resolution", "512"], "it needs --checkpoint"),
        (["--data", "x", "--checkpoint", "c.ckpt", "--methods", "nearest_frame", "--sample-resolution", "64"],
         "but the model ('mardini') is not among --methods ['nearest_frame']: add it"),  # not 'it needs --checkpoint'
        (["--data", "x", "--checkpoint", "c", "--sample-resolution", "big"],
         "--sample-resolution must be N or HxW (pixels, each >= 1; e.g. 256 or 36x64), got 'big'; or 'protocol'"),
        (["--data", "x", "--resolution", "36x"], "error: --resolution must be N or HxW (pixels, each >= 1; e.g. 256 "
                                                 "or 36x64), got '36x'"),
        (["--data", "x", "--resolution", "0x64"], "--resolution must be N or HxW"),
        (["--data", "x", "--resolution", "36x64x2"], "--resolution must be N or HxW"),
        (["--data", "x", "--no-ema"], "--no-ema picks the model's weights: it needs --checkpoint"),
        (["--data", "x", "--checkpoint", "c", "--methods", "linear_blend", "--no-ema"],
         "the model ('mardini') is not among --methods ['linear_blend']"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cli_clear_errors_for_data_and_weights(shards, tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="neither .tar shards nor video files"):
        resolve_source(str(tmp_path))
    assert cli.main(["--data", str(shards), "--num-clips", "10", "--metrics", "midf", "--resolution", "16"]) == 2
    assert "holds 6 clips; lower --num-clips" in capsys.readouterr().err
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path / "none"))
    assert cli.main(["--data", str(shards), "--num-clips", "2", "--resolution", "16", "--tasks", "interpolation",
                     "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "weights not found" in err and "make weights" in err and "missing_weights='skip'" in err


def test_a_single_video_file_as_data_names_the_folder_to_pass(tmp_path, capsys):
    """evaluate.py reads video folders itself: a video file as --data must not be told to make shards first."""
    video = write_video(tmp_path / "videos" / "g2.avi", moving_frames(12, 24, 32), 10, codec="mpeg4")
    assert cli.main(["--preset", "vidim", "--metrics", "midf", "--data", str(video), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert f"--data {video} is a video file; evaluate.py reads a folder of videos" in err
    assert f"pass the folder that holds it (--data {video.parent})" in err and "videos_to_shards" not in err
    assert not (tmp_path / "r").exists()


def test_missing_weights_stop_the_run_before_the_data_is_read_or_a_report_written(shards, tmp_path, monkeypatch,
                                                                                    capsys):
    """Before, every clip was decoded, the checkpoint loaded and a partial report written before EvalSuite found
    the weights missing; now they are resolved right after the arguments are parsed."""
    read: list[str] = []
    resolve = cli.resolve_source
    monkeypatch.setattr(cli, "resolve_source", lambda data: read.append(data) or resolve(data))
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path / "none"))
    out = tmp_path / "r"
    run = ["--data", str(shards), "--num-clips", "2", "--resolution", "16", "--tasks", "interpolation",
           "--out", str(out)]
    assert cli.main(run) == 2
    err = capsys.readouterr().err
    assert "fvd is off: i3d weights not found" in err and "--missing-weights skip" in err
    assert read == [] and not out.exists()
    assert cli.main([*run, "--metrics", "midf", "--lpips-weights", str(tmp_path / "alexnet.pth")]) == 2
    assert "midf_lpips is off: LPIPS is off" in capsys.readouterr().err and read == [] and not out.exists()
    with pytest.warns(UserWarning, match="fid is off"), pytest.warns(UserWarning, match="fvd is off"):
        assert cli.main([*run, "--missing-weights", "skip", "--cache-dir", ""]) == 0  # goes on without FVD/FID
    assert read == [str(shards)] and "midf_psnr" in json.loads((out / "report.json").read_text())["tasks"][
        "interpolation"]["results"]["linear_blend"]


def test_a_video_file_is_decoded_once_and_only_up_to_its_window(tmp_path, monkeypatch):
    """A long file must not be decoded whole (a 60-s 720p file took 8.6 GB): the clip needs frames 25..33 of 60."""
    import av

    from mardini.data import decode
    from mardini.data.decode import decode_mp4, frame_indices, max_start
    from mardini.data.transforms import crop_and_resize
    from mardini.evaluation.data import read_video_clip

    path = write_video(tmp_path / "long.mp4", moving_frames(60, 24, 32), 10)
    arr = decode_mp4(path.read_bytes())  # (60, H, W, 3): the whole file, as the old reader did
    idx, _ = frame_indices(10.0, len(arr), None, 9, max_start(10.0, len(arr), None, 9) // 2)
    expected, _ = crop_and_resize(arr[idx], 16, "center")  # (9, 3, 16, 16)

    decoded: list[int] = []

    class Counting:  # av.open's container, counting the frames it decodes
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            self.container.__enter__()
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(1)
                yield frame

    monkeypatch.setattr(decode, "av", type("av", (), {"open": staticmethod(lambda *a, **k: Counting(av.open(*a, **k)))}))
    clip = read_video_clip(str(path), 9, None, 16)  # (9, 3, 16, 16)
    assert list(idx) == list(range(25, 34)) and np.array_equal(clip.numpy(), expected.numpy())
    assert len(decoded) <= 35  # one pass, stopped after the window's last frame (index 33)


def test_an_audio_only_file_is_an_unusable_video_with_no_video_stream(tmp_path):
    from mardini.evaluation.data import usable_videos

    import av

    audio = tmp_path / "videos" / "audio.mp4"
    audio.parent.mkdir()
    with av.open(str(audio), mode="w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.rate = 8000
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    video = write_video(tmp_path / "videos" / "v.mp4", moving_frames(12, 24, 32), 10)
    skipped: dict[str, str] = {}
    assert usable_videos([str(audio), str(video)], 9, None, 16, 2, skipped) == [str(video)]
    assert skipped == {str(audio): "no video stream"}


def test_an_eta_above_1_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    """evaluate.py --eta 5 was accepted (the protocol asked for >= 0 only) and sampled with more noise than the
    schedule allows; now the protocol check refuses it before the data or the checkpoint is read."""
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    assert cli.main(["--data", str(tmp_path / "no-data"), "--checkpoint", str(tmp_path / "no.ckpt"), "--eta", "5",
                     "--metrics", "midf"]) == 2
    assert capsys.readouterr().err.startswith("evaluate.py: error: evaluation eta=5.0 is impossible: it must be in "
                                              "[0, 1] (DDIM's eta: 0 deterministic, 1 ancestral)\n")


def test_the_real_covariance_is_decomposed_once_for_every_method_scored(shards, monkeypatch):
    """Before, each method's FVD and FID called frechet_distance, which eigendecomposed the same real covariance
    again (FID's 2048 x 2048: seconds on the CPU per method and task): 3 methods, 3 decompositions per metric. Now
    the real statistics carry a FrechetReference that decomposes it once, and every method's distance is the one
    frechet_distance gives on its own, to the last digit."""
    from mardini.metrics import frechet
    from mardini.metrics.frechet import frechet_distance

    decomposed, suites = [], []
    half_factor = frechet._half_factor

    def recorded(s):
        decomposed.append(s.shape)
        return half_factor(s)

    class Recorded(task_run.EvalSuite):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            suites.append(self)

    monkeypatch.setattr(frechet, "_half_factor", recorded)
    monkeypatch.setattr(task_run, "EvalSuite", Recorded)  # run_task builds the suites
    args = cli.parse_args(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
                           "--batch-size", "4", "--cache-dir", ""])
    kind, files = resolve_source(args.data)
    methods = {**{m: cli.BASELINES[m]() for m in cli.BASELINES}, "reversed": lambda real, mask, seed: real.flip(1)}
    res = cli.run_task("interpolation", args, methods, kind, files, 6, {"fvd": VideoPool(), "fid": FramePool()})
    assert len(suites) == 3 and len(decomposed) == 2, (
        f"3 methods decomposed a covariance {len(decomposed)} times, once per metric (FVD, FID) is enough")
    for method, suite in zip(methods, suites, strict=True):
        for m in suite.frechet.values():
            real, fake = m.real_stats(), m._gaussian("fake")
            assert res["results"][method][m.protocol] == frechet_distance(real["mean"], real["cov"], *fake[:2])


@pytest.mark.parametrize("device, says", [
    ("cuda", "torch finds no CUDA GPU here"),
    ("cuda:3", "torch finds no CUDA GPU here"),
    ("mps", "Apple's MPS has no float64"),
    ("bogus", "device must be cpu, cuda, cuda:N"),
])
def test_a_device_the_baselines_cannot_use_is_a_usage_error_before_the_data_is_read(
        shards, tmp_path, monkeypatch, capsys, device, says):
    """Without --checkpoint (the baselines, --generated methods) ``--device`` was not checked: ``--device cuda`` on a
    machine without a GPU read the data, then stopped in torch with "Found no NVIDIA driver on your system" (a
    traceback), ``--device bogus`` with torch's list of device types, ``--device mps`` at the first float64 metric
    state. Now it is checked as the model's device is (mardini.devices.resolve_device), naming the flag and the fix."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a machine without a GPU, on any CI machine
    monkeypatch.setattr("mardini.evaluation.cli.resolve_source", lambda *a: pytest.fail("read the data first"))
    with pytest.raises(SystemExit) as stop:
        cli.main(["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
                  "--metrics", "midf", "--methods", "linear_blend", "--device", device, "--cache-dir", "",
                  "--out", str(tmp_path / "r")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "evaluate.py: error: --device: " in err and says in err


def test_device_of_resolves_auto_as_before(monkeypatch):
    """``auto`` (the default) is CUDA where torch finds a GPU, else the CPU; a named device is that device."""
    import argparse

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert str(cli.device_of(argparse.Namespace(device="auto"))) == "cpu"
    assert str(cli.device_of(argparse.Namespace(device="cpu"))) == "cpu"
