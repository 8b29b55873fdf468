"""The shipped configs load and build; overrides and errors behave as the CLI promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from kempnerforge.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir == str(Path("runs") / path.stem)
    assert cfg.checkpoint.dir == str(Path("runs") / path.stem / "checkpoints")
    assert cfg.train.global_batch_size % max(1, cfg.train.micro_batch_size or 1) == 0


def test_override_types_and_unknown_keys() -> None:
    path = CONFIGS[0]
    cfg = load_config(path, ["train.max_steps=7", "optim.lr=0.01", "data.log_samples=true"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.data.log_samples) == (7, 0.01, True)
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        load_config(path, ["train.max_steps=seven"])
    with pytest.raises(ConfigError, match=r"model.n_layers"):
        load_config(path, ["model.n_layers=3"])
