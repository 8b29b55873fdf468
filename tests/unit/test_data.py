"""Token files, the synthetic corpus, and the global-position sampler (exactly-once on resume)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from kempnerforge.data import (
    GlobalSampler,
    StepLoader,
    TokenDataset,
    build_dataset,
    synthetic_tokens,
)
from kempnerforge.data.config import DataConfig


def test_synthetic_is_deterministic_and_structured() -> None:
    a, b = synthetic_tokens(5000, 128, 0), synthetic_tokens(5000, 128, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, synthetic_tokens(5000, 128, 1))
    assert a.dtype == np.uint16 and a.max() < 128
    # Learnable: the next token is the successor of the previous one most of the time.
    pairs = {}
    for x, y in itertools.pairwise(a):
        pairs.setdefault(int(x), []).append(int(y))
    top = sum(max(np.bincount(v)) for v in pairs.values()) / (len(a) - 1)
    assert top > 0.9


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files(tmp_path: Path, suffix: str) -> None:
    tokens = np.arange(1000, dtype=np.uint32) % 300
    path = tmp_path / f"toks{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    ds = build_dataset(DataConfig(path=str(path), dtype="uint32"), seq_len=10, vocab_size=300)
    assert len(ds) == 99
    x, y = ds.batch([0, 5])
    assert x[1, 0].item() == 50 and y[1, 0].item() == 51 and x.shape == (2, 10)


def test_token_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.bin"):
        build_dataset(DataConfig(path=str(tmp_path / "nope.bin")), 8, 100)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"odd.bin"):
        build_dataset(DataConfig(path=str(odd), dtype="uint32"), 1, 100)
    big = tmp_path / "big.npy"
    np.save(big, np.array([5, 6, 70000] * 10, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"big.npy.*vocab_size"):
        build_dataset(DataConfig(path=str(big)), 4, 1000)
    f64 = tmp_path / "f.npy"
    np.save(f64, np.zeros(100))
    with pytest.raises(ValueError, match=r"f.npy"):
        build_dataset(DataConfig(path=str(f64)), 4, 10)


def consumed(world: int, steps: range, start_pos: int = 0, n: int = 50, gbs: int = 12) -> list[int]:
    out = []
    for r in range(world):
        s = GlobalSampler(n, gbs, r, world, seed=3)
        s.load_state_dict({"position": start_pos, "seed": 3, "num_samples": n})
        for _ in steps:
            out += s.next_step()[1]
    return out


def test_sampler_exactly_once_across_world_sizes() -> None:
    whole = sorted(consumed(1, range(10)))
    # 2 ranks for 4 steps, then 3 ranks for 3, then 1 rank for 3: the same multiset of samples.
    mixed = consumed(2, range(4)) + consumed(3, range(3), 4 * 12) + consumed(1, range(3), 7 * 12)
    assert sorted(mixed) == whole
    # 120 samples over a 50-sample dataset: epochs 0, 1 full and 20 of epoch 2, each a permutation.
    assert sorted(consumed(1, range(10))[:50]) == list(range(50))
    assert consumed(1, range(5))[:50] != consumed(1, range(5))[50:100]  # reshuffled per epoch


def test_sampler_state_and_errors() -> None:
    s = GlobalSampler(50, 12, 0, 2, seed=3)
    s.next_step()
    assert s.state_dict() == {"position": 12, "seed": 3, "num_samples": 50}
    with pytest.raises(ValueError, match="global_batch_size"):
        GlobalSampler(50, 10, 0, 3, seed=0)
    with pytest.raises(ValueError, match=r"data.seed"):
        s.load_state_dict({"position": 0, "seed": 4, "num_samples": 50})


def test_loader_micro_batches() -> None:
    ds = TokenDataset(synthetic_tokens(4000, 64, 0), 16, 64, "<synthetic>")
    loader = StepLoader(ds, GlobalSampler(len(ds), 8, 1, 2, seed=0), micro_batch_size=2)
    mb = loader.next_step(torch.device("cpu"))
    assert loader.accum_steps == 2 and len(mb) == 2 and mb[0][0].shape == (2, 16)
    assert loader.last_numbers == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="micro_batch_size"):
        StepLoader(ds, GlobalSampler(len(ds), 8, 0, 2, seed=0), micro_batch_size=3)


def test_loader_workers_read_ahead_and_resume_exactly() -> None:
    """``data.num_workers``: worker processes read the next steps ahead; what each step holds,
    and where a restored loader continues, do not change."""
    cfg = DataConfig(synthetic_tokens=20_000)
    ds = build_dataset(cfg, 16, 256)

    def steps(workers: int, n: int, state: dict | None = None) -> tuple[list, dict]:
        loader = StepLoader(ds, GlobalSampler(len(ds), 8, 1, 2, seed=3), 2, num_workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        out = [[x.clone() for x, _ in loader.next_step(torch.device("cpu"))] for _ in range(n)]
        saved = loader.state_dict()
        loader.close()
        return out, saved

    plain, _ = steps(0, 10)
    ahead, _ = steps(2, 10)
    assert all(torch.equal(a, b) for sa, sb in zip(plain, ahead) for a, b in zip(sa, sb))
    first, state = steps(2, 4)  # 4 steps consumed, the workers had read further
    assert state["position"] == 4 * 8
    rest, _ = steps(2, 6, state)
    assert all(torch.equal(a, b) for sa, sb in zip(plain, first + rest) for a, b in zip(sa, sb))
