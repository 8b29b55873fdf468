"""NCCL environment defaults, kept free of torch so the launcher can import them cheaply."""

from __future__ import annotations

from collections.abc import MutableMapping

# NVLink multicast (NVLS) is off by default: it needs fabric-manager support that shared
# clusters often lack, and a failure there hangs the first collective. Users may override.
NCCL_SAFE_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_safe_defaults(env: MutableMapping[str, str]) -> None:
    """Set each default in ``env`` unless the user already set that variable."""
    for k, v in NCCL_SAFE_DEFAULTS.items():
        env.setdefault(k, v)
