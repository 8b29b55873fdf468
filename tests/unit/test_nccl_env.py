"""NVLink multicast stays off in every environment we build, unless the user set the variable."""

from __future__ import annotations

from kempnerforge.nccl import NCCL_SAFE_DEFAULTS, apply_safe_defaults


def test_defaults_fill_only_what_the_user_left_unset() -> None:
    env = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    apply_safe_defaults(env)
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's choice wins
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["PATH"] == "/bin"
    assert set(NCCL_SAFE_DEFAULTS) <= set(env)
