"""AdamW groups, up-front optimizer state, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

from kempnerforge.model import GPT, ModelConfig
from kempnerforge.optim import OptimConfig, WarmupCosineSchedule, build_optimizer, lr_at

CFG = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16)


def test_decay_groups() -> None:
    opt = build_optimizer(GPT(CFG), OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )


def test_prefilled_state_matches_lazy_adamw() -> None:
    """Creating AdamW state up front changes no bit of training (vs torch's lazy init)."""
    cfg = OptimConfig(lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    models = [GPT(CFG, seed=3), GPT(CFG, seed=3)]
    ours = build_optimizer(models[0], cfg)
    lazy = torch.optim.AdamW(
        [
            {
                "params": [p for p in models[1].parameters() if p.dim() >= 2],
                "weight_decay": cfg.weight_decay,
            },
            {"params": [p for p in models[1].parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    assert len(ours.state) == sum(1 for _ in models[0].parameters()) and not lazy.state
    for _ in range(3):
        for m, o in zip(models, (ours, lazy)):
            m(x, x).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_schedule_warmup_cosine_and_state() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(20, cfg, 20) == 0.1 and lr_at(50, cfg, 20) == 0.1
    assert math.isclose(lr_at(12, cfg, 20), 0.55)
    opt = build_optimizer(GPT(CFG), cfg)
    sched = WarmupCosineSchedule(opt, cfg, 20)
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    assert state == {"last_step": 7}  # plain ints: no pickled callables
    other = WarmupCosineSchedule(build_optimizer(GPT(CFG), cfg), cfg, 20)
    other.load_state_dict(state)
    assert other.get_last_lr() == sched.get_last_lr() == [lr_at(7, cfg, 20)] * 2
