"""``kempnerforge ckpt``: look at, check, export and prune checkpoints from a shell;
``kempnerforge report``: where a job's time went (goodput), from its checkpoint dir's run ledger.
Torch is imported only by the commands that read tensors, so ``report`` and ``ls`` start fast.

Everything here reads through the same safe paths as a resume (restricted unpickler for DCP's
``.metadata``, ``weights_only`` for tensors and train state), so pointing the tool at a
checkpoint of unknown origin cannot run code. Only ``prune`` writes; it takes the directory's
job lock first, so it refuses to touch a directory a training job is writing.

Exit codes: 0 success, 1 a check failed (``verify``) or the command failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kempnerforge.checkpoint import resolve, storage
from kempnerforge.checkpoint.resolve import StepEntry
from kempnerforge.checkpoint.storage import CheckpointFormatError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit code 1."""


# ---------------------------------------------------------------------------------------------
# Layout: every verdict comes from kempnerforge.checkpoint.resolve, the manager's own resolver


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _check_latest(root: Path) -> None:
    """A ``latest`` that names something outside ``root`` is an error a person must fix."""
    _, why = storage.read_latest(root)
    if why and "outside" in why:
        raise CliError(f"{why}. Remove the link; auto-resume picks the newest complete checkpoint.")


def scan(root: Path) -> list[StepEntry]:
    """Every checkpoint under ``root``, oldest step first (the resolver's verdicts)."""
    if not root.is_dir():
        raise CliError(f"{root}: not a directory")
    return resolve.scan(root)


def _resolve_step_dir(path: Path) -> Path:
    """A step directory from PATH: the step itself, or what a checkpoint root resumes from."""
    if not path.exists():
        raise CliError(
            f"{path}: no such checkpoint (expected a step_N directory or a checkpoint dir)"
        )
    if resolve.is_step_dir(path):
        return path
    _check_latest(path)
    res = resolve.find_resumable(path)
    if res.path is None:
        raise CliError(res.error or f"{path}: no committed checkpoint in this directory")
    return Path(res.path)


def _human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------------------------------------
# Verification


def verify_step(step_dir: Path, checksums: bool = True) -> list[str]:
    """Every problem found in one checkpoint (empty list: it is complete and intact).

    On top of the manifest check of :func:`storage.verify_step_dir` (sizes, xxh3_64 checksums),
    this reads DCP's ``.metadata`` through the restricted unpickler, checks that every shard it
    references is long enough, and that each rank's train state is there.
    """
    problems: list[str] = []
    try:
        meta = storage.load_metadata(step_dir)
    except CheckpointFormatError as e:
        return [str(e)]
    problems += [
        str(p) for p in storage.verify_step_dir(step_dir, "full" if checksums else "size", meta)
    ]
    if not (meta.get("manifest") or {}).get("files") and not storage.is_original_layout(step_dir):
        problems.append(
            f"{step_dir / storage.METADATA_FILE}: no manifest; file checksums cannot be checked"
        )
    from kempnerforge.checkpoint.safe_unpickle import load_dcp_metadata

    try:
        md = load_dcp_metadata(step_dir)
    except CheckpointFormatError as e:
        problems.append(str(e))
        md = None
    if md is not None and md.storage_data:
        need: dict[str, int] = {}
        for info in md.storage_data.values():
            rel = str(info.relative_path)
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
        for rel, end in sorted(need.items()):
            f = step_dir / rel
            if not f.is_file():
                problems.append(f"{f}: missing (DCP metadata references it)")
            elif f.stat().st_size < end:
                problems.append(f"{f}: truncated ({f.stat().st_size} bytes, DCP needs {end})")
    world = meta.get("world_size")
    if isinstance(world, int):
        for r in range(world):
            f = step_dir / storage.train_state_name(r)
            if not f.is_file():
                problems.append(f"{f}: missing (saved with world size {world})")
    return sorted(set(problems), key=problems.index)


# ---------------------------------------------------------------------------------------------
# Commands


def _status(e: StepEntry) -> str:
    if e.usable:
        return "committed"
    return "corrupt" if e.corrupt else "incomplete"


def cmd_ls(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    entries = scan(root)
    _check_latest(root)
    if not entries:
        print(f"{root}: no checkpoints")
        return 0
    res = resolve.find_resumable(root)
    resumes = Path(res.path).resolve() if res.path else None
    now = time.time()
    rows = [("STEP", "STATUS", "SIZE", "AGE", "TOKENS", "RESUME", "PATH")]
    for e in entries:
        status = _status(e)
        tokens = e.meta.get("tokens_seen", "")
        is_latest = "*" if resumes is not None and e.path.resolve() == resumes else ""
        age = now - e.commit_time
        rows.append(
            (
                str(e.step),
                status,
                storage.human_bytes(_dir_size(e.path)),
                _human_age(age),
                str(tokens),
                is_latest,
                e.path.name,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for w in res.warnings:
        print(f"note: {w}")
    for e in entries:
        if e.problem and e.committed:
            print(f"note: {e.path.name}: {e.problem}")
    if res.error:
        print(f"note: {res.error}")
    trash = root / storage.TRASH_DIR
    if trash.is_dir() and any(trash.iterdir()):
        print(
            f"note: {trash} holds {len(list(trash.iterdir()))} retired checkpoint(s) pending deletion"
        )
    return 0


def _describe_keys(md: Any, prefix: str | None) -> list[tuple[str, str, str]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    rows = []
    for key, value in sorted(md.state_dict_metadata.items()):
        if prefix and not key.startswith(prefix):
            continue
        if isinstance(value, TensorStorageMetadata):
            dtype = str(value.properties.dtype).removeprefix("torch.")
            rows.append((key, "x".join(map(str, value.size)) or "scalar", dtype))
        else:
            rows.append((key, "-", "bytes"))
    return rows


def _saved_world_size(md: Any, meta: dict) -> int | None:
    if isinstance(meta.get("world_size"), int):
        return meta["world_size"]
    ranks = set()
    for info in (md.storage_data or {}).values():
        m = re.match(r"^__(\d+)_", str(info.relative_path))
        if m:
            ranks.add(int(m.group(1)))
    return len(ranks) or None


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_states(step_dir: Path, meta: dict, md: Any) -> None:
    """The handed-over states (``CheckpointManager(states=...)``): tensors in DCP, plain values
    in rank 0's train state."""
    names = meta.get("states") or []
    if not names:
        return
    from kempnerforge.checkpoint.state import read_train_state
    from kempnerforge.checkpoint.stateful import PREFIX, tensor_keys

    saved = read_train_state(step_dir, 0).get("states") or {}
    print(f"states: {len(names)} (tensors: export --key {PREFIX}.<name>)")
    for name in names:
        entry = saved.get(name) or {}
        if entry.get("kind") == "loader":
            keys = sorted(entry.get("state") or {})
            print(f"  {name}: data loader position ({len(keys)} keys: {_short(keys)})")
            continue
        skeleton = entry.get("skeleton")
        n_tensors = len(tensor_keys(skeleton))
        rows = _describe_keys(md, f"{PREFIX}.{name}.")
        elements = sum(_elements(shape) for _k, shape, _d in rows if shape not in ("-", "scalar"))
        plain = (
            {k: v for k, v in skeleton.items() if not tensor_keys(v)}
            if isinstance(skeleton, dict)
            else {}
        )
        line = f"  {name}: {n_tensors} tensors ({elements:,} elements)"
        if plain:
            line += f", values {_short(plain)}"
        print(line)


def _elements(shape: str) -> int:
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def cmd_inspect(args: argparse.Namespace) -> int:
    from kempnerforge.checkpoint.safe_unpickle import load_dcp_metadata

    step_dir = _resolve_step_dir(Path(args.path))
    meta = storage.load_metadata(step_dir)
    md = load_dcp_metadata(step_dir)
    print(f"checkpoint: {step_dir}")
    shown = {k: v for k, v in meta.items() if k != "manifest"}
    for k, v in shown.items():
        print(f"  {k}: {v}")
    print(f"  world size at save: {_saved_world_size(md, meta)}")
    manifest = (meta.get("manifest") or {}).get("files") or {}
    print(
        f"  files in manifest: {len(manifest)}  ({storage.human_bytes(_dir_size(step_dir))} on disk)"
    )
    _print_states(step_dir, meta, md)
    prefix = None if args.all else "model."
    rows = _describe_keys(md, prefix)
    n_params = sum(_elements(shape) for _k, shape, _d in rows if shape not in ("-", "scalar"))
    title = "all keys" if args.all else "model keys (--all for optimizer and the rest)"
    print(f"{title}: {len(rows)} tensors/values, {n_params:,} elements")
    w = max([len(r[0]) for r in rows] + [3])
    for key, shape, dtype in rows:
        print(f"  {key.ljust(w)}  {shape:>14}  {dtype}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_dir():
        raise CliError(f"{path}: no such checkpoint directory")
    if not resolve.is_step_dir(path):
        entries = scan(path)
        if not entries:
            raise CliError(f"{path}: no checkpoints to verify")
        targets = [e.path for e in entries if e.committed]
        for e in entries:
            if not e.committed:
                print(f"SKIP  {e.path.name}: {e.problem}")
    else:
        targets = [path]
    bad = 0
    for step_dir in targets:
        problems = verify_step(step_dir, checksums=not args.quick)
        if problems:
            bad += 1
            print(f"FAIL  {step_dir}")
            for p in problems:
                print(f"      {p}")
        else:
            print(f"OK    {step_dir}")
    return 1 if bad else 0


def load_full_model_state(step_dir: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors under ``key`` of a DCP checkpoint, in this process.

    No process group is needed: DCP's no-dist load into a state dict rebuilt from the metadata
    gathers every shard written by every rank.
    """
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from kempnerforge.checkpoint.reader import CheckpointReader
    from kempnerforge.checkpoint.safe_unpickle import (
        SafeEmptyStateDictLoadPlanner,
        load_dcp_metadata,
    )

    md = load_dcp_metadata(step_dir)
    keys = {k for k in md.state_dict_metadata if k == key or k.startswith(key + ".")}
    if not keys:
        top = sorted({k.split(".", 1)[0] for k in md.state_dict_metadata})
        raise CliError(f"{step_dir}: no '{key}' entries in this checkpoint (top-level keys: {top})")
    sd: dict[str, Any] = {}
    _load_state_dict(
        sd,
        storage_reader=CheckpointReader(str(step_dir)),
        planner=SafeEmptyStateDictLoadPlanner(keys=keys),
        no_dist=True,
    )
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, torch.Tensor):
            out[prefix] = node

    node: Any = sd
    for part in key.split("."):  # the loaded dict is nested: states.ema -> sd["states"]["ema"]
        node = node.get(part, {}) if isinstance(node, dict) else {}
    walk("", node)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    step_dir = _resolve_step_dir(Path(args.path))
    problems = [] if args.no_verify else verify_step(step_dir)
    if problems:
        raise CliError(
            f"{step_dir} failed verification, not exporting:\n  " + "\n  ".join(problems)
        )
    tensors = load_full_model_state(step_dir, args.key)
    dest = Path(args.to)
    if dest.exists() and not args.force:
        raise CliError(f"{dest} exists; pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if dest.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CliError(
                "export to .safetensors needs the safetensors package: "
                "pip install 'kempnerforge[export]'"
            ) from None
        meta = storage.load_metadata(step_dir)
        save_file(tensors, str(tmp), metadata={"step": str(meta.get("step")), "format": "pt"})
    elif dest.suffix in (".pt", ".pth", ".bin"):
        import torch

        torch.save(tensors, tmp)
    else:
        raise CliError(f"--to {dest}: use a .safetensors or .pt file name")
    os.replace(tmp, dest)
    n = sum(t.numel() for t in tensors.values())
    print(f"exported {len(tensors)} tensors ({n:,} elements) from {step_dir} to {dest}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from kempnerforge.checkpoint.lock import acquire_job_lock

    root = Path(args.dir)
    if args.keep < 1:
        raise CliError(f"--keep must be >= 1, got {args.keep}")
    entries = scan(root)
    _check_latest(root)
    res = resolve.find_resumable(root)
    resumes = Path(res.path).resolve() if res.path else None
    usable = sorted((e for e in entries if e.usable), key=lambda e: e.commit_time, reverse=True)
    keep = {e.path for e in usable[: args.keep]}
    doomed = [e for e in usable[args.keep :] if e.path.resolve() != resumes]
    if args.incomplete:
        doomed += [e for e in entries if not e.committed]
    if args.corrupt:
        doomed += [e for e in entries if e.corrupt]
    if not doomed:
        print(f"nothing to prune in {root} ({len(keep)} committed kept)")
        return 0
    if args.dry_run:
        for e in doomed:
            print(f"would remove {e.path.name}")
        return 0
    # A writer: refuse while a training job holds the directory.
    with acquire_job_lock(root, job_id=f"cli-prune:{os.getpid()}", wait_s=0.5):
        trash = root / storage.TRASH_DIR
        trash.mkdir(exist_ok=True, mode=0o700)
        for e in doomed:
            dest = trash / f"{e.path.name}.{time.time_ns()}"
            os.replace(e.path, dest)
            shutil.rmtree(dest, ignore_errors=True)
            print(f"removed {e.path.name}")
    return 0


def _report_target(target: str, folder: str | None) -> tuple[Path, str | None]:
    """A checkpoint dir as given, or the one a job's launcher record names (and the job)."""
    path = Path(target)
    if path.is_dir():
        return path, None
    from kempnerforge.launch.slurm.report import find_record, scontrol_job

    record = find_record(target, scontrol_job(target), folder)
    if record is None:
        raise CliError(
            f"{target}: not a directory, and no launcher record of a job {target} under "
            "./runs/*/(slurm|local)/ (pass --folder)"
        )
    ckpt = record.get("checkpoint_dir")
    if not ckpt:
        raise CliError(
            f"job {target}: its record names no checkpoint dir (launched without "
            "--checkpoint-dir or a training config): give the checkpoint dir instead"
        )
    return Path(ckpt), target


def cmd_report(args: argparse.Namespace) -> int:
    from kempnerforge import goodput, ledger

    root, job_id = _report_target(args.target, args.folder)
    if not Path(ledger.path(root)).is_file():
        raise CliError(
            f"{root}: no run ledger ({ledger.EVENTS_FILE}); it is written by the checkpoint "
            "manager and the launcher as a job runs"
        )
    rep = goodput.report(root, job_id=job_id)
    if job_id is not None and not rep["runs"]:
        rep = goodput.report(root)  # no run of the ledger names this job: the whole ledger
    print(json.dumps(rep, indent=1) if args.json else goodput.text(rep))
    if args.plot:
        try:
            goodput.plot(rep, args.plot)
        except RuntimeError as e:
            raise CliError(str(e)) from None
        if not args.json:
            print(f"timeline: {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kempnerforge", description="KempnerForge tools")
    sub = p.add_subparsers(dest="group", required=True)
    ck = sub.add_parser("ckpt", help="inspect and manage checkpoints")
    cs = ck.add_subparsers(dest="cmd", required=True)

    s = cs.add_parser("ls", help="list checkpoints in a checkpoint directory")
    s.add_argument("dir")
    s.set_defaults(func=cmd_ls)

    s = cs.add_parser("inspect", help="metadata, keys, shapes, dtypes of one checkpoint")
    s.add_argument("path", help="a step_N directory, or a checkpoint dir (its latest)")
    s.add_argument("--all", action="store_true", help="show optimizer and other keys too")
    s.set_defaults(func=cmd_inspect)

    s = cs.add_parser("verify", help="check completeness and checksums; exit 1 on a problem")
    s.add_argument("path", help="a step_N directory, or a checkpoint dir (every step in it)")
    s.add_argument("--quick", action="store_true", help="sizes only, skip checksums")
    s.set_defaults(func=cmd_verify)

    s = cs.add_parser("export", help="write full (unsharded) model weights to one file")
    s.add_argument("path", help="a step_N directory, or a checkpoint dir (its latest)")
    s.add_argument("--to", required=True, help="out.safetensors or out.pt")
    s.add_argument("--key", default="model", help="what to export: model (default) or states.NAME")
    s.add_argument("--force", action="store_true", help="overwrite --to if it exists")
    s.add_argument("--no-verify", action="store_true", help="skip checksum verification first")
    s.set_defaults(func=cmd_export)

    s = cs.add_parser("prune", help="keep the newest N committed checkpoints (never latest's)")
    s.add_argument("dir")
    s.add_argument("--keep", type=int, required=True)
    s.add_argument("--incomplete", action="store_true", help="also remove interrupted saves")
    s.add_argument(
        "--corrupt", action="store_true", help="also remove committed steps that fail checks"
    )
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("report", help="goodput: where a job's wall-clock time went")
    s.add_argument("target", help="a checkpoint dir, or a job id (its launcher record names one)")
    s.add_argument("--json", action="store_true", help="the whole report as JSON")
    s.add_argument("--plot", metavar="FILE", help="also draw a timeline PNG (needs matplotlib)")
    s.add_argument("--folder", help="where the job's launcher records are (as for --status)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from kempnerforge.checkpoint.lock import CheckpointDirLockedError

        if isinstance(e, CheckpointDirLockedError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
