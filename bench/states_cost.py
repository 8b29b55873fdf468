"""What a handed-over state costs the training loop: an EMA the size of the model.

    python bench/states_cost.py --device cpu --size gpt-29m --saves 8
    python bench/states_cost.py --device cuda --size gpt-1b --saves 8 --json out.json

``CheckpointManager(..., states={"ema": ema})`` saves the EMA's tensors through DCP beside the
model and the optimizer: staged into the same reused (on CUDA, pinned) host buffers, then written
in the background. What the loop waits for in ``maybe_save`` grows by what staging the EMA costs,
and the least that can cost is copying its bytes once into a buffer that already exists (a host
memcpy on CPU; on CUDA a pinned device-to-host copy, which the manager overlaps with the next
steps, so the loop should not even wait for that).

One run measures, on the same machine in the same minutes:

- ``maybe_save(step, force=True)`` blocked time (``perf_counter`` around the call), for a manager
  with the model and AdamW only, and for one that also holds the EMA, in alternating saves
  (A/B/A/B: drift falls on both), each after a training step; the first save of each (buffer
  allocation) is left out and every save is made durable before the next arm runs;
- the EMA's copy floor: its bytes copied into an existing buffer of the same kind the stager uses.

The target: blocked(with EMA) - blocked(without) <= the EMA's copy floor. Figures are printed one
a line with PASS/MISS and written as JSON with ``--json``; nothing here fails on a miss.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # a plain checkout works without `pip install -e .`

import gpt  # noqa: E402
from measure import settle  # noqa: E402

from kempnerforge.checkpoint import CheckpointManager  # noqa: E402
from kempnerforge.checkpoint.config import CheckpointConfig  # noqa: E402
from kempnerforge.log import quiet  # noqa: E402

SIZES = {
    s.name: s
    for s in (
        gpt.GPTSize("tiny-1m", 128, 2, 1024, 64),
        gpt.GPTSize("gpt-29m", 512, 8, 8192, 128),
        gpt.GPTSize("gpt-124m", 768, 12, 50304, 2048),
        gpt.GPTSize("gpt-1b", 2048, 18, 50304, 2048),
    )
}


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def copy_floor_s(module: torch.nn.Module, device: torch.device, repeats: int = 5) -> float:
    """Best time to copy ``module``'s tensors into existing host buffers, as the stager does
    (pinned and non-blocking from CUDA; one list copy either way)."""
    src = [t.detach() for t in module.state_dict().values()]
    pin = device.type == "cuda"
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in src]
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch._foreach_copy_(dst, src, non_blocking=pin)
        if pin:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size = SIZES[args.size]
    model, opt = gpt.build(size, device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    batch = gpt.make_batch(size, args.batch, args.seq or size.seq_len, device)
    root = Path(tempfile.mkdtemp(prefix="kf-states-", dir=args.dir))
    mode = "async_with_pinned_mem" if device.type == "cuda" else "async"
    arms = {
        "without": CheckpointManager(
            CheckpointConfig(dir=str(root / "without"), async_mode=mode, keep_last_n=1),
            model,
            opt,
        ),
        "with_ema": CheckpointManager(
            CheckpointConfig(dir=str(root / "with_ema"), async_mode=mode, keep_last_n=1),
            model,
            opt,
            states={"ema": ema},
        ),
    }
    blocked: dict[str, list[float]] = {k: [] for k in arms}
    try:
        step = 0
        for i in range(args.saves + 1):
            for name, mgr in arms.items():
                gpt.train_step(model, opt, batch)
                ema.update_parameters(model)
                step += 1
                settle(device)
                t0 = time.perf_counter()
                mgr.maybe_save(step, force=True)
                took = time.perf_counter() - t0
                mgr.wait()  # durable before the other arm runs: no overlap between arms
                for old in (root / name).glob("step_*"):  # only the blocked time matters here:
                    shutil.rmtree(old, ignore_errors=True)  # keep the disk for the next saves
                if i:  # the first save of each arm allocates its buffers
                    blocked[name].append(took)
        floor = copy_floor_s(ema, device)
    finally:
        for mgr in arms.values():
            mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in blocked.items()}
    added = med["with_ema"] - med["without"]
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": size.name,
        "async_mode": mode,
        "ema_bytes": tensor_bytes(ema),
        "saves_per_arm": args.saves,
        "blocked_s": blocked,
        "blocked_median_s": med,
        "ema_added_s": added,
        "ema_copy_floor_s": floor,
        "ratio_added_to_floor": added / floor if floor > 0 else float("inf"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="gpt-29m")
    p.add_argument("--saves", type=int, default=8, help="timed saves per arm")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    quiet()  # the figures below, not a line per save
    r = measure(args)
    med = r["blocked_median_s"]
    print(
        f"device {r['device']}, {r['size']}, {r['async_mode']}, EMA {r['ema_bytes'] / 1e6:.1f} MB"
    )
    print(f"maybe_save blocked, median of {r['saves_per_arm']}: without {med['without']:.4f} s")
    print(f"maybe_save blocked, median of {r['saves_per_arm']}: with EMA {med['with_ema']:.4f} s")
    verdict = "PASS" if r["ema_added_s"] <= r["ema_copy_floor_s"] else "MISS"
    print(
        f"EMA adds {r['ema_added_s']:.4f} s against its copy floor {r['ema_copy_floor_s']:.4f} s "
        f"(ratio {r['ratio_added_to_floor']:.2f}, target <= 1): {verdict}"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
