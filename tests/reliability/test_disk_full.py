"""Disk full / write errors during a real training run's save.

Two ways to make writes fail for real: ``RLIMIT_FSIZE`` (every write past the limit fails with
EFBIG, as on a full disk; always available) and a small tmpfs (a real ENOSPC; needs the right
to mount, so it is skipped where that is not allowed).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_crash import CONFIG, REPO, TINY


def _train(out: Path, *extra: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill the process
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "kempnerforge.train",
        "--config",
        str(CONFIG),
        f"output_dir={out}",
        *TINY,
        "checkpoint.interval=2",
        "checkpoint.keep_last_n=3",
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        preexec_fn=limit if fsize else None,
    )


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_clean(ck: Path, latest: str) -> None:
    assert os.readlink(ck / "latest") == latest
    leftovers = [p.name for p in ck.iterdir() if p.name.startswith(".tmp_step_")]
    assert not leftovers, f"partial saves left behind: {leftovers}"
    trash = ck / ".trash"
    assert not trash.exists() or not any(trash.iterdir())


@pytest.mark.parametrize("policy", ["raise", "continue", "exit"])
def test_write_error_during_save(tmp_path: Path, policy: str) -> None:
    out = tmp_path / "run"
    first = _train(out, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    r = _train(out, "train.max_steps=6", f"resilience.on_save_error={policy}", fsize=64 * 1024)
    ck = out / "checkpoints"
    # the error names the step and says why: the file-size limit, and the space left
    assert "tmp_step_4" in r.stderr and "RLIMIT_FSIZE" in r.stderr, r.stderr[-3000:]
    assert "free on the filesystem" in r.stderr
    if policy == "raise":
        assert r.returncode not in (0, 75)
        assert _steps(out) == [1, 2, 3, 4]
    elif policy == "exit":
        assert r.returncode == 75, r.stderr[-3000:]  # "run me again" from the last commit
        assert _steps(out) == [1, 2, 3, 4]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert _steps(out) == [1, 2, 3, 4, 5, 6]  # trained on through the failed saves
    _assert_clean(ck, "step_2")  # previous latest intact, partial step cleaned up
    again = _train(out, "train.max_steps=6")  # space is back: resumes from step 2 and finishes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr
    assert os.readlink(ck / "latest") == "step_6"


def test_disk_full_on_a_small_filesystem(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    # one checkpoint of the tiny model (~0.7 MB) fits; a second one beside it does not
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        out = mnt / "run"
        r = _train(out, "train.max_steps=4", "resilience.on_save_error=raise")
        assert r.returncode != 0
        assert "No space left on device" in r.stderr and "tmp_step_4" in r.stderr, r.stderr[-3000:]
        assert "MiB free on the filesystem of" in r.stderr
        _assert_clean(out / "checkpoints", "step_2")
        assert _steps(out) == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
