"""The progress channel (``kempnerforge.log``) as a user's script sees it: each case is a fresh
``python -c`` process, because what is checked is what importing the package does to a process
whose logging is configured (or not) in a given order."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LINE = re.compile(
    r"^kempnerforge rank (\d+) (\d\d):(\d\d):(\d\d): resumed from step 12 \(ck/step_12\)$"
)
EMIT = (
    "from kempnerforge.log import progress; progress('resumed from step %d (%s)', 12, 'ck/step_12')"
)
USER = (
    "import logging; logging.basicConfig(level=logging.INFO, format='USER %(name)s: %(message)s')"
)
# Variables that place a process in a job, or silence it: none may leak in from the test run.
PLACE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in PLACE and not k.startswith("SLURM_") and k != "KEMPNERFORGE_QUIET"
    }
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "resumed from step" in ln]


def test_visible_without_logging_config_in_one_format(tmp_path: Path) -> None:
    p = run(f"import kempnerforge; {EMIT}", tmp_path)
    assert p.stdout == ""  # stderr only
    (line,) = lines(p.stderr)
    m = LINE.match(line)
    assert m, line
    assert m.group(1) == "0"
    hh, mm, ss = (int(g) for g in m.groups()[1:])
    assert hh < 24 and mm < 60 and ss < 61


@pytest.mark.parametrize("order", ["before", "after"])
def test_basicconfig_before_or_after_import_prints_once(tmp_path: Path, order: str) -> None:
    code = f"{USER}; import kempnerforge; {EMIT}"
    if order == "after":
        code = f"import kempnerforge; {USER}; {EMIT}"
    p = run(code, tmp_path)
    assert lines(p.stderr) == ["USER kempnerforge.progress: resumed from step 12 (ck/step_12)"]


def test_user_level_warning_still_shows_progress_once(tmp_path: Path) -> None:
    """The channel has its own level: a root at WARNING (basicConfig's default) keeps it."""
    code = (
        "import logging; logging.basicConfig(format='USER %(message)s'); "
        f"import kempnerforge; {EMIT}"
    )
    assert lines(run(code, tmp_path).stderr) == ["USER resumed from step 12 (ck/step_12)"]


def test_handler_on_package_logger_prints_once(tmp_path: Path) -> None:
    code = (
        "import logging, sys; h = logging.StreamHandler(sys.stderr); "
        "h.setFormatter(logging.Formatter('PKG %(message)s')); "
        "logging.getLogger('kempnerforge').addHandler(h); "
        f"import kempnerforge; {EMIT}"
    )
    assert lines(run(code, tmp_path).stderr) == ["PKG resumed from step 12 (ck/step_12)"]


def test_a_nullhandler_does_not_hide_the_line(tmp_path: Path) -> None:
    code = (
        "import logging; logging.getLogger().addHandler(logging.NullHandler()); "
        f"import kempnerforge; {EMIT}"
    )
    (line,) = lines(run(code, tmp_path).stderr)
    assert LINE.match(line), line


@pytest.mark.parametrize(
    "place",
    [{"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}],
    ids=["torchrun", "slurm"],
)
def test_only_rank_0_prints(tmp_path: Path, place: dict[str, str]) -> None:
    assert lines(run(f"import kempnerforge; {EMIT}", tmp_path, **place).stderr) == []
    assert lines(run(f"{USER}; import kempnerforge; {EMIT}", tmp_path, **place).stderr) == []
    zero = {k: "0" if k in ("RANK", "SLURM_PROCID") else v for k, v in place.items()}
    (line,) = lines(run(f"import kempnerforge; {EMIT}", tmp_path, **zero).stderr)
    assert LINE.match(line), line


def test_other_ranks_lines_are_debug_records(tmp_path: Path) -> None:
    code = (
        "import logging, kempnerforge; "
        "logging.getLogger('kempnerforge.progress').setLevel(logging.DEBUG); "
        f"{EMIT}"
    )
    (line,) = lines(run(code, tmp_path, RANK="1", WORLD_SIZE="2").stderr)
    m = LINE.match(line)
    assert m and m.group(1) == "1", line


def test_quiet_env_silences(tmp_path: Path) -> None:
    assert lines(run(f"import kempnerforge; {EMIT}", tmp_path, KEMPNERFORGE_QUIET="1").stderr) == []
    code = f"{USER}; import kempnerforge; {EMIT}"
    assert lines(run(code, tmp_path, KEMPNERFORGE_QUIET="1").stderr) == []
    (line,) = lines(run(f"import kempnerforge; {EMIT}", tmp_path, KEMPNERFORGE_QUIET="0").stderr)
    assert LINE.match(line), line


def test_quiet_wins_over_a_debug_channel(tmp_path: Path) -> None:
    code = (
        "import logging, kempnerforge; "
        "logging.getLogger('kempnerforge.progress').setLevel(logging.DEBUG); "
        f"{EMIT}"
    )
    assert lines(run(code, tmp_path, KEMPNERFORGE_QUIET="1").stderr) == []


def test_quiet_function_silences_and_restores(tmp_path: Path) -> None:
    code = (
        "import kempnerforge; from kempnerforge.log import progress, quiet; "
        "quiet(); progress('resumed from step 1 (q)'); "
        "quiet(False); progress('resumed from step 2 (q)')"
    )
    got = lines(run(code, tmp_path).stderr)
    assert len(got) == 1 and got[0].endswith(": resumed from step 2 (q)"), got


def test_installed_once_and_user_channel_level_kept(tmp_path: Path) -> None:
    code = (
        "import importlib, logging; "
        "logging.getLogger('kempnerforge.progress').setLevel(logging.WARNING); "
        "import kempnerforge, kempnerforge.log as kl; importlib.reload(kl); kl.install_default_handler(); "
        "ch = logging.getLogger('kempnerforge.progress'); "
        "print(len(ch.handlers), logging.getLevelName(ch.level)); "
        "ch.setLevel(logging.INFO); "
        f"{EMIT}"
    )
    p = run(code, tmp_path)
    assert p.stdout.split() == ["1", "WARNING"]
    assert len(lines(p.stderr)) == 1


def test_other_package_loggers_keep_stdlib_behaviour(tmp_path: Path) -> None:
    code = (
        "import logging, kempnerforge; lg = logging.getLogger('kempnerforge.checkpoint.manager'); "
        "lg.info('an info line'); lg.warning('a warning line')"
    )
    p = run(code, tmp_path)
    assert p.stderr.splitlines() == ["a warning line"]  # Python's last-resort handler, as before


def test_import_stays_torch_free(tmp_path: Path) -> None:
    code = f"import sys, kempnerforge; {EMIT}; print('torch' in sys.modules)"
    assert run(code, tmp_path).stdout.strip() == "False"
