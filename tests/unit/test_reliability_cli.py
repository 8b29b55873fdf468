"""``kempnerforge ckpt``: ls / inspect / verify / export / prune on real DCP checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _reliability_fixtures import shard_file, tiny_model, write_checkpoint

from kempnerforge.checkpoint.lock import acquire_job_lock
from kempnerforge.cli import main


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    root = tmp_path / "ck"
    for step, seed in ((2, 0), (4, 1), (6, 2)):
        model, opt = tiny_model(seed)
        write_checkpoint(root, step, model, opt)
    model, opt = tiny_model(3)
    write_checkpoint(root, 8, model, opt, commit=False)  # an interrupted save
    (root / "step_abc").mkdir()  # not ours
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["ckpt", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_shows_status_and_latest(ckdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "ls", str(ckdir))
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln[:1].isdigit()}
    assert set(lines) == {"2", "4", "6", "8"}
    assert "committed" in lines["6"] and lines["6"].split()[-2] == "*"
    assert "incomplete" in lines["8"] and "*" not in lines["4"]
    assert "KiB" in lines["2"] and "step_abc" not in out


def test_inspect_shows_keys_shapes_world(ckdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "inspect", str(ckdir / "step_4"))
    assert rc == 0
    assert "step: 4" in out and "world size at save: 1" in out
    assert "model.0.weight" in out and "6x4" in out and "float32" in out
    assert "optimizer.state" not in out
    rc, out, _ = _run(capsys, "inspect", "--all", str(ckdir))  # a root: its latest
    assert "step: 6" in out and "optimizer.state.0.weight.exp_avg" in out


def test_verify_exit_code_and_named_file(ckdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "verify", str(ckdir))
    assert rc == 0 and out.count("OK") == 3 and "SKIP" in out
    bad = shard_file(ckdir / "step_4")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    bad.write_bytes(bytes(data))
    rc, out, _ = _run(capsys, "verify", str(ckdir / "step_4"))
    assert rc == 1 and f"{bad}: xxh3_64 checksum mismatch" in out
    rc, out, _ = _run(capsys, "verify", "--quick", str(ckdir / "step_4"))
    assert rc == 0  # same size: only checksums see a flipped bit
    other = shard_file(ckdir / "step_2")
    with open(other, "r+b") as f:
        f.truncate(100)
    rc, out, _ = _run(capsys, "verify", "--quick", str(ckdir))
    assert rc == 1 and str(other) in out and "truncated" in out


def test_export_safetensors_and_pt_bit_equal(
    ckdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    model, _ = tiny_model(1)  # what step_4 holds
    expected = model.state_dict()
    rc, _, err = _run(
        capsys, "export", str(ckdir / "step_4"), "--to", str(tmp_path / "m.safetensors")
    )
    assert rc == 0, err
    got = load_file(str(tmp_path / "m.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    rc, _, err = _run(capsys, "export", str(ckdir / "step_4"), "--to", str(tmp_path / "m.pt"))
    assert rc == 0, err
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    rc, _, err = _run(capsys, "export", str(ckdir / "step_4"), "--to", str(tmp_path / "m.pt"))
    assert rc == 1 and "--force" in err
    # a corrupt checkpoint is not exported
    f = shard_file(ckdir / "step_2")
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    rc, _, err = _run(capsys, "export", str(ckdir / "step_2"), "--to", str(tmp_path / "x.pt"))
    assert rc == 1 and "failed verification" in err and str(f) in err


@pytest.mark.distributed
def test_export_reads_shards_of_every_rank(tmp_path: Path) -> None:
    """A 2-rank FSDP2 checkpoint exports as full tensors, with no process group."""
    script = Path(__file__).with_name("_reliability_fsdp_save.py")
    out = tmp_path / "fsdp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out.glob("*.distcp"))) == 2
    rc = main(["ckpt", "export", str(out), "--no-verify", "--to", str(tmp_path / "full.pt")])
    assert rc == 0
    got = torch.load(tmp_path / "full.pt", weights_only=True)
    ref = torch.load(out.parent / "reference.pt", weights_only=True)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_prune_keeps_newest_and_latest(ckdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # make latest point at the oldest step: prune must keep it whatever --keep says
    os.remove(ckdir / "latest")
    os.symlink("step_2", ckdir / "latest")
    rc, _, _ = _run(capsys, "prune", str(ckdir), "--keep", "1")
    assert rc == 0
    assert sorted(p.name for p in ckdir.iterdir() if p.name.startswith("step_")) == [
        "step_2",
        "step_6",
        "step_abc",
    ]
    assert (ckdir / ".tmp_step_8").exists()
    rc, _, _ = _run(capsys, "prune", str(ckdir), "--keep", "1", "--incomplete")
    assert rc == 0 and not (ckdir / ".tmp_step_8").exists()
    assert (ckdir / "step_abc").exists()  # never touches what is not ours


def test_prune_refused_while_a_job_holds_the_dir(
    ckdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with acquire_job_lock(ckdir, job_id="slurm:31337"):
        rc, _, err = _run(capsys, "prune", str(ckdir), "--keep", "1")
        assert rc == 1 and "slurm:31337" in err
        rc, _, _ = _run(capsys, "ls", str(ckdir))  # readers are unaffected
        assert rc == 0
        rc, _, _ = _run(capsys, "verify", str(ckdir))
        assert rc == 0
    assert (ckdir / "step_2").exists()


def test_latest_outside_dir_refused(
    ckdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.remove(ckdir / "latest")
    os.symlink(str(tmp_path), ckdir / "latest")
    rc, _, err = _run(capsys, "ls", str(ckdir))
    assert rc == 1 and "outside" in err and "latest" in err


def test_console_script_runs(ckdir: Path) -> None:
    exe = Path(sys.executable).with_name("kempnerforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kempnerforge.cli"]
    r = subprocess.run(
        [*cmd, "ckpt", "verify", str(ckdir)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert main(["ckpt", "verify", str(ckdir / "nope")]) == 1


def test_on_a_manager_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tools read what CheckpointManager writes (async save, retention, lock files)."""
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig

    model, opt = tiny_model(5)
    d = tmp_path / "ck"
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(d), async_mode="async", keep_last_n=2), model, opt
    )
    for step in (1, 2, 3):
        mgr.save(step)
    mgr.wait()
    rc, out, _ = _run(capsys, "ls", str(d))
    assert rc == 0 and "step_3" in out and "step_1" not in out
    rc, out, _ = _run(capsys, "verify", str(d))
    assert rc == 0 and out.count("OK") == 2
    rc, _, err = _run(capsys, "export", str(d), "--to", str(tmp_path / "w.pt"))
    assert rc == 0, err
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    rc, _, err = _run(capsys, "prune", str(d), "--keep", "1")  # our own process holds the lock
    assert rc == 1 and "locked by job" in err
    mgr.close()
    rc, _, _ = _run(capsys, "prune", str(d), "--keep", "1")
    assert rc == 0 and not (d / "step_2").exists() and (d / "step_3").exists()
