"""The launcher's command line: its options are flags, config overrides positional ``key=value``.

The parser is the real one (``cli.main``), run in this process up to where it stops on a usage
error; ``--max-requeues 0`` is checked by running the local launcher on a real command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kempnerforge.launch import cli


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "unknown", [["--flag", "1"], ["--flag"], ["--flag=1"], ["train.max_steps=5", "--flag", "1"]]
)
def test_an_unknown_option_is_an_error_that_names_it(capsys, unknown):
    err = usage_error(capsys, "--dry-run", "--config", "debug.yaml", *unknown)
    assert "unknown option --flag:" in err, err
    assert "config overrides are positional section.key=value" in err, err
    assert "override '1'" not in err  # its value is not read as an override


def test_unknown_options_before_a_command_are_all_named(capsys):
    err = usage_error(capsys, "--flag", "1", "--nodes", "2", "--other", "--", "python", "t.py")
    assert "unknown options --flag, --other:" in err, err


def test_an_override_written_as_an_option_is_shown_without_dashes(capsys):
    err = usage_error(capsys, "--config", "debug.yaml", "--train.max_steps=50")
    assert "unknown option --train.max_steps:" in err, err
    assert "(without dashes: train.max_steps=50)" in err, err


def test_options_after_the_command_are_the_commands(capsys):
    rc = cli.main(["--dry-run", "--local", "--nodes", "2", "--", "python", "t.py", "--flag", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dry run: 2 local task(s) would run: python t.py --flag 1" in out, out


def test_max_requeues_help_says_zero_is_unlimited():
    text = " ".join(cli.build_parser().format_help().split())
    assert "--max-requeues MAX_REQUEUES restarts allowed in total; 0 (the default) means" in text
    assert "means unlimited" in text


# Exits 75 ("run me again") in its first three runs, then 0.
AGAIN = """
import os, sys
sys.exit(75 if int(os.environ["KEMPNERFORGE_RESTART_COUNT"]) < 3 else 0)
"""


@pytest.mark.parametrize(("limit", "rc", "restarts"), [("0", 0, 3), ("2", 76, 2)])
def test_max_requeues_zero_is_unlimited(tmp_path: Path, limit: str, rc: int, restarts: int):
    (tmp_path / "again.py").write_text(AGAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("KEMPNERFORGE_JOB_ID", None)
    launcher = [sys.executable, "-m", "kempnerforge.launch", "--local", "--max-requeues", limit]
    res = subprocess.run(
        [*launcher, "--", sys.executable, "again.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == rc, res.stdout + res.stderr
    assert res.stdout.count(": restarting (restart ") == restarts, res.stdout
    assert ("stop: --max-requeues 2 restart(s) used" in res.stdout) == (limit == "2"), res.stdout
