"""A small GPT-style decoder-only language model.

The module layout is part of the contract: ``embedding`` (token + position), ``blocks`` (a
``ModuleList`` of pre-LN transformer blocks), ``ln_f`` and ``head``. Freeze aliases
(:mod:`kempnerforge.freeze`) and FSDP2 wrapping (:mod:`kempnerforge.distributed`) rely on these
names. Initialisation draws from a private ``torch.Generator`` seeded by the caller, so the
initial weights depend only on the config and the seed, never on the global RNG state or on
how many processes started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 512
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    dropout: float = 0.0
    mlp_ratio: int = 4  # hidden width of the MLP = mlp_ratio * d_model
    init_std: float = 0.02
    compute_dtype: str = "float32"  # "float32" | "bfloat16" (autocast on CUDA; weights stay fp32)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ValueError(f"model.init_std must be > 0, got {self.init_std}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"model.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}"
            )


class Embedding(nn.Module):
    """Token plus learned absolute position embedding: one module so one alias freezes both."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 style init from a private generator: same seed, same bits, on any launcher.

        Residual output projections get std / sqrt(2 * n_layer) so the residual stream keeps
        its scale as depth grows.
        """
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:  # LayerNorm weights (ln_1, ln_2, ln_f)
                p.fill_(1.0)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj.weight") else std
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, s, generator=g))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or (with ``targets``) the mean cross-entropy over all tokens."""
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds model.seq_len={self.cfg.seq_len}"
            )
        x = self.embedding(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
