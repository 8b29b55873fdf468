"""The shipped configs load and build; overrides and errors behave as the CLI promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from kempnerforge.config import ConfigError, load_config
from kempnerforge.distributed import expand_nodelist, world_info

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


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n[1-4]", ["n1", "n2", "n3", "n4"]),
        ("a,b", ["a", "b"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("x[1-2],y5,z[08-09]", ["x1", "x2", "y5", "z08", "z09"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("single", ["single"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_world_info_sources() -> None:
    w = world_info(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (w.rank, w.world_size, w.local_rank, w.master_addr, w.launcher) == (
        3,
        4,
        1,
        "gpu07",
        "slurm",
    )
    assert 20000 <= w.master_port < 30000
    w2 = world_info(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "123456",
            "MASTER_PORT": "4242",
        }
    )
    assert w2.master_port == 4242
    t = world_info(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9"}
    )
    assert (t.rank, t.world_size, t.launcher) == (1, 2, "torchrun")
    assert world_info({}).launcher == "single"
    assert world_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist("n[1-")
