"""Smoke test of the benchmarks: the --quick modes run and write finite positive figures (no timing asserts)."""

from __future__ import annotations

import math

import pytest

from bench import asymmetric, attention_dtype, encode_mp4, run_all, sampling, sampling_overhead, tiny_step, train_mfu


def _positive(*xs: float) -> bool:
    return all(math.isfinite(x) and x > 0 for x in xs)


def test_train_mfu_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # results go to tmp_path/bench/results
    r = train_mfu.main(["--quick"])
    m = r["median"]
    assert _positive(r["flops_per_step"], m["step_s"], m["peak_bf16"], m["peak_fp32"], m["mfu_bf16"], m["mfu_fp32"])
    assert r["command"].startswith(".venv/bin/python -m bench.train_mfu")
    assert (tmp_path / "bench/results/train_mfu.json").exists()


def test_sampling_overhead_quick_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = sampling_overhead.main(["--quick"])
    m = r["median"]
    assert _positive(m["loop_s"], m["network_s"]) and m["calls"] == 3
    assert 0 <= m["overhead_share"] < 1
    text = run_all.summary({})
    assert "Sampling per-step overhead" in text and r["command"] in text


def test_tiny_step_quick_compares_the_planner_patches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = tiny_step.main(["--quick"])
    m = r["median"]
    assert _positive(m["config"], m["variant"], r["variant_over_config"])
    assert r["settings"]["config_planner_patch"] == 2  # the demo's planner (configs/tiny/05_joint_task.yaml)
    assert r["settings"]["variant_planner_patch"] == 1  # the other patch: as many tokens as the generator
    assert r["variant_over_config"] == m["variant"] / m["config"]
    text = run_all.summary({})
    assert "joint training step" in text and r["command"] in text


def test_tiny_step_generator_variant_keeps_the_planner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = tiny_step.main(["--quick", "--generator", "{patch_size: 4}"])
    assert r["settings"]["variant_generator"] == {"patch_size": 4}
    assert r["settings"]["generator_patch"] == {"config": 2, "variant": 4}  # built, not only recorded
    assert r["settings"]["variant_planner_patch"] == r["settings"]["config_planner_patch"] == 2
    assert "with generator {'patch_size': 4}" in run_all.summary({})
    with pytest.raises(ValueError, match="YAML mapping of generator fields"):
        tiny_step.main(["--quick", "--generator", "4"])


def test_tiny_step_batch_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = tiny_step.main(["--quick", "--batch", "4"])
    assert r["settings"]["variant_batch"] == 4 and r["settings"]["batch_frames_side"][0] == 8
    assert r["settings"]["variant_planner_patch"] == 2 and r["settings"]["generator_patch"]["variant"] == 2
    assert "at batch 4" in run_all.summary({})
    with pytest.raises(ValueError, match="at least 1"):
        tiny_step.main(["--quick", "--batch", "0"])


def test_tiny_step_compares_the_bf16_kernels_in_child_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    r = tiny_step.main(["--rounds", "1", "--steps", "1", "--no-policy", "--kernels"])
    assert "ONEDNN_MAX_CPU_ISA" not in r["kernels"]["own"]  # each child says which kernels it ran
    assert r["kernels"]["capped"].endswith("(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)")
    own, capped = (r["kernels_rounds"][k][0]["s_per_step"] for k in ("own", "capped"))
    assert _positive(own, capped) and r["capped_over_own_kernels"] == capped / own
    assert f"{r['kernels']['capped']} / {r['kernels']['own']}: **" in run_all.summary({})


def test_attention_dtype_quick_reports_every_backend(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    assert attention_dtype.main(["--quick"]) == 0
    r = json.loads((tmp_path / "bench/results/attention_dtype.json").read_text())
    assert r["peak_bf16"] > 0 and len(r["rows"]) == 2
    for row in r["rows"]:
        assert _positive(*(row[f"{m}_gflop_per_s"] for m in attention_dtype.MODES), row["best_of_bf16_peak"])
        b, h, length, d = row["bhld"]
        assert row["bf16_gflop_per_s"] == pytest.approx(12 * b * h * length**2 * d / 1e9 / (row["bf16_ms"] / 1e3))
    assert "math backend" in run_all.summary({})


def test_asymmetric_flops_extrapolate_and_rank_the_variants():
    """The 1-and-2-step extrapolation gives the FLOPs of a 3-step run; full-res /ST costs more FLOPs than MarDini."""
    import torch

    from bench.common import flop_counter

    kw = dict(frames=5, steps=3, side=8, low=4, scale=64, threads=1, measure_memory=False)  # keeps glibc as it is
    a, c = asymmetric.child("a", **kw), asymmetric.child("c", **kw)
    assert _positive(a["gflop"], c["gflop"], a["gflop_per_s"], c["gflop_per_s"]) and c["gflop"] > a["gflop"]
    # the same networks counted directly over 3 steps (child seeds everything, so it rebuilds them identically)
    from mardini.autoencoders import SpaceToDepthAutoencoder
    from mardini.masking import image_to_video_mask
    from mardini.models import build_generator, build_planner
    from mardini.pipeline import MarDiniPipeline

    torch.manual_seed(0)
    ae = SpaceToDepthAutoencoder(2)
    planner = build_planner("small", dim=64, heads=1, mlp_hidden=64, depth=8, in_channels=12)
    planner.drop_head()
    gen = build_generator("small", dim=16, heads=1, mlp_hidden=64, plan_dim=64, depth=8, in_channels=12,
                          attention="t")
    pipe = MarDiniPipeline(gen, ae, planner, planner_resolution=8, window=5, dtype=torch.bfloat16)
    video = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    with flop_counter() as fc:
        pipe.generate(video, image_to_video_mask(5)[None], steps=3, guidance_scale=2.5, progress=False)
    assert a["gflop"] == pytest.approx(fc.get_total_flops() / 1e9, rel=1e-6)


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(run_all.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "growth", "asymmetric"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "bench/results/SUMMARY.md").exists()


def test_encode_mp4_quick_compares_the_encoders_and_the_summary_shows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = encode_mp4.main(["--quick"])
    m = r["median_s"]
    assert _positive(m["deterministic"], m["x264_defaults"], r["deterministic_over_defaults"])
    assert r["deterministic_outputs"] == 1  # the same bytes every round
    assert r["deterministic_over_defaults"] == m["deterministic"] / m["x264_defaults"]
    text = run_all.summary({})
    assert "Deterministic H.264 encoding" in text and r["command"] in text


def test_cpu_peak_memory_counts_a_buffer_glibc_would_have_reused():
    """bench.asymmetric's peak growth: after ``mmap_large_buffers`` a call's high-water mark counts its 16 MiB
    buffer, though glibc had kept the freed memory of earlier calls to hand it out again unseen (a subprocess:
    the mmap threshold stays for the rest of the process)."""
    import subprocess
    import sys

    script = """
import torch
from bench.common import mmap_large_buffers, rss_peak_bytes
n = 4 * 2**20  # 16 MiB of float32
for _ in range(3):  # glibc raises its mmap threshold past the freed buffers and keeps the next ones on its heap
    torch.ones(n)
before = rss_peak_bytes(lambda: torch.ones(n))
mmap_large_buffers()
print(before / 2**20, rss_peak_bytes(lambda: torch.ones(n)) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert after > 15.5, (before, after)  # before: what reused memory hides (0 MiB with this glibc)


def test_attention_memory_main_honours_argv_and_returns(tmp_path, monkeypatch):
    """``main(argv)`` from a notebook or test: it used to execve itself with ``sys.argv[1:]`` (the test runner's
    arguments), replacing the caller's process with the default run; it now runs ``argv`` in a child and returns."""
    import os

    from bench import attention_memory

    def execve(*args):
        raise AssertionError("main(argv) replaced the calling process")

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv(attention_memory.MMAP_ENV, raising=False)
    out = tmp_path / "am.json"
    r = attention_memory.main(["--lengths", "512", "--dtypes", "fp32", "--repeats", "1", "--device", "cpu",
                               "--out", str(out)])
    assert {(x["dtype"], x["tokens"]) for x in r["rows"]} == {("fp32", 512)}
    assert {x["method"] for x in r["rows"]} == {"sdpa", "identity_token", "identity_frame", "dense_token"}
    assert r["settings"]["memory_method"].endswith("MALLOC_MMAP_THRESHOLD_=65536") and out.is_file()
    assert r["command"] == f".venv/bin/python -m bench.attention_memory --lengths 512 --dtypes fp32 --repeats 1 " \
                           f"--device cpu --out {out}"  # as every bench's JSON (bench/README.md)


def test_data_throughput_reads_the_shards_it_is_given(tmp_path, monkeypatch):
    """``--shards DIR`` used to rebuild DIR as the demo's 2000-clip set, refusing a 40-clip one ("holds a synthetic
    split made with other settings") and any non-synthetic set; DIR is now read as it is."""
    from bench import data_throughput
    from mardini.data.synthetic_shards import write_synthetic_split

    monkeypatch.chdir(tmp_path)
    write_synthetic_split(tmp_path / "myset", "train", 40, 20, progress=False)  # make_synthetic.py --train-clips 40
    r = data_throughput.main(["--shards", str(tmp_path / "myset"), "--seconds", "0.2", "--workers", "0",
                              "--batch-size", "4"])
    assert r["config"]["shards"] == str(tmp_path / "myset/train") and r["rows"][0]["clips"] >= 0
    assert r["command"].startswith(".venv/bin/python -m bench.data_throughput --shards ")
    assert not (tmp_path / "data/shards").exists()  # the demo's set was not built
    with pytest.raises(ValueError, match=r"^--shards .*nothing: no train/ folder"):
        data_throughput.main(["--shards", str(tmp_path / "nothing"), "--seconds", "0.2", "--workers", "0"])
    (tmp_path / "empty/train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"^--shards .*empty: shard pattern .* matches no shard"):
        data_throughput.main(["--shards", str(tmp_path / "empty"), "--seconds", "0.2", "--workers", "0"])


def test_data_vs_step_quick_does_not_write_the_demo_set(tmp_path, monkeypatch):
    """--quick used to write the demo's full 2000-clip set first (minutes); it now streams a small temporary set."""
    import mardini.demo.data
    from bench import data_vs_step

    def full_set(*args, **kw):
        raise AssertionError("--quick wrote the demo's synthetic set")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mardini.demo.data, "write_synthetic_split", full_set)
    r = data_vs_step.main(["--quick", "--batch-size", "2"])
    assert _positive(r["median"]["loader_clips_per_s"], r["median"]["step_clips_per_s"])
    assert r["settings"]["shards"] == "a 32-clip synthetic set (--quick)" and not (tmp_path / "data").exists()


def test_summary_marks_the_results_this_run_did_not_write(tmp_path, monkeypatch):
    """SUMMARY.md used to list every JSON in bench/results as current: older runs' results and failed benches' stale
    ones alike, under a hard-coded `small` size. Each section now says when its result was written and whether by
    this run; the size comes from the result's settings."""
    import json
    import os
    import time

    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    old = {"attention_dtype.json": {"command": "old dtype", "rows": []}, "sampling.json": {"command": "old sampling"}}
    for name, r in old.items():
        (tmp_path / name).write_text(json.dumps(r))
        os.utime(tmp_path / name, (1e9, 1e9))  # 2001
    since = time.time() - 1
    m = {k: 1.0 for k in ("step_s", "forward", "backward", "optimizer", "ema", "mfu_bf16", "peak_bf16", "mfu_fp32",
                          "peak_fp32")}
    (tmp_path / "train_mfu.json").write_text(json.dumps({"command": "mfu cmd", "settings": {"size": "tiny"},
                                                         "flops_per_step": 1e9, "median": m}))
    (tmp_path / "attention_memory.json").write_text(json.dumps({"command": "am cmd", "table": "T"}))
    text = run_all.summary({"train_mfu": "", "attention_memory": "", "sampling": ""}, since, {"sampling": 1})
    assert "## Training MFU (`tiny`, joint step)" in text and "`small`" not in text
    assert "`mfu cmd` (this run, " in text and "`am cmd` (this run, " in text
    assert "`old dtype` (**from an earlier run**, 2001-09-" in text and ": not run this time)" in text
    assert "`old sampling` (**from an earlier run**, 2001-09-" in text
    assert "**the bench failed in this run** (exit code 1))" in text
    assert "This run: `train_mfu`, `attention_memory`, `sampling`; failed: `sampling` (exit code 1)." in text
    assert "`am cmd` (written " in run_all.summary({})  # --summary-only: each result with its date


def test_cuda_matmul_peak_times_many_large_matmuls_with_events_after_a_warm_up(monkeypatch):
    """On CUDA the peak used to be the best single 2048^2 matmul (~44 us on an H100, launch and host timer
    included) with no warm-up beyond one call; it is now 8192^2, warmed up, and blocks of back-to-back calls timed
    with CUDA events. Without a GPU: meta tensors and stand-in events record what is called and in which order."""
    import contextlib

    import torch

    from bench import common

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 20.0  # ms for a block

    randn, mm = torch.randn, torch.mm
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None: randn(*shape, device="meta"))
    monkeypatch.setattr(torch, "mm", lambda a, b: log.append(a.shape) or mm(a, b))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    peak = common.matmul_peak(torch.bfloat16, torch.device("cuda"))
    assert {x for x in log if x != "record"} == {torch.Size([8192, 8192])}
    first = log.index("record")
    assert first >= 1  # warm-up calls before the first timed block
    blocks = "".join("r" if x == "record" else "m" for x in log[first:]).split("r")[1::2]
    assert len(blocks) == 3 and all(len(b) >= 10 for b in blocks)  # each event pair brackets many calls
    assert peak == pytest.approx(2 * 8192**3 * len(blocks[0]) / 0.020)


def test_sampling_prints_the_frames_height_and_width(tmp_path, capsys):
    """--resolution HxW: the clip, the token counts and the printed size are H x W, not a square of the side."""
    quick = ["--steps", "1", "--compare-steps", "1", "--rounds", "1", "--planner-resolution", "8", "--frames", "3",
             "--out", str(tmp_path / "sampling.json")]
    r = sampling.main(["--resolution", "8x16", *quick])
    assert r["config"]["resolution"] == [8, 16]
    assert r["config"]["generator_tokens"] == 3 * 4 * 8 and r["config"]["planner_tokens"] == 3 * 4 * 8
    assert "Sampling, tiny at 8x16, 3 frames" in capsys.readouterr().out
    assert "tiny at 8x8, 3 frames" in sampling.markdown(sampling.main(["--resolution", "8", *quick]))
