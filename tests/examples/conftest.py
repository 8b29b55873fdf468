"""The examples' tests reuse the SLURM dev cluster and the case campaign of tests/slurm."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SLURM = Path(__file__).resolve().parents[1] / "slurm"
sys.path.insert(0, str(_SLURM))
_spec = importlib.util.spec_from_file_location("slurm_conftest", _SLURM / "conftest.py")
assert _spec is not None and _spec.loader is not None
_mod = importlib.util.module_from_spec(_spec)
sys.modules["slurm_conftest"] = _mod
_spec.loader.exec_module(_mod)
slurm_cluster = _mod.slurm_cluster
campaign = _mod.campaign
pytest_configure = _mod.pytest_configure
