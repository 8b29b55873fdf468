"""The exception line of a crash, as the exit records and ``--status`` report it.

Plain Python tracebacks and torch.distributed's form, where its excepthook writes every line of
an uncaught exception with a ``[rankN]: `` tag. The last test makes that form for real: two gloo
ranks under the local launcher raise, and the exit records and ``--status`` must name the error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kempnerforge.launch.records import exception_line

PLAIN = [
    "step 3 loss 2.5",
    "Traceback (most recent call last):",
    '  File "train.py", line 9, in <module>',
    "    main()",
    "ValueError: boom",
]

DDP = [
    "[kempnerforge.launch] job 4242 restart 0 rank 1/2 node 1 (n2) master n1:23456: python t.py",
    "step 3 loss 2.5",
    "[rank1]: Traceback (most recent call last):",
    '[rank1]:   File "t.py", line 12, in <module>',
    "[rank1]:     main()",
    '[rank1]:   File "t.py", line 9, in main',
    '[rank1]:     raise RuntimeError("boom")',
    "[rank1]: RuntimeError: boom",
    "",
    "[kempnerforge.launch] job 4242 restart 0 rank 1: command ended: exit 1 (crash)",
]


def test_plain_traceback():
    assert exception_line(PLAIN) == "ValueError: boom"
    assert exception_line(PLAIN[:1]) is None


def test_rank_tagged_traceback():
    assert exception_line(DDP) == "RuntimeError: boom"


def test_a_chained_ddp_traceback_gives_the_last_exception():
    chained = [
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "t.py", line 3, in <module>',
        "[rank0]: KeyError: 'lr'",
        "",
        "[rank0]: During handling of the above exception, another exception occurred:",
        "",
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "t.py", line 5, in <module>',
        "[rank0]: ValueError: no lr in the config",
    ]
    assert exception_line(chained) == "ValueError: no lr in the config"


def test_interleaved_ranks_keep_to_the_rank_of_the_last_traceback():
    """Ranks that share one log interleave their lines; each traceback is read through its tag."""
    mixed = [
        "[rank0]: Traceback (most recent call last):",
        "[rank1]: Traceback (most recent call last):",
        '[rank0]:   File "t.py", line 3, in <module>',
        '[rank1]:   File "t.py", line 3, in <module>',
        "[rank0]: RuntimeError: boom on rank 0",
        "[rank1]: RuntimeError: boom on rank 1",
    ]
    assert exception_line(mixed) == "RuntimeError: boom on rank 1"
    # a line of another rank inside an untagged traceback is not its exception
    assert exception_line([*PLAIN[1:4], "[rank1]: step 3", PLAIN[4]]) == "ValueError: boom"


WORKER = """
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()  # both ranks are past the rendezvous before either ends
raise RuntimeError(f"boom on rank {dist.get_rank()}")
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("KEMPNERFORGE_JOB_ID", None)
    return env


def test_a_ddp_crash_is_named_by_the_exit_records_and_status(tmp_path: Path):
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = [sys.executable, "-m", "kempnerforge.launch"]
    res = subprocess.run(
        [*launcher, "--local", "--tasks-per-node", "2", "--", sys.executable, "worker.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[rank1]: RuntimeError: boom on rank 1" in res.stdout  # the tagged form, for real
    recs = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "runs" / "local").glob("*_exit.json")),
        key=lambda r: r["rank"],
    )
    assert [r["exception"] for r in recs] == [
        "RuntimeError: boom on rank 0",
        "RuntimeError: boom on rank 1",
    ]
    job = recs[0]["job_id"]
    st = subprocess.run(
        [*launcher, "--status", job],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert st.returncode == 0, st.stderr
    reason = st.stdout.rstrip().splitlines()[-1]
    want = r"\s*reason:\s+crash: rank (\d) exit 1 \(crash\): RuntimeError: boom on rank \1(;|$)"
    assert re.match(want, reason), st.stdout
    assert re.search(r"^\s*crash:\s+rank (\d) .*: RuntimeError: boom on rank \1$", st.stdout, re.M)
