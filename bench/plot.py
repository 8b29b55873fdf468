"""Plot blocking time and time-to-durable versus state size, against the floors of the same run.

Usage: ``python bench/plot.py RESULTS.json [OUT.png]`` (the benchmark calls ``plot()`` itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GB = 1e9
_BASE_STYLE = {
    "torch_save": ("s", "tab:gray"),
    "dcp_sync": ("^", "tab:brown"),
    "dcp_async": ("D", "tab:purple"),
}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get("figures", {}).get(key)
        if isinstance(v, int | float):
            xs.append(r["state_bytes"] / GB)
            ys.append(v)
    return xs, ys


def plot(result: dict[str, Any], out: Path) -> Path:
    rows = sorted(result.get("sizes", []), key=lambda r: r["state_bytes"])
    floors = result.get("floors", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["state_bytes"] / GB for r in rows]
    lo, hi = (min(sizes) * 0.8, max(sizes) * 1.25) if sizes else (0.01, 10)
    xs_line = [lo, hi]

    ax = axes[0]
    block_bw = floors.get("pinned_d2h_gbps") or floors.get("memcpy_gbps")
    block_name = "pinned D2H" if floors.get("pinned_d2h_gbps") else "host memcpy"
    if block_bw:
        ax.plot(
            xs_line,
            [x / block_bw for x in xs_line],
            "k--",
            lw=1,
            label=f"floor: {block_name} {block_bw:.1f} GB/s",
        )
    x, y = _series(rows, "ours_blocked_s")
    ax.plot(x, y, "o-", color="tab:blue", label="ours (steady state)")
    x, y = _series(rows, "ours_first_blocked_s")
    ax.plot(x, y, "o:", color="tab:cyan", label="ours (first save)")
    for name, (marker, color) in _BASE_STYLE.items():
        x, y = _series(rows, f"{name}_blocked_s")
        if x:
            ax.plot(x, y, marker, color=color, ls="none", label=name)
    ax.set_title("caller blocked")

    ax = axes[1]
    wbw = floors.get("write_fsync_gbps")
    if wbw:
        ax.plot(
            xs_line,
            [x / wbw for x in xs_line],
            "k--",
            lw=1,
            label=f"floor: fsync'd write {wbw:.2f} GB/s",
        )
    x, y = _series(rows, "ours_durable_s")
    ax.plot(x, y, "o-", color="tab:blue", label="ours: save call to durable latest")
    for name, (marker, color) in _BASE_STYLE.items():
        x, y = _series(rows, f"{name}_durable_s")
        if x:
            ax.plot(x, y, marker, color=color, ls="none", label=name)
    ax.set_title("save call to durable")

    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("state (model + AdamW) per rank, GB")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = result.get("meta", {})
    fig.suptitle(
        f"checkpoint cost vs floors - {meta.get('device', '?')}, torch {meta.get('torch', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    print(plot(json.loads(src.read_text()), dst))
