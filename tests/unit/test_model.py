"""The GPT: module layout (the freeze/FSDP contract), deterministic init, causality, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kempnerforge.config import load_config
from kempnerforge.model import GPT, ModelConfig, num_parameters

CFG = ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def test_layout_names() -> None:
    m = GPT(CFG)
    top = [n for n, _ in m.named_children()]
    assert top == ["embedding", "blocks", "ln_f", "head"]
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 2


def test_init_depends_only_on_seed() -> None:
    torch.manual_seed(1)
    a = GPT(CFG, seed=7).state_dict()
    torch.manual_seed(999)  # the global RNG must not matter
    b = GPT(CFG, seed=7).state_dict()
    c = GPT(CFG, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_causal_and_loss() -> None:
    m = GPT(CFG)
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 64  # change only the future
    assert torch.equal(m(x)[:, :10], m(y)[:, :10])
    loss = m(x, x)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_too_long_sequence_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"model.seq_len"):
        GPT(CFG)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "bad", [{"d_model": 30, "n_head": 4}, {"n_layer": 0}, {"compute_dtype": "fp8"}]
)
def test_bad_model_config(bad: dict) -> None:
    with pytest.raises(ValueError, match="model"):
        ModelConfig(**bad)


def test_debug_config_is_small() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
    assert num_parameters(GPT(cfg.model)) <= 1_000_000
