"""Plot blocking time and time-to-durable versus state size, against the floors of the same run.

Usage: ``python bench/plot.py OUT.png RESULTS.json [MORE.json ...]`` (the benchmark calls
``plot()`` itself). Several result files (e.g. two runs on one machine kind) are merged: a size
measured in more than one keeps the later file's row, and each file's floors are drawn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

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


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs: rows by size name (later runs win), every run's floors."""
    by_name: dict[str, dict[str, Any]] = {}
    for r in results:
        for row in r.get("sizes", []):
            if row.get("figures", {}).get("ours_blocked_s") is not None:
                by_name[row["name"]] = row
    merged = dict(results[-1])
    merged["sizes"] = list(by_name.values())
    merged["floors_all"] = [r.get("floors", {}) for r in results]
    return merged


def _floor_lines(
    ax: Any, floor_sets: list[dict[str, Any]], key: str, name: str, xs: list[float]
) -> None:
    seen: list[float] = []
    for i, fl in enumerate(floor_sets):
        bw = fl.get(key)
        if not bw or any(abs(bw - b) <= 0.03 * b for b in seen):
            continue
        seen.append(bw)
        style = ("k--", "k:", "k-.")[i % 3]
        ax.plot(xs, [x / bw for x in xs], style, lw=1, label=f"floor: {name} {bw:.2f} GB/s")


def plot(result: dict[str, Any], out: Path) -> Path:
    rows = sorted(result.get("sizes", []), key=lambda r: r["state_bytes"])
    floors = result.get("floors", {})
    floor_sets = result.get("floors_all") or [floors]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["state_bytes"] / GB for r in rows]
    lo, hi = (min(sizes) * 0.8, max(sizes) * 1.25) if sizes else (0.01, 10)
    xs_line = [lo, hi]

    ax = axes[0]
    if floors.get("pinned_d2h_gbps"):
        _floor_lines(ax, floor_sets, "pinned_d2h_gbps", "pinned D2H", xs_line)
    else:
        _floor_lines(ax, floor_sets, "memcpy_gbps", "host memcpy", xs_line)
    x, y = _series(rows, "ours_blocked_s")
    ax.plot(x, y, "o-", color="tab:blue", label="ours (steady state)")
    x, y = _series(rows, "ours_first_blocked_s")
    ax.plot(x, y, "o:", color="tab:cyan", label="ours (first save)")
    x, y = _series(rows, "ours_staged_s")
    if x:  # save() returns before a pinned copy is done; this is when it was
        ax.plot(x, y, "v:", color="tab:green", label="ours: copy done")
    for name, (marker, color) in _BASE_STYLE.items():
        x, y = _series(rows, f"{name}_blocked_s")
        if x:
            ax.plot(x, y, marker, color=color, ls="none", label=name)
    ax.set_title("caller blocked")

    ax = axes[1]
    _floor_lines(ax, floor_sets, "write_fsync_gbps", "fsync'd write", xs_line)
    x, y = _series(rows, "durable_floor_at_size_s")
    if x:
        ax.plot(x, y, "kx", ms=7, label="floor: fsync'd write of the state's bytes")
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
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (0.01, 0.03, 0.1, 0.3, 1, 2, 4, 8, 12, 16) if lo <= t <= hi])
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
    if len(sys.argv) < 3:
        raise SystemExit("usage: python bench/plot.py OUT.png RESULTS.json [MORE.json ...]")
    loaded = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]
    print(plot(loaded[0] if len(loaded) == 1 else merge(loaded), Path(sys.argv[1])))
