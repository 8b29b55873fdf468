"""The original KempnerForge's ``tests/integration/test_checkpoint_roundtrip.py``, ported.

Source: the newest stored version (eight tests). Its last three, through ``CheckpointManager``
(moments restored; ``exclude_keys`` of the optimizer, of the model), are the same tests as the
original unit tests' ``TestCheckpointManagerLoad``: they run once, in
``test_original_checkpoint.py``.
The original's ``Transformer``/``build_optimizer``/``build_scheduler`` are this project's
``GPT``, a plain ``torch.optim.AdamW`` (lazy state, as the original's optimizer had; our
``build_optimizer`` pre-creates it) and a ``LambdaLR`` warmup+cosine (what the original's
``cosine`` scheduler was). CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch
from _compat_common import TINY, lazy_adamw, tiny_gpt, train_steps

from kempnerforge.checkpoint import (
    build_train_state,
    get_rng_state,
    restore_train_state,
    set_rng_state,
)

# DCP warns on each single-process save/load; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _cosine(opt: torch.optim.Optimizer, warmup: int = 5, max_steps: int = 100):
    def lr_fn(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / (max_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)


def _tokens(seed: int = 0, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, TINY.seq_len), generator=g)


class TestCheckpointRoundtrip:
    def test_model_state_roundtrip(self, tmp_path):
        model = tiny_gpt(0)
        torch.save(model.state_dict(), tmp_path / "model.pt")
        model2 = tiny_gpt(1)
        model2.load_state_dict(torch.load(tmp_path / "model.pt"))
        for (n1, p1), (n2, p2) in zip(
            model.named_parameters(), model2.named_parameters(), strict=True
        ):
            assert n1 == n2
            assert torch.equal(p1, p2), f"Mismatch in {n1}"

    def test_optimizer_state_roundtrip(self, tmp_path):
        model = tiny_gpt(0)
        opt = lazy_adamw(model)
        train_steps(model, opt, 3)
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        model2 = tiny_gpt(0)
        model2.load_state_dict(model.state_dict())
        opt2 = lazy_adamw(model2)
        opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
        for pg1, pg2 in zip(opt.param_groups, opt2.param_groups, strict=True):
            assert pg1["lr"] == pg2["lr"]
            assert pg1["weight_decay"] == pg2["weight_decay"]

    def test_train_state_roundtrip(self):
        opt = lazy_adamw(tiny_gpt(0))
        sched = _cosine(opt)
        for _ in range(10):
            opt.step()
            sched.step()
        state = build_train_state(step=10, tokens_seen=5000, scheduler=sched)
        assert state["step"] == 10
        assert state["tokens_seen"] == 5000
        sched2 = _cosine(lazy_adamw(tiny_gpt(0)))
        step, tokens, _ = restore_train_state(state, scheduler=sched2)
        assert (step, tokens) == (10, 5000)
        assert sched2.last_epoch == sched.last_epoch

    def test_rng_state_roundtrip(self):
        rng_state = get_rng_state()
        vals1 = torch.randn(10)
        set_rng_state(rng_state)
        vals2 = torch.randn(10)
        assert torch.equal(vals1, vals2)

    def test_full_training_resume(self, tmp_path):
        """Train N, save, train M more == train N+M uninterrupted (plain torch.save of both)."""
        tokens = _tokens()
        model_ref = tiny_gpt(42)
        opt_ref = lazy_adamw(model_ref)
        for _ in range(20):
            loss = model_ref(tokens, tokens)
            loss.backward()
            opt_ref.step()
            opt_ref.zero_grad()
        ref_loss = loss.item()

        model = tiny_gpt(42)
        opt = lazy_adamw(model)
        for _ in range(10):
            model(tokens, tokens).backward()
            opt.step()
            opt.zero_grad()
        torch.save(model.state_dict(), tmp_path / "model.pt")
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        model2 = tiny_gpt(7)
        model2.load_state_dict(torch.load(tmp_path / "model.pt"))
        opt2 = lazy_adamw(model2)
        opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
        for _ in range(10):
            loss = model2(tokens, tokens)
            loss.backward()
            opt2.step()
            opt2.zero_grad()
        assert abs(ref_loss - loss.item()) < 1e-4
