"""Child processes of the benchmark: cold start-up, resume, and preemption.

Run as ``python bench/worker.py MODE --spec JSON``. Resume and preemption are about a *process*
(interpreter start, imports, device init, model build, load, first step), so they are measured in
a fresh one. The child prints one ``RESULT {json}`` line with wall-clock stamps (``time.time()``:
the parent and the child share the clock, ``perf_counter`` does not cross processes).

Modes:
- ``fresh``: build model + AdamW, one training step (start-up without a checkpoint).
- ``resume``: the same, with ``CheckpointManager.load()`` before the step.
- ``preempt``: train with async saves every ``interval`` steps; on SIGUSR1 finish the step, save,
  wait until ``latest`` is durable, exit 75 (the loop a SLURM job runs, reduced to its bones).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

T_START = time.time()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt  # noqa: E402

T_IMPORTED = time.time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("fresh", "resume", "preempt"))
    ap.add_argument("--spec", required=True, help="JSON: size, device, batch, seq, ckpt_dir, ...")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    size = gpt.GPTSize(**spec["size"])
    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model, opt = gpt.build(size, device)
    batch = gpt.make_batch(size, spec["batch"], spec["seq"], device)
    _sync(device)
    res: dict[str, float | int | str] = {"t_start": T_START, "t_imported": T_IMPORTED}
    res["t_built"] = time.time()

    if args.mode in ("resume", "preempt"):
        from kempnerforge.checkpoint import CheckpointManager
        from kempnerforge.config import CheckpointConfig

        cfg = CheckpointConfig(
            dir=spec["ckpt_dir"],
            interval=spec.get("interval", 50),
            async_mode=spec.get("async_mode", "disabled"),
            keep_last_n=2,
        )
        mgr = CheckpointManager(cfg, model, opt)

    if args.mode == "resume":
        step, _tokens, _extra = mgr.load()
        _sync(device)
        res["t_loaded"] = time.time()
        res["loaded_step"] = step
        gpt.train_step(model, opt, batch)
        _sync(device)
        res["t_first_step"] = time.time()
    elif args.mode == "fresh":
        gpt.train_step(model, opt, batch)
        _sync(device)
        res["t_first_step"] = time.time()
    else:
        stop = {"flag": False, "t": 0.0}

        def on_usr1(signum: int, frame: object) -> None:
            stop["flag"] = True  # nothing else in a handler
            stop["t"] = time.time()

        signal.signal(signal.SIGUSR1, on_usr1)
        interval = cfg.interval
        step = 0
        step_times: list[float] = []
        announced = False
        while True:
            t0 = time.perf_counter()
            gpt.train_step(model, opt, batch).item()  # .item(): the step is really done
            step += 1
            step_times.append(time.perf_counter() - t0)
            if stop["flag"]:
                t_save = time.time()
                mgr.save(step)
                mgr.wait()
                res.update(
                    t_signal=stop["t"],
                    t_save_call=t_save,
                    t_durable=time.time(),
                    final_step=step,
                    step_s=sorted(step_times)[len(step_times) // 2],
                )
                print("RESULT " + json.dumps(res), flush=True)
                return 75
            if step % interval == 0:
                mgr.save(step)
                if not announced and step >= 2 * interval:
                    # Steady state (buffers allocated, one save reused them). Drain this save so
                    # the signal meets no flush in flight: the target budgets one flush, and a
                    # signal landing mid-flush costs up to one more (reported in the docs).
                    mgr.wait()
                    print(f"READY {step}", flush=True)
                    announced = True
            if step > spec.get("max_steps", 100000):
                print("ERROR no signal received", flush=True)
                return 1

    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
