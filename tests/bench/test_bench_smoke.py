"""The benchmarks' CI-sized runs produce every figure the performance issues ask for.

Runs ``bench/checkpoint_bench.py --smoke`` for real (real saves with the real CheckpointManager,
real DCP baselines, real child processes for resume and preemption, on ``tmp_path``) and checks
the JSON it writes; likewise ``bench/maybe_save_cost.py`` on two ranks. No timing thresholds:
speed is judged by the full benchmarks, not by CI. Marked ``bench``: a tier of its own, left out
of ``make test-fast`` and run by plain ``pytest tests``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``bench/<script> ARGS`` from the repository root, one thread; fails on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_smoke_writes_all_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _bench(
        "checkpoint_bench.py", "--smoke", "--out", str(out), "--dir", str(tmp_path / "fs"),
        timeout_s=600,
    )  # fmt: skip
    res = json.loads(out.read_text())

    fl = res["floors"]
    assert fl["memcpy_gbps"] > 0 and fl["read_gbps"] > 0
    assert set(fl["write_fsync_gbps_by_threads"]) == {"1", "4", "8"}
    assert fl["write_fsync_gbps"] == max(fl["write_fsync_gbps_by_threads"].values())

    assert [r["name"] for r in res["sizes"]] == ["tiny-1m", "tiny-3m"]
    for row in res["sizes"]:
        f = row["figures"]
        assert row["state_bytes"] > 0 and not row["skipped"], row["skipped"]
        for key in ("ours_blocked_s", "ours_durable_s", "block_ratio", "durable_ratio"):
            assert isinstance(f[key], float) and f[key] > 0, (key, f)
        assert f["latest_ok"] is True
        wf = row["write_floor_at_size"]
        assert wf["bytes"] == row["state_bytes"] and wf["gbps"] > 0, wf
        assert wf["threads"] == fl["write_fsync_best_threads"]
        assert f["durable_floor_kind"] == "at size"
        assert f["durable_ratio_general_floor"] > 0
        assert isinstance(f["later_saves_reuse_host_memory"], bool)
        assert f["manager_new_host_bytes_later"] == 0, "staging buffers must be reused"
        for name in ("torch_save", "dcp_sync", "dcp_async"):
            assert f[f"{name}_durable_s"] >= f[f"{name}_blocked_s"] > 0, (name, f)
    last = res["sizes"][-1]["figures"]
    assert last["resume_s"] > 0 and last["resume_ratio"] > 0

    tp = res["throughput"]
    assert tp["throughput_ratio"] > 0 and tp["steps_per_arm"] > 0
    # one save in the middle of each interval, none on the arm's last step
    assert len(tp["save_steps"]) == tp["steps_per_arm"] // tp["interval"]
    assert tp["steps_per_arm"] not in tp["save_steps"]
    assert isinstance(tp["excess_per_save_s"], float)
    assert isinstance(tp["windows_none_s"], list) and isinstance(tp["windows_save_s"], list)
    pe = res["preemption"]
    assert pe["exit_code_ok"] is True and pe["latest_ok"] is True, pe
    assert pe["signal_to_exit_s"] > 0 and pe["budget_s"] > 0

    assert out.with_suffix(".png").stat().st_size > 0
    assert "ratio (target)" in proc.stdout
    # the benchmark cleans up after itself on the checkpoint filesystem
    assert not any((tmp_path / "fs").rglob("*.distcp"))


@pytest.mark.distributed
def test_maybe_save_cost_smoke_two_ranks(tmp_path: Path) -> None:
    """``bench/maybe_save_cost.py`` on 2 CPU ranks (torchrun, gloo: the agreement's all-reduce
    really runs) for a few steps writes every figure. Whether the check meets its target is the
    full benchmark's verdict, not CI's: only that the figures are there and positive."""
    out = tmp_path / "cost.json"
    proc = _bench(
        "maybe_save_cost.py",
        *("--device", "cpu", "--size", "debug", "--ranks", "2"),
        *("--steps", "4", "--pairs", "2", "--warmup", "2", "--json", str(out)),
        timeout_s=120,
    )
    res = json.loads(out.read_text())
    assert res["meta"]["ranks"] == 2 and res["meta"]["steps_per_arm"] == 2
    assert res["check_calls"] == 2 * 2 * 2  # ranks x pairs x steps per arm
    assert [r["rank"] for r in res["check_per_rank"]] == [0, 1]
    for key in ("step_s", "check_median_us", "check_p90_us", "ratio_check_step"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    assert res["ratio_check_p90_step"] >= res["ratio_check_step"]
    tp = res["throughput"]
    assert isinstance(tp["ratio"], float) and tp["ratio"] > 0
    assert len(tp["arms_without_s"]) == len(tp["arms_with_s"]) == 2
    assert isinstance(tp["excess_per_step_us"], float)
    assert res["saved_any"] is False, "the interval is beyond the run: nothing may be saved"
    assert isinstance(res["target"]["pass"], bool) and res["target"]["limit"] == 0.01
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
