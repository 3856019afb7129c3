"""``make reproduce``: verdicts follow the numbers (fast); ``--quick`` runs end to end in a temp dir (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mardini.reproduce import verdicts
from mardini.reproduce.runs import IDENTITY_STAGE, prepare_configs
from mardini.strict_json import loads_strict

ROOT = Path(__file__).resolve().parents[1]


def _res(psnr, ssim, err, det):
    return {"midf_psnr": psnr, "midf_ssim": ssim, "traj_err_px": err, "traj_err_frac": err / 32, "traj_detected": det}


def test_table2_verdicts_follow_the_numbers():
    both, dm, mar = _res(20, 0.8, 1.0, 0.9), _res(18, 0.7, 2.0, 0.8), _res(15, 0.5, math.nan, 0.0)
    rows = {r["claim"]: r["verdict"] for r in verdicts.table2({"mar_only": mar, "dm_only": dm, "mar_dm": both})}
    assert set(rows.values()) == {"agrees"}  # a NaN error (nothing detected) loses
    rows = {r["claim"]: r["verdict"] for r in verdicts.table2({"mar_only": mar, "dm_only": both, "mar_dm": dm})}
    assert rows["MAR + DM beats DM only (generator warm-up)"] == "disagrees"
    mixed = _res(19, 0.9, 1.5, 0.95)  # better SSIM and detection, worse PSNR and error than "both"
    rows = {r["claim"]: r["verdict"] for r in verdicts.table2({"mar_only": mar, "dm_only": mixed, "mar_dm": both})}
    assert rows["MAR + DM beats DM only (generator warm-up)"] == "mixed (2 of 4 metrics)"


def test_fig6a_near_optimal_step():
    assert verdicts.near_optimal_step([(1, 10.0), (10, 19.5), (25, 19.9), (50, 20.0)], "midf_psnr")[0] == 10
    assert verdicts.near_optimal_step([(1, 9.0), (10, 5.0), (25, 2.0), (50, 1.0)], "traj_err_px")[0] == 50
    assert verdicts.near_optimal_step([(1, math.nan), (10, 1.0), (25, 2.0)], "traj_err_px")[0] == 10
    assert verdicts.near_optimal_step([(1, math.nan), (10, 2.0), (25, 2.0)], "traj_err_px")[0] == -1  # flat
    assert verdicts.near_optimal_step([(1, 0.0), (10, 0.0), (25, 0.0), (50, 0.0)], "traj_detected")[0] == -1


def test_table2_ties_nan_and_low_detection_are_no_evidence():
    a, b = _res(20, 0.8, math.nan, 0.0), _res(18, 0.7, math.nan, 0.0)  # nothing detected by either
    row = verdicts.table2({"mar_dm": a, "mar_only": b})[0]
    assert row["verdict"] == "agrees"  # PSNR and SSIM; NaN vs NaN and 0 vs 0 are not losses of mar_dm
    assert "traj_err_px nan vs nan (not scored: undefined (NaN))" in row["detail"]
    assert "traj_detected 0 vs 0 (not scored: tied)" in row["detail"]
    tied = verdicts.table2({"mar_dm": a, "mar_only": dict(a)})[0]
    assert tied["verdict"].startswith("inconclusive (no metric separates them")
    # an error over one found object (0.75 % detected) says nothing, whichever way it goes
    few = verdicts.table2({"mar_dm": _res(20, 0.8, 9.0, 0.5), "mar_only": _res(18, 0.7, 1.65, 0.0075)})[0]
    assert few["verdict"] == "agrees" and "detection below 5%" in few["detail"]


def test_table2_differences_within_a_rerun_s_spread_are_no_evidence():
    """The demo's Table 2 null-plan row (session 10): 13.3 against 11.5 % of the objects found is within the 0.04 a
    rerun with other bf16 rounding moved it, so only PSNR, SSIM and the found objects' error decide."""
    both, null = _res(15.2135, 0.6002, 2.80, 0.133), _res(15.0886, 0.5902, 3.11, 0.115)
    row = verdicts.table2({"mar_dm": both, "dm_only_null_plan": null})[0]
    assert row["verdict"] == "agrees"
    assert "traj_detected 0.133 vs 0.115 (not scored: within a rerun's spread (0.04))" in row["detail"]
    close = verdicts.table2({"mar_dm": _res(15.22, 0.6005, 2.80, 0.133), "dm_only_null_plan": null})[0]
    assert "midf_psnr 15.22 vs 15.09 (not scored" not in close["detail"]  # 0.13 dB: beyond the 0.03 dB
    within = verdicts.table2({"mar_dm": _res(15.10, 0.5905, 3.11, 0.14), "dm_only_null_plan": null})[0]
    assert within["verdict"].startswith("inconclusive (no metric separates them")  # PSNR, SSIM, found within; px tied
    assert "within a rerun's spread (0.03)" in within["detail"] and "within a rerun's spread (0.001)" in within["detail"]


def test_fig6a_flat_and_low_detection_metrics_are_no_evidence():
    vals = {1: (10.0, 1.65, 0.0075), 10: (19.5, 4.0, 0.3), 25: (19.9, 3.0, 0.4), 50: (20.0, 3.0, 0.4)}
    fig = {"interpolation": {"results": {f"steps_{k}": {"midf_psnr": p, "traj_detected": d, "traj_err_px": e,
                                                         "midf_ssim": 0.5} for k, (p, e, d) in vals.items()}}}
    few, one = verdicts.fig6a(fig)
    assert (few["verdict"], one["verdict"]) == ("agrees", "agrees")  # PSNR and detection; SSIM, error say nothing
    assert "midf_ssim: 1: 0.5, 10: 0.5, 25: 0.5, 50: 0.5 -> not scored (flat)" in few["detail"]
    assert "traj_err_px: 1: 1.65, 10: 4, 25: 3, 50: 3 -> not scored (detection below 5% at [1])" in few["detail"]
    flat = {"interpolation": {"results": {f"steps_{k}": {"midf_psnr": 1.0, "traj_detected": 0.0,
                                                         "traj_err_px": math.nan} for k in (1, 10)}}}
    assert [r["verdict"] for r in verdicts.fig6a(flat)] == ["inconclusive (no metric separates them)"] * 2
    assert "traj_detected: 1: 0, 10: 0 -> not scored (flat)" in verdicts.fig6a(flat)[0]["detail"]
    assert "traj_err_px: 1: nan, 10: nan -> not scored (undefined (NaN)" in verdicts.fig6a(flat)[0]["detail"]


def test_verdicts_of_empty_results_and_a_one_point_sweep_say_so():
    assert verdicts.table2({}) == [] and verdicts.headline_metrics({}) == []
    assert [r["verdict"] for r in verdicts.fig6a({"interpolation": {"results": {}}})] == [
        "inconclusive (no metric separates them)"] * 2
    one = {"interpolation": {"results": {"steps_25": {"midf_psnr": 20.0}}}}
    assert "midf_psnr: 25: 20 -> not scored (fewer than 2 step counts)" in verdicts.fig6a(one)[0]["detail"]


def test_fig6c_verdicts():
    def run(first, last, sem=0.01):
        return {"first": first, "last": last, "last_sem": sem, "drop": 1 - last / first, "val_last": None}

    rows = [r["verdict"] for r in verdicts.fig6c(run(1.0, 0.3), run(1.0, 0.9))]
    assert rows == ["agrees", "agrees", "agrees"]
    rows = [r["verdict"] for r in verdicts.fig6c(run(1.0, 0.3), run(1.0, 0.3))]
    assert rows == ["agrees", "disagrees", "disagrees"]
    assert verdicts.fig6c(run(1.0, 1.0), run(1.0, 1.0))[2]["verdict"].startswith("inconclusive")


def _t3(v, lat, mem, lo=None, hi=None, rounds=5, mem_lo=None, mem_hi=None):
    return {"frames": 9, "variant": v, "latency_s": lat, "peak_growth_mib": mem, "rounds": rounds,
            "latency_min_s": lat if lo is None else lo, "latency_max_s": lat if hi is None else hi,
            "memory_growth_min_mib": mem if mem_lo is None else mem_lo,
            "memory_growth_max_mib": mem if mem_hi is None else mem_hi}


def test_table3_verdicts():
    assert [r["verdict"] for r in verdicts.table3([_t3("a", 1, 10), _t3("b", 2, 20), _t3("c", 9, 90)])] == \
        ["agrees", "agrees"]
    assert [r["verdict"] for r in verdicts.table3([_t3("a", 9, 90), _t3("b", 2, 20), _t3("c", 1, 10)])] == \
        ["disagrees", "disagrees"]


def test_table3_latency_needs_rounds_that_do_not_overlap():
    """Medians in order but rounds overlapping (a shared CPU's outliers), or a single round: no latency verdict."""
    overlap = [_t3("a", 1.0, 10, 0.9, 2.8), _t3("b", 1.5, 20, 0.04, 1.6), _t3("c", 2.0, 90, 1.9, 21.9)]
    assert verdicts.table3(overlap)[0]["verdict"].startswith("inconclusive")
    assert "0.90-2.80" in verdicts.table3(overlap)[0]["detail"]  # the spread is reported
    single = [_t3("a", 1, 10, rounds=1), _t3("b", 2, 20, rounds=1), _t3("c", 9, 90, rounds=1)]
    assert verdicts.table3(single)[0]["verdict"] == "inconclusive (one timing per variant: no spread)"
    reversed_bc = [_t3("a", 1, 10, 0.9, 1.1), _t3("b", 5, 20, 4.9, 5.1), _t3("c", 3, 90, 2.9, 3.1)]
    assert verdicts.table3(reversed_bc)[0]["verdict"] == "mixed"


def test_table3_memory_needs_rounds_that_do_not_overlap():
    """The memory medians 34.64 / 34.38 / 34.03 MiB of a quick run whose rounds spread by 10-20 MiB said
    "disagrees"; memory now takes latency's rule: an order counts only where the rounds' ranges do not overlap."""
    def row(v, mem, spread, rounds=5):  # latencies 1 / 2 / 3 s, rounds apart
        lat = "abc".index(v) + 1.0
        return _t3(v, lat, mem, lat - 0.1, lat + 0.1, rounds, mem - spread, mem + spread)

    noisy = [row(v, m, 15) for v, m in zip("abc", (34.64, 34.38, 34.03))]
    latency, memory = verdicts.table3(noisy)
    assert latency["verdict"] == "agrees"
    assert memory["verdict"] == "inconclusive (the rounds' memory ranges overlap)"
    assert "34.6 (19.6-49.6) / 34.4 (19.4-49.4) / 34.0 (19.0-49.0) MiB" in memory["detail"]  # the spread is shown
    apart = [row(v, m, 1) for v, m in zip("abc", (10, 20, 30))]
    assert verdicts.table3(apart)[1]["verdict"] == "agrees"
    reversed_ac = [row(v, m, 1) for v, m in zip("abc", (30, 20, 10))]
    assert verdicts.table3(reversed_ac)[1]["verdict"] == "disagrees"
    single = [row(v, m, 0, rounds=1) for v, m in zip("abc", (10, 20, 30))]
    assert verdicts.table3(single)[1]["verdict"] == "inconclusive (one memory measurement per variant: no spread)"


def test_table3_runs_rounds_full_warmups_on_the_reproduction_s_threads(tmp_path, monkeypatch):
    from mardini.reproduce import efficiency

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd[4:])
        (tmp_path / "asymmetric.json").write_text(json.dumps({"table": [{}]}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(efficiency.subprocess, "run", fake_run)
    efficiency.table3(tmp_path, quick=True, rounds=5, threads=2)
    argv = seen[0]
    assert argv[argv.index("--rounds") + 1] == "5" and argv[argv.index("--threads") + 1] == "2"
    assert "--full-warmup" in argv


def test_asymmetric_quick_keeps_explicit_rounds_and_reports_the_spread(monkeypatch, tmp_path):
    import bench.common
    from bench import asymmetric

    lat = iter([3.0, 1.0, 2.0, 1.5, 0.5, 2.5])
    mem = iter([5.0, 9.0, 4.0, 8.0])

    def fake_run(cmd, **kw):
        i = cmd.index("--child")
        row = {"variant": cmd[i + 1], "frames": int(cmd[i + 2]), "latency_s": next(lat), "planner_s": 0.0,
               "generator_s": 0.0, "peak_rss_mib": 1.0, "peak_growth_mib": next(mem), "gflop": 1.0, "gflop_per_s": 1.0,
               "params_M": {}, "warmup": "--full-warmup" in cmd, "threads": cmd[cmd.index("--threads") + 1]}
        return type("Done", (), {"returncode": 0, "stdout": json.dumps(row)})()

    monkeypatch.setattr(asymmetric.subprocess, "run", fake_run)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    out = asymmetric.main(["--quick", "--rounds", "2", "--threads", "2", "--full-warmup", "--variants", "a", "c"])
    assert out["settings"]["rounds"] == 2 and len(out["runs"]) == 4
    assert all(r["warmup"] and r["threads"] == "2" for r in out["runs"])
    a = next(r for r in out["table"] if r["variant"] == "a")
    assert (a["rounds"], a["latency_min_s"], a["latency_max_s"]) == (2, 2.0, 3.0)
    assert (a["peak_growth_mib"], a["memory_growth_min_mib"], a["memory_growth_max_mib"]) == (4.5, 4.0, 5.0)


def test_configs_are_copies_that_write_elsewhere(tmp_path):
    dest = prepare_configs(tmp_path)
    joint = yaml.safe_load((dest / "04_joint_model.yaml").read_text())
    assert joint["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "runs")
    assert joint["model"]["init_args"]["planner_ckpt"] == str(tmp_path / "runs/03_mar_warmup/checkpoints/last.ckpt")
    off = yaml.safe_load((dest / "fig6c_identity_off.yaml").read_text())
    stage = yaml.safe_load((ROOT / "configs/tiny" / f"{IDENTITY_STAGE}.yaml").read_text())
    assert off["model"]["init_args"]["generator"] == {**stage["model"]["init_args"]["generator"],
                                                    "identity_attention": False}
    assert "outputs/tiny" not in "".join(p.read_text() for p in dest.glob("*.yaml") if p.name != "common.yaml")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # --quick takes minutes; a shared, loaded CPU stretches it past the default 600 s
def test_quick_mode_end_to_end(tmp_path, monkeypatch):
    from mardini.reproduce.main import main

    monkeypatch.chdir(ROOT)  # configs, data and bench/ are relative to the repository root
    published = ROOT / "bench/results/asymmetric.json"
    before = published.stat().st_mtime if published.exists() else None
    assert main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for section in ("Table 2", "Fig. 6a", "Fig. 6c", "Table 3", "Quick mode"):
        assert section in report
    out = loads_strict((tmp_path / "results.json").read_text())
    assert set(out["results"]) == {"table2", "fig6a", "fig6c", "table3"}
    assert out["info"]["command"] == f"python -m mardini.reproduce --quick --no-progress --out {tmp_path}"
    assert {"mar_only", "dm_only", "dm_only_null_plan", "mar_dm"} <= set(out["results"]["table2"]["results"])
    assert {f"steps_{k}" for k in (1, 10, 25, 50)} <= set(out["results"]["fig6a"]["interpolation"]["results"])
    assert all(r["verdict"] for rows in out["verdicts"].values() for r in rows)
    assert (tmp_path / "fig6a_steps.png").stat().st_size > 0 and (tmp_path / "fig6c_identity.png").stat().st_size > 0
    assert (published.stat().st_mtime if published.exists() else None) == before  # the bench's figures untouched


def test_steps_plot_draws_panels_without_finite_values(tmp_path):
    """A quick run can find no object at all (trajectory error NaN for every step count): the panel stays empty."""
    from mardini.reproduce.curves import plot_steps

    nan = float("nan")
    results = {f"steps_{k}": {"midf_psnr": 15.0 + k / 50, "traj_err_px": nan} for k in (1, 10, 25, 50)}
    results["nearest_frame"] = {"midf_psnr": 14.0, "traj_err_px": nan}
    path = plot_steps({"interpolation": {"results": results}}, {"interpolation": ["midf_psnr", "traj_err_px"]},
                      tmp_path / "fig6a.png")
    assert path.stat().st_size > 0


def test_fig6a_a_metric_without_finite_values_is_no_evidence():
    nan = float("nan")
    fig = {"interpolation": {"results": {f"steps_{k}": {"midf_psnr": v, "traj_err_px": nan}
                                         for k, v in ((1, 20.0), (10, 19.0), (25, 18.0))}}}
    rows = verdicts.fig6a(fig)
    one = next(r for r in rows if "one step is not enough" in r["claim"])
    assert one["verdict"] == "disagrees"  # the only metric with data is best at one step; the NaN one says nothing
    assert "traj_err_px: 1: nan, 10: nan, 25: nan -> not scored (undefined (NaN)" in rows[0]["detail"]


def test_the_bench_summary_reads_gpu_memory_columns():
    from bench.run_all import _peak

    assert _peak({"peak_rss_mib": 10.0, "peak_growth_mib": 4.0}) == (10.0, 4.0)
    assert _peak({"peak_gpu_mib": 7.0, "peak_gpu_growth_mib": 3.0}) == (7.0, 3.0)  # a --device cuda result


def test_a_run_s_first_loss_is_a_mean_not_one_logged_value():
    from mardini.demo.curves import window

    values = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert window(values, head=True) == [5.0, 1.0] and window(values) == [1.0, 1.0]


def test_table3_report_shows_the_toy_settings_and_the_spread(tmp_path):
    from mardini.reproduce.report import write_report

    table = [{**_t3(v, lat, 10, lat - 0.1, lat + 0.1), "label": v, "planner_s": 0.1, "generator_s": lat,
              "c_over_this_latency": 3 / lat} for v, lat in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    t3 = {"command": "python -m bench.asymmetric", "params_M": {}, "table": table,
          "settings": {"frames": [9], "steps": 10, "rounds": 5, "threads": 2, "side": 16}}
    info = {"mode": "default", "command": "c", "machine": "m", "total_s": 60.0, "params": "p", "settings": {}}
    text = write_report(tmp_path, info, {"table3": t3}, {"Table 3": verdicts.table3(table)}, {}).read_text()
    assert "Toy settings: frames [9], steps 10, rounds 5, side 16, threads 2." in text
    assert "| 9 | a | 1.00 (0.90-1.10) |" in text
    assert "| 1.00 | 10.0 (10.0-10.0) | 3.00x |" in text  # memory growth: median (min-max) over the rounds


def test_fig6a_image_to_video_verdict_uses_the_plotted_metrics():
    """MidF is an interpolation metric (the protocol's DEFAULT_METRICS): the plot leaves it out of image-to-video,
    so the verdict does too."""
    res = {f"steps_{k}": {"midf_psnr": 10.0 + k, "traj_detected": 0.5 - k / 100} for k in (1, 10, 25, 50)}
    few, one = verdicts.fig6a({"image_to_video": {"results": res}})
    assert "midf" not in few["detail"] and one["verdict"] == "disagrees"  # detection is best at one step
    assert verdicts.task_metrics("image_to_video", res) == ["traj_detected"]
    assert verdicts.task_metrics("interpolation", res) == ["midf_psnr", "traj_detected"]


def test_fig6a_one_step_claim_is_marked_inferred():
    """PAPER.md §6 item 4 states only 'near-optimal with few steps': the one-step row is the toy's reading."""
    res = {f"steps_{k}": {"midf_psnr": 10.0 + k} for k in (1, 10)}
    few, one = verdicts.fig6a({"interpolation": {"results": res}})
    assert "[inferred" in one["claim"] and "[inferred" not in few["claim"]


def test_table2_step_budgets_come_from_the_checkpoints(tmp_path):
    """Each network's steps: the global_step of every stage it trained in (followed through the configs)."""
    import torch

    from mardini.demo.chain import TINY_STAGES
    from mardini.reproduce.quality import table2_steps
    from mardini.reproduce.runs import lineage

    assert lineage("05_joint_task", "generator") == ["01_dm_warmup_4f", "02_dm_warmup_9f", "04_joint_model",
                                                     "05_joint_task"]
    assert lineage("05_joint_task", "planner") == ["03_mar_warmup", "04_joint_model", "05_joint_task"]
    ckpts = {}
    for i, stage in enumerate(TINY_STAGES):
        ckpts[stage] = tmp_path / f"{stage}.ckpt"
        torch.save({"global_step": 10 ** i}, ckpts[stage])
    steps = table2_steps(ckpts)
    assert steps["dm_only"] == {"generator": 11} and steps["mar_only"] == {"planner": 100}
    assert steps["mar_dm"] == {"planner": 11100, "generator": 11011} == {**steps["dm_only_null_plan"], "planner": 11100}
    detail = verdicts.table2({"mar_dm": _res(20, 0.8, 1.0, 0.9), "dm_only": _res(18, 0.7, 2.0, 0.8)}, steps)[0]
    assert "training steps: mar_dm planner 11100, generator 11011; dm_only generator 11" in detail["detail"]


def test_table2_dm_only_verdict_rests_on_the_equally_trained_null_plan_row():
    both, dm, null = _res(20, 0.8, 1.0, 0.9), _res(18, 0.7, 2.0, 0.8), _res(21, 0.9, 0.5, 0.95)
    rows = {r["claim"]: r for r in verdicts.table2({"mar_dm": both, "dm_only": dm, "dm_only_null_plan": null})}
    warm = rows["MAR + DM beats DM only (generator warm-up)"]
    assert warm["verdict"].startswith("not scored") and warm["detail"].startswith("on its own: agrees")
    assert rows["MAR + DM beats DM only (joint DM, null plan)"]["verdict"] == "disagrees"
    alone = verdicts.table2({"mar_dm": both, "dm_only": dm})  # no null-plan row: the warm-up row is scored
    assert alone[0]["verdict"] == "agrees"


def test_planner_only_loads_the_weights_asked_for_with_the_pipeline_s_checks(tmp_path):
    """Table 2's "MAR only" reads the warm-up planner through the pipeline's loader: the EMA (default) or the raw
    weights exactly, and an EMA-only export read as raw weights is one error naming the fix."""
    import torch

    from mardini.lit.checkpoints import read_checkpoint
    from mardini.lit.ema_export import export_ema_only
    from mardini.reproduce.quality import PlannerOnly
    from mardini.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "planning.ckpt", "planning", frames=5, size=16)
    state = read_checkpoint(ckpt)["state_dict"]
    for ema, prefix in ((True, "ema.module.planner."), (False, "networks.planner.")):
        loaded = PlannerOnly(ckpt, ema=ema).planner.state_dict()
        assert loaded.keys() == {k[len(prefix):] for k in state if k.startswith(prefix)}
        assert all(torch.equal(v, state[prefix + k]) for k, v in loaded.items())
    export_ema_only(ckpt, tmp_path / "planning_ema.ckpt")
    with pytest.raises(ValueError, match=r"no 'networks.planner.\*' weights \(an EMA-only export: load it with ema"):
        PlannerOnly(tmp_path / "planning_ema.ckpt", ema=False)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_checkpoints_without_the_chain_are_one_line_before_the_data_set_is_built(tmp_path, monkeypatch, capsys,
                                                                                 folder):
    """``python -m mardini.reproduce --checkpoints DIR`` with a missing or empty DIR built the synthetic set first
    (minutes, ~800 MB), then died with a ``FileNotFoundError: missing chain checkpoints`` traceback."""
    import runpy
    import sys

    from mardini.demo import data

    built = []
    monkeypatch.setattr(data, "build_synthetic", lambda *a, **k: built.append(a))
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["mardini.reproduce", "--checkpoints", str(tmp_path / folder),
                                      "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("mardini.reproduce", run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and not built and not (tmp_path / "out").exists()
    assert err.startswith(f"python -m mardini.reproduce: error: missing chain checkpoints ['{tmp_path / folder}/")
    assert "train the chain first" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_a_demo_set_of_other_settings_stops_before_anything_naming_the_demo_s_fresh_run(tmp_path, monkeypatch, capsys):
    """After ``python -m mardini.demo --fresh --train-clips N``, ``make reproduce`` died in the data step with
    'data/shards/synthetic/train holds a synthetic split made with other settings (clips 2000 -> N); remove it or
    choose another output folder', naming no command. It now stops before building or training anything, naming
    ``python -m mardini.demo --fresh`` (which rebuilds the default set and retrains outputs/tiny on it)."""
    import runpy
    import sys

    from mardini.data import synthetic as S
    from mardini.demo import data

    monkeypatch.chdir(tmp_path)
    data.build_synthetic(data.SHARDS, train_clips=2, progress=False)  # as `python -m mardini.demo --train-clips 2`
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["mardini.reproduce", "--quick", "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("mardini.reproduce", run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and not (tmp_path / "out").exists(), err
    assert err.startswith("python -m mardini.reproduce: error: data/shards/synthetic holds a synthetic set made with "
                          f"other settings than the demo's default (train: clips 2 -> {S.DEMO_TRAIN_CLIPS}: the set's -> "
                          "the default; "), err
    assert "run `python -m mardini.demo --fresh` first" in err and "Traceback" not in err


def _saved_callbacks(cfg: dict) -> dict:
    """``checkpoint["callbacks"]`` of a stage trained with ``cfg``: its Curriculum as the CLI builds it from the YAML
    (after milestone 2), beside the StepCheckpoint every stage saves with."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    from mardini.lit.step_checkpoint import StepCheckpoint

    saved = {StepCheckpoint(dirpath="x", every_n_train_steps=100).state_key: {"best_model_path": ""}}
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    built = parser.instantiate(parser.parse_object({"callbacks": cfg["trainer"].get("callbacks") or []})).callbacks
    for callback in built:
        if callback.state_dict():
            saved[callback.state_key] = {**callback.state_dict(), "applied": 2}
    return saved


def _stage_checkpoint(cfg: dict, steps: int, trained: int | None = None) -> dict:
    """What the checkpoint of a stage trained with ``cfg`` (merged stage settings) for ``steps`` records (steps, LR
    schedule, data and model arguments, autoencoder, callbacks, the training set's manifest); ``trained``: the step
    it stopped at, short of ``steps``."""
    from mardini.reproduce.demo_chain import expected_train_data

    model = dict(cfg["model"]["init_args"])
    auto = model.pop("autoencoder")
    return {"global_step": steps if trained is None else trained,
            "hyper_parameters": {**model, "seed": cfg["seed_everything"]},
            "datamodule_hyper_parameters": dict(cfg["data"]["init_args"]),
            "VideoDataModule": {"epoch": 0, "train_data": expected_train_data()}, "callbacks": _saved_callbacks(cfg),
            "mardini": {"lr_schedule_steps": steps, "lr_schedule_history": [[0, steps]], "autoencoder_spec": auto}}


def _demo_chain(root: Path, **changes) -> dict:
    """A chain under ``root`` whose checkpoints record what a default ``python -m mardini.demo`` run's do, as the
    configs describe it (:func:`_stage_checkpoint`); ``changes``: ``{stage: {"global_step": N, ...}}`` or
    ``train_clips=N`` for every stage."""
    import torch

    from mardini.demo.chain import TINY_DIR, TINY_STAGES, stage_settings

    train_clips = changes.pop("train_clips", None)
    for stage in TINY_STAGES:
        cfg = stage_settings(TINY_DIR / "common.yaml", TINY_DIR / f"{stage}.yaml")
        ckpt = _stage_checkpoint(cfg, cfg["trainer"]["max_steps"])
        if train_clips:
            ckpt["VideoDataModule"]["train_data"]["clips"] = train_clips
        for key, value in changes.get(stage, {}).items():
            ckpt[key] = {**ckpt[key], **value} if key == "mardini" else value  # "mardini": the keys given replaced
        path = root / stage / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save(ckpt, path)
    return {stage: root / stage / "checkpoints" / "last.ckpt" for stage in TINY_STAGES}


def _final_steps() -> int:
    return yaml.safe_load((ROOT / "configs/tiny/05_joint_task.yaml").read_text())["trainer"]["max_steps"]


def _milestones(**second) -> list[dict]:
    """The final stage's Curriculum milestones as its config sets them, the second one's fields replaced."""
    from mardini.demo.chain import TINY_DIR, stage_settings

    cfg = stage_settings(TINY_DIR / "common.yaml", TINY_DIR / "05_joint_task.yaml")
    milestones = [[dict(m) for m in cb["init_args"]["milestones"]] for cb in cfg["trainer"]["callbacks"]
                  if cb["class_path"].endswith("Curriculum")][0]
    milestones[1].update(second)
    return milestones


@pytest.mark.parametrize("changes, named", [
    ({"05_joint_task": {"global_step": 3000}}, "05_joint_task: steps 3000 -> {final}"),  # --final-steps 3000
    ({"train_clips": 500}, "training set clips 500 -> {clips}"),  # --train-clips 500, the set rebuilt since
    ({"05_joint_task": {"VideoDataModule": {"epoch": 0}}},
     "05_joint_task: training set not recorded (a checkpoint written before 2026-12-07)"),
    # --final-steps 650, then a plain demo resumed it to the demo's length: step and length match, the schedule not
    ({"05_joint_task": {"mardini": {"lr_schedule_history": [[0, 650], [650, _final_steps()]]}}},
     "05_joint_task: LR schedule 650 steps until step 650, then {final} -> one schedule throughout"),
    ({"05_joint_task": {"mardini": {"lr_schedule_history": [[700, _final_steps()]]}}},
     "05_joint_task: LR schedule history not recorded before step 700"),
    # trained with another curriculum: the ramp's second milestone moved, or kept in steps, or none at all
    ({"05_joint_task": {"callbacks": {"Curriculum": {"applied": 2, "milestones": _milestones(step=600),
                                                     "interpolate": True}}}},
     "05_joint_task: curriculum milestone 1 {{'step': 600, "),
    ({"05_joint_task": {"callbacks": {"Curriculum": {"applied": 2, "milestones": _milestones(),
                                                     "interpolate": False}}}},
     "05_joint_task: curriculum interpolate False -> True"),
    ({"05_joint_task": {"callbacks": {"Curriculum": {"applied": 2, "milestones": _milestones()}}}},
     "05_joint_task: curriculum interpolate not recorded (a checkpoint written before 2026-12-07) -> True"),
    ({"05_joint_task": {"callbacks": {}}}, "05_joint_task: curriculum none -> milestones at steps {steps}"),
    ({"04_joint_model": {"callbacks": {"Curriculum": {"applied": 2, "milestones": _milestones(),
                                                      "interpolate": True}}}},
     "04_joint_model: curriculum milestones at steps {steps} -> none"),
    ({"05_joint_task": {"callbacks": {"Curriculum": {"applied": 2, "milestones": _milestones(), "interpolate": True,
                                                     "rule": 2},
                                      "StochasticWeightAveraging": {"n_averaged": 3}}}},  # another training callback
     "05_joint_task: callback StochasticWeightAveraging -> none"),
])
def test_a_chain_trained_with_other_settings_stops_before_anything_naming_the_demo_s_fresh_run(
        tmp_path, monkeypatch, capsys, changes, named):
    """``python -m mardini.reproduce --checkpoints outputs/tiny`` after ``python -m mardini.demo --final-steps 3000``
    (or ``--train-clips 500``) scored that chain as the demo's: only the synthetic set on disk was checked. It now
    stops before building or writing anything, naming what differs and ``python -m mardini.demo --fresh``."""
    import runpy
    import sys

    from mardini.data import synthetic as S
    from mardini.demo import data

    named = named.format(final=_final_steps(), clips=S.DEMO_TRAIN_CLIPS, steps=[m["step"] for m in _milestones()])
    built = []
    monkeypatch.setattr(data, "build_synthetic", lambda *a, **k: built.append(a))
    monkeypatch.chdir(tmp_path)
    _demo_chain(tmp_path / "tiny", **changes)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["mardini.reproduce", "--checkpoints", str(tmp_path / "tiny"), "--only", "table2",
                                      "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("mardini.reproduce", run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and not built and not (tmp_path / "out").exists(), err
    assert err.startswith(f"python -m mardini.reproduce: error: {tmp_path / 'tiny'} holds checkpoints trained with "
                          "other settings than the demo's ("), err
    assert named in err and "run `python -m mardini.demo --fresh` first" in err and "Traceback" not in err


def test_the_demo_s_own_chain_passes_the_check(tmp_path):
    import torch

    from mardini.reproduce.demo_chain import chain_differences, check_demo_chain, stage_differences

    ckpts = _demo_chain(tmp_path / "tiny")
    assert chain_differences(ckpts) == {}
    check_demo_chain(ckpts, tmp_path / "tiny")  # no error
    ckpt = torch.load(ckpts["05_joint_task"], weights_only=False)
    ckpt["callbacks"]["KeepRatioCurriculum"] = ckpt["callbacks"].pop("Curriculum")  # a subclass's: keyed by its name
    assert stage_differences(ckpt, "05_joint_task") == []
    # at --scale 0.5 the same chain is one trained twice as long
    final = _final_steps()
    assert chain_differences(ckpts, scale=0.5)["05_joint_task"][0] == f"steps {final} -> {round(final / 2)}"


def _reproduction_runs(out: Path, scale: float, identity_steps: int, trained: dict[str, int] | None = None) -> Path:
    """``<out>/runs`` holding the chain and the Fig. 6c pair as ``python -m mardini.reproduce --scale scale
    --identity-steps identity_steps --out out`` trains them; ``trained``: ``{run: step}`` of runs stopped early."""
    import torch

    from mardini.demo.chain import TINY_STAGES, stage_settings
    from mardini.reproduce import runs

    configs = runs.prepare_configs(out)
    max_steps = {name: yaml.safe_load((configs / f"{name}.yaml").read_text())["trainer"]["max_steps"]
                 for name in TINY_STAGES}
    planned = {name: max(1, round(steps * scale)) for name, steps in max_steps.items()}
    planned |= {runs.identity_run_name(on): identity_steps for on in (True, False)}
    for name, steps in planned.items():
        cfg = stage_settings(configs / "common.yaml", configs / f"{name}.yaml")
        path = out / "runs" / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save(_stage_checkpoint(cfg, steps, (trained or {}).get(name)), path)
    return out / "runs"


def test_reproduction_runs_of_another_scale_stop_before_anything_naming_what_differs(tmp_path, monkeypatch, capsys):
    """``python -m mardini.reproduce --quick`` into a folder whose runs a default run (``--scale 1``) trained reused
    them (``run_stage`` reuses any checkpoint at or past its steps: "reusing its checkpoint at step 300, past the 6
    asked for") and reported them as its own. It now stops before building data or training, naming each run's
    differences and the folders to delete."""
    import runpy
    import sys

    from mardini.demo import data
    from mardini.reproduce.main import DEFAULTS, QUICK

    built = []
    monkeypatch.setattr(data, "build_synthetic", lambda *a, **k: built.append(a))
    monkeypatch.chdir(tmp_path)
    runs = _reproduction_runs(tmp_path / "out", DEFAULTS["scale"], DEFAULTS["identity_steps"])
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["mardini.reproduce", "--quick", "--only", "table2", "fig6c",
                                      "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("mardini.reproduce", run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and not built, err
    first = yaml.safe_load((ROOT / "configs/tiny/01_dm_warmup_4f.yaml").read_text())["trainer"]["max_steps"]
    quick = max(1, round(first * QUICK["scale"]))
    assert err.startswith(f"python -m mardini.reproduce: error: {runs} holds runs trained with other settings than "
                          f"this command's (01_dm_warmup_4f: steps {first} -> {quick}, LR schedule steps {first} -> "
                          f"{quick}; "), err
    identity = DEFAULTS["identity_steps"], QUICK["identity_steps"]
    assert "fig6c_identity_off: steps {} -> {}, LR schedule steps {} -> {}".format(*identity, *identity) in err
    assert f"rm -r {runs / '01_dm_warmup_4f'} " in err and "Traceback" not in err


def test_reproduction_runs_of_the_same_settings_are_reused_or_resumed(tmp_path):
    """Runs trained at this command's settings pass, finished or stopped short (a resume at the same schedule); one
    trained past the steps, or under another identity-attention setting, does not."""
    import torch

    from mardini.reproduce import runs

    out = tmp_path / "out"
    root = _reproduction_runs(out, 0.5, 40, trained={"02_dm_warmup_9f": 100, "fig6c_identity_on": 10})
    planned = runs.planned_runs(out / "configs", 0.5, 40)
    assert runs.reuse_differences(out / "configs", root, planned) == {}
    runs.check_reusable(out / "configs", root, planned)  # no error
    # --identity-steps 20: the finished run is past it, the stopped one (step 10) would resume under another schedule
    assert runs.reuse_differences(out / "configs", root, runs.planned_runs(out / "configs", 0.5, 20)) == {
        "fig6c_identity_on": ["LR schedule steps 40 -> 20"],
        "fig6c_identity_off": ["steps 40 -> 20", "LR schedule steps 40 -> 20"]}
    path = root / "fig6c_identity_off" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["generator"]["identity_attention"] = True  # the pair's "off" run trained with it on
    torch.save(ckpt, path)
    assert runs.reuse_differences(out / "configs", root, planned) == {
        "fig6c_identity_off": ["model.generator {} -> {}".format(ckpt["hyper_parameters"]["generator"],
                                                                  {**ckpt["hyper_parameters"]["generator"],
                                                                   "identity_attention": False})]}
