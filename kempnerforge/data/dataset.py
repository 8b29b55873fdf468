"""Token datasets: a memory-mapped token file, or a built-in deterministic synthetic corpus.

A dataset is a flat 1-D array of token ids. Sample ``i`` is the window
``tokens[i * seq_len : i * seq_len + seq_len + 1]`` (inputs are the first ``seq_len`` ids,
targets the last ``seq_len``), so samples do not overlap and their count is
``(len(tokens) - 1) // seq_len``. See ``data/README.md`` for turning text into a token file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kempnerforge.data.config import DataConfig

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenDataset:
    """Fixed-length next-token samples over a 1-D token array (memmap or in memory)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int, source: str) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"{source}: token array must be 1-D, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"{source}: {len(tokens)} tokens is fewer than one sample of model.seq_len+1="
                f"{seq_len + 1}; use a bigger file or a smaller model.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.source = source

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def check_vocab(self) -> None:
        """Fail early (not at step 10,000) when the file holds ids the model cannot embed."""
        hi = int(self.tokens.max())
        if hi >= self.vocab_size:
            raise ValueError(
                f"{self.source}: holds token id {hi} but model.vocab_size={self.vocab_size}; "
                f"set model.vocab_size >= {hi + 1} (the tokenizer's vocabulary size)"
            )

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) as int64 tensors of shape (len(indices), seq_len)."""
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * L : i * L + L + 1]) for i in indices])
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def load_token_file(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """Memory-map a ``.npy`` (dtype from its header) or raw ``.bin`` (dtype from config) file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"data.path={str(p)!r}: no such file. Prepare one as described in kempnerforge/data/README.md, "
            "or leave data.path unset for the built-in synthetic corpus."
        )
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:
            raise ValueError(f"{p}: not a readable .npy token file ({e})") from e
        if arr.dtype not in (np.uint16, np.uint32):
            raise ValueError(
                f"{p}: token dtype must be uint16 or uint32, got {arr.dtype}; re-save with astype"
            )
        return arr.reshape(-1)
    if p.suffix == ".bin":
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        size = p.stat().st_size
        if size % itemsize:
            raise ValueError(
                f"{p}: size {size} bytes is not a multiple of {itemsize} ({dtype}); "
                "is data.dtype right for this file?"
            )
        return np.memmap(p, dtype=_DTYPES[dtype], mode="r")
    raise ValueError(
        f"{p}: unknown token file type {p.suffix!r}; use .npy or .bin (raw uint16/uint32)"
    )


def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """A deterministic corpus with structure a small model learns in a few steps.

    The corpus is a run of "phrases" of 8-64 tokens. A phrase starts at a random token and then
    follows a fixed random successor table: ``next = succ[prev]``. Within a phrase the next token
    is a function of the previous one (a bigram rule), so the loss falls from ``ln(vocab)``
    towards the entropy of the phrase breaks. Same (n_tokens, vocab_size, seed), same bytes.
    """
    rng = np.random.default_rng([seed, vocab_size, 0x5EED])
    succ = rng.permutation(vocab_size).astype(np.int64)
    lengths = rng.integers(8, 65, size=n_tokens // 8 + 2)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = starts[starts < n_tokens]
    offset = np.arange(n_tokens) - np.repeat(starts, np.diff(np.append(starts, n_tokens)))
    tokens = np.repeat(
        rng.integers(0, vocab_size, size=len(starts)), np.diff(np.append(starts, n_tokens))
    )
    for j in range(1, int(offset.max()) + 1):  # apply succ j times where offset >= j
        mask = offset >= j
        tokens[mask] = succ[tokens[mask]]
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    return tokens.astype(dtype)


def build_dataset(cfg: DataConfig, seq_len: int, vocab_size: int) -> TokenDataset:
    if cfg.path:
        tokens = load_token_file(cfg.path, cfg.dtype)
        ds = TokenDataset(tokens, seq_len, vocab_size, cfg.path)
        ds.check_vocab()
        return ds
    tokens = synthetic_tokens(cfg.synthetic_tokens, vocab_size, cfg.seed)
    return TokenDataset(tokens, seq_len, vocab_size, "<synthetic>")
