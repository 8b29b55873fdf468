"""Applying freeze specs to the GPT: aliases, fnmatch patterns, errors, restore for loading."""

from __future__ import annotations

import pytest

from kempnerforge.config import ConfigError, load_config
from kempnerforge.freeze import (
    FreezeConfig,
    FreezeSpec,
    FreezeStage,
    all_trainable,
    apply_freeze,
    effective_freeze,
    validate_freeze,
)
from kempnerforge.model import GPT, ModelConfig

M = GPT(ModelConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, d_model=16))


def trainable(model: GPT) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_aliases_and_patterns() -> None:
    apply_freeze(M, [FreezeSpec("embedding"), FreezeSpec("head")])
    t = trainable(M)
    assert (
        not any(n.startswith(("embedding.", "head.")) for n in t) and "blocks.0.mlp.fc.weight" in t
    )
    apply_freeze(M, [FreezeSpec("blocks"), FreezeSpec("blocks.2", frozen=False)])  # later wins
    t = trainable(M)
    assert {n.split(".")[1] for n in t if n.startswith("blocks.")} == {"2"}
    apply_freeze(M, [FreezeSpec("blocks.*.attn")])
    assert not any(".attn." in n for n in trainable(M)) and "blocks.1.mlp.fc.weight" in trainable(M)
    apply_freeze(M, [])  # every parameter starts trainable again
    assert trainable(M) == {n for n, _ in M.named_parameters()}


def test_unknown_alias_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'encoder'"):
        apply_freeze(M, [FreezeSpec("encoder")])
    bad = FreezeConfig(stages=[FreezeStage(100, [FreezeSpec("blocks.9")])])
    with pytest.raises(ConfigError, match=r"blocks.9"):
        validate_freeze(M, bad)  # found at start, not at step 100


def test_stage_schedule_and_yaml() -> None:
    cfg = load_config(
        None,
        [
            "freeze.base=[{module: embedding}]",
            "freeze.stages=[{start_step: 5, specs: [{module: embedding, frozen: false}]}]",
        ],
    )
    assert effective_freeze(cfg.freeze, 4) == [FreezeSpec("embedding", True)]
    assert effective_freeze(cfg.freeze, 5) == [FreezeSpec("embedding", False)]


def test_all_trainable_restores_flags() -> None:
    apply_freeze(M, [FreezeSpec("head")])
    before = trainable(M)
    with all_trainable(M):
        assert trainable(M) == {n for n, _ in M.named_parameters()}
    assert trainable(M) == before
