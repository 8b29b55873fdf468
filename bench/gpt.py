"""A plain GPT (pre-norm decoder) used only to give the benchmark a realistic state.

Why a private copy instead of ``kempnerforge.model``: the benchmark's numbers must stay comparable
across versions of the training code, so the state it saves (tensor count, shapes, dtypes) is
pinned here. It has the layout of a real GPT: per block two LayerNorms, a fused QKV projection, an
output projection and a 4x MLP, plus tied token embeddings and a position embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTSize:
    """One benchmark state size. ``params`` ~= 12 * n_layer * d_model^2 + (vocab + seq) * d_model."""

    name: str
    d_model: int
    n_layer: int
    vocab: int
    seq_len: int
    n_head: int = 0  # 0: d_model // 64

    def heads(self) -> int:
        return self.n_head or max(1, self.d_model // 64)

    def approx_params(self) -> int:
        d = self.d_model
        return self.n_layer * (12 * d * d + 13 * d) + (self.vocab + self.seq_len) * d + 2 * d

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, size: GPTSize) -> None:
        super().__init__()
        d = size.d_model
        self.tok = nn.Embedding(size.vocab, d)
        self.pos = nn.Embedding(size.seq_len, d)
        self.blocks = nn.ModuleList(Block(d, size.heads()) for _ in range(size.n_layer))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.tok.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def build(
    size: GPTSize,
    device: torch.device,
    seed: int = 0,
    wrap: Callable[[GPT], object] | None = None,
) -> tuple[GPT, torch.optim.AdamW]:
    """Model on ``device`` with AdamW; parameters are created directly on the device.

    ``wrap`` runs on the model before the optimizer is built: FSDP2's ``fully_shard`` replaces
    the parameters by sharded ones, and AdamW must hold those, not the full-size originals.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(size)
    if wrap is not None:
        wrap(model)
    try:  # fused AdamW exists for CPU too in recent torch; the per-tensor loop is 5-10x slower there
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    return model, opt


def train_step(
    model: GPT, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """One optimizer step (bf16 autocast on CUDA). Returns the loss tensor (not synchronized)."""
    idx, tgt = batch
    dev = idx.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        loss = model(idx, tgt)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def make_batch(
    size: GPTSize, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, size.vocab, (batch, seq + 1), generator=g).to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes, tensors) of model parameters/buffers plus optimizer state: what a rank must save."""
    n, count = 0, 0
    for t in model.state_dict().values():
        n += t.numel() * t.element_size()
        count += 1
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                n += v.numel() * v.element_size()
                count += 1
    return n, count
