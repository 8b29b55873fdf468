"""The training entrypoint under torchrun (gloo, CPU): FSDP2 exact resume after SIGUSR1 sent to
every worker, agreement when only one rank is signalled, and exactly-once data when a job
stopped on 2 ranks resumes on 3 (DDP) and then on 1. Real processes, signals and checkpoints."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import train_harness as h

pytestmark = pytest.mark.distributed

N = 12
GBS = 12
# A freeze stage inside the run, so FSDP2 (and DDP on 3 ranks) flip requires_grad mid-run.
STAGE = [
    "freeze.stages=[{start_step: 5, specs: [{module: embedding}]}]",
    "data.log_samples=true",
    f"train.max_steps={N}",
]


@pytest.fixture(scope="module")
def baseline2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base2")
    p = h.run(out, STAGE, nproc=2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return out


def test_fsdp2_sigusr1_to_every_worker_resume_bit_exact(baseline2: Path, tmp_path: Path) -> None:
    k = random.Random().randint(1, N - 5)
    rc, text = h.signal_at(tmp_path, STAGE, k, nproc=2)
    # torchrun reports the workers' exit code 75 (and itself exits non-zero).
    assert rc != 0 and re.search(r"exitcode\s*:\s*75", text), text[-4000:]
    stop = h.latest_step(tmp_path)
    assert k <= stop < N
    p = h.run(tmp_path, STAGE, nproc=2)
    assert p.returncode == 0, p.stderr[-4000:]
    assert h.metrics(tmp_path) == h.metrics(baseline2)
    h.assert_same_state(h.checkpoint_tensors(tmp_path, N), h.checkpoint_tensors(baseline2, N))


def test_stop_on_2_resume_on_3_then_1_consumes_each_sample_once(
    baseline2: Path, tmp_path: Path
) -> None:
    # Only rank 1 gets the signal after step 4: the agreement (read one step later) stops both
    # ranks after step 5.
    p = h.run(
        tmp_path,
        [*STAGE, "resilience.debug_signal_step=4", "resilience.debug_signal_rank=1"],
        nproc=2,
    )
    assert p.returncode != 0 and h.latest_step(tmp_path) == 5, p.stderr[-4000:]
    # 3 ranks, DDP, through the freeze stage (DDP re-wraps); rank 2 alone is signalled at 8.
    p = h.run(
        tmp_path,
        [
            *STAGE,
            "distributed.parallel=ddp",
            "resilience.debug_signal_step=8",
            "resilience.debug_signal_rank=2",
        ],
        nproc=3,
    )
    assert p.returncode != 0 and h.latest_step(tmp_path) == 9, p.stderr[-4000:]
    p = h.run(tmp_path, STAGE)  # one plain process to the end
    assert p.returncode == 0, p.stderr[-4000:]

    ms = h.metrics(tmp_path)
    assert [m["step"] for m in ms] == list(range(1, N + 1))
    assert ms[:5] == h.metrics(baseline2)[:5]  # same world size up to the first stop: same bits
    numbers, indices = h.consumed_samples(tmp_path)
    base_numbers, base_indices = h.consumed_samples(baseline2)
    assert numbers == base_numbers == list(range(N * GBS))  # every global sample exactly once
    assert indices == base_indices  # ... and they are the same dataset samples
