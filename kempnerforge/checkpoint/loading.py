"""Choosing what to load, agreeing on it across ranks, and loading it.

Rank 0 resolves which checkpoint resumes (``resolve``) and every rank gets its answer. Before any
state moves, the ranks agree that the load can proceed: each reports the files it cannot see,
rank 0 compares keys and shapes through the restricted unpickler, and one verdict comes back to
all, so every rank raises the same error instead of some entering the collective load while
others do not (a hang). Then DCP loads the model, the optimizer and the handed-over states'
tensors, and the train state restores the RNG, the scheduler and the states' plain values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.assemble import canonical_name
from kempnerforge.checkpoint.async_save import AsyncCheckpointer
from kempnerforge.checkpoint.config import CheckpointConfig
from kempnerforge.checkpoint.control import ControlGroup
from kempnerforge.checkpoint.guards import check_compatible, check_dir_safety, explain_dcp_failure
from kempnerforge.checkpoint.reader import CheckpointReader
from kempnerforge.checkpoint.resolve import Resolution, find_resumable, resolve_explicit
from kempnerforge.checkpoint.safe_unpickle import SafeLoadPlanner, load_dcp_metadata
from kempnerforge.checkpoint.state import read_train_state, reseed_rng, restore_train_state
from kempnerforge.checkpoint.stateful import PREFIX as STATES_PREFIX
from kempnerforge.checkpoint.stateful import is_loader, join
from kempnerforge.freeze import all_trainable
from kempnerforge.log import progress

logger = logging.getLogger(__name__)

LOADABLE_KEYS = ("model", "optimizer")


@dataclass
class Loaded:
    """What a load restored, and the loader positions still to apply once loaders exist."""

    step: int = 0
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    loader_state: Any = None  # ``dataloader=``'s saved position
    loader_generator: torch.Tensor | None = None
    state_loaders: dict[str, dict[str, Any]] = field(default_factory=dict)  # states' loaders


class CheckpointLoader:
    """The load side of one manager (same objects, same control group)."""

    def __init__(
        self,
        *,
        config: CheckpointConfig,
        root: Path,
        model: torch.nn.Module,
        optimizer: Any | None,
        states: Mapping[str, Any],
        control: ControlGroup,
        checkpointer: AsyncCheckpointer,
        process_group: Any | None,
        pp_rank: int | None,
    ) -> None:
        self.config = config
        self.root = root
        self.model = model
        self.optimizer = optimizer
        self.states = states
        self.control = control
        self.checkpointer = checkpointer
        self.process_group = process_group
        self.pp_rank = pp_rank
        self._peeked: tuple[Any, Resolution] | None = None

    def forget_peek(self) -> None:
        """A save happened: the next load resolves afresh."""
        self._peeked = None

    # ------------------------------------------------------------------ what to load
    def _resolve(self, path: str | None, require_dcp: bool) -> Resolution:
        """Rank 0's view of what to load: explicit path > own dir's checkpoint > load_path."""
        verify = self.config.verify_on_load
        if path is not None:
            res = resolve_explicit(path, verify, require_dcp)
            res.source = "explicit"
        else:
            res = (
                find_resumable(self.root, verify, require_dcp)
                if self.root.is_dir()
                else Resolution()
            )
            res.source = "own"
            if res.error is not None and res.corrupt:
                res = self._all_corrupt(res)
            elif res.path is None and self.config.load_path:
                warnings = res.warnings
                res = resolve_explicit(self.config.load_path, verify, require_dcp)
                res.source = "load_path"
                res.warnings = warnings + res.warnings
            elif res.path is None:
                res.source = "none"
        if res.path is not None and Path(res.path).resolve().parent == self.root.resolve():
            res.source = "own"
        return res

    def _all_corrupt(self, res: Resolution) -> Resolution:
        if self.config.on_all_corrupt != "start_fresh":
            return res
        logger.error(
            "CHECKPOINT RESUME SKIPPED: %s; checkpoint.on_all_corrupt=start_fresh, so this run "
            "TRAINS FROM STEP 0 beside them (they are kept and never pruned)",
            res.error,
        )
        return Resolution(source="none", warnings=res.warnings)

    def resolve_agreed(
        self, path: str | None, use_peeked: bool = False, require_dcp: bool = True
    ) -> Resolution:
        """Rank 0 resolves, every rank gets the same answer (no stale per-rank FS views).

        ``load`` passes ``use_peeked``: it then loads exactly what the preceding ``peek``
        (same path argument, no save in between) reported.
        """
        key = (None if path is None else str(path), require_dcp)
        if use_peeked and self._peeked is not None and self._peeked[0] == key:
            res = self._peeked[1]
        else:
            self.checkpointer.join()  # the group must be idle; a failure stays for save()/wait()
            res = None
            if self.control.rank == 0:
                try:
                    res = self._resolve(path, require_dcp)
                except Exception as e:  # a filesystem error must not leave other ranks hanging
                    res = Resolution(error=f"resolving the checkpoint to load failed: {e!r}")
                for w in res.warnings:
                    logger.warning("checkpoint resume: %s", w)
            res = self.control.bcast(res)
        self._peeked = (key, res)
        return res

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: str | None,
        scheduler: Any | None,
        excluded: set[str],
        vlm_freeze_expected: list[dict[str, Any]] | None,
    ) -> Loaded:
        unknown = excluded - set(LOADABLE_KEYS)
        if unknown:
            raise ValueError(
                f"exclude_keys {sorted(unknown)} unknown; use any of {list(LOADABLE_KEYS)}"
            )
        need_dcp = not {"model", "optimizer"} <= excluded
        res = self.resolve_agreed(path, use_peeked=True, require_dcp=need_dcp)
        self._peeked = None
        if res.error is not None:
            raise FileNotFoundError(res.error)
        if res.path is None or res.meta is None:
            progress("no checkpoint under %s: starting fresh at step 0", self.root)
            return Loaded()
        step_dir, meta = Path(res.path), res.meta

        self._check_freeze(step_dir, meta, vlm_freeze_expected)
        if res.source != "own":
            excluded = excluded | set(self.config.exclude_from_loading)

        rank, world = self.control.rank, self.control.world_size
        dcp_dir = storage.dcp_dir(step_dir, self.pp_rank)
        sd: dict[str, Any] = {}
        if "model" not in excluded:
            sd["model"] = get_model_state_dict(self.model)
        if "optimizer" not in excluded and self.optimizer is not None:
            with all_trainable(self.model):
                sd["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        saved_ws = int(meta.get("world_size", world))
        same_world = saved_ws == world
        ts_file = storage.train_state_file(step_dir, rank if same_world else 0, saved_ws)
        md = self._agree_loadable(step_dir, dcp_dir, ts_file, sd, meta)
        targets = self._state_targets(md, dcp_dir) if md is not None else {}
        if targets:
            sd[STATES_PREFIX] = targets
        if sd:
            self.checkpointer.wait_staged()  # a save's copy must not read half-loaded tensors
            try:
                dcp.load(
                    sd,
                    checkpoint_id=str(dcp_dir),
                    storage_reader=CheckpointReader(str(dcp_dir)),
                    planner=SafeLoadPlanner(),
                    process_group=self.process_group,
                    no_dist=not self.control.distributed,
                )
            except CheckpointException as e:  # a BaseException: name the real cause
                raise explain_dcp_failure(e, dcp_dir) from e
            if "model" in sd:
                set_model_state_dict(self.model, sd["model"])
            if "optimizer" in sd:
                # parameters that never stepped have no state to restore (see
                # _drop_state_never_saved): the shapes and keys were checked above
                with all_trainable(self.model):
                    set_optimizer_state_dict(
                        self.model,
                        self.optimizer,
                        sd["optimizer"],
                        options=StateDictOptions(strict=False),
                    )

        state = read_train_state(step_dir, rank if same_world else 0)
        if not same_world:
            seed = reseed_rng(state.pop("rng", None), rank)
            logger.warning(
                "checkpoint %s was saved with %d ranks, loading with %d: rank %d RNG re-seeded "
                "deterministically (seed %d) instead of restored",
                step_dir,
                saved_ws,
                world,
                rank,
                seed,
            )
        out = Loaded(path=step_dir)
        out.loader_state = state.pop("dataloader", None)
        out.loader_generator = state.pop("dataloader_generator", None)
        out.state_loaders = self._restore_states(state.pop("states", None) or {}, targets)
        out.step, out.tokens_seen, out.extra = restore_train_state(state, scheduler, None)
        progress(
            "resumed from step %d (%s, tokens %d%s)",
            out.step,
            step_dir,
            out.tokens_seen,
            f", excluded {sorted(excluded)}" if excluded else "",
        )
        return out

    def _state_targets(self, md: Any, dcp_dir: Path) -> dict[str, dict[str, Any]]:
        """Where each handed-over state's saved tensors load into: the tensor its
        ``state_dict()`` holds now under that key (placement kept), else a new one."""
        from kempnerforge.checkpoint.stateful import capture

        saved: dict[str, dict[str, Any]] = {}
        for key, entry in md.state_dict_metadata.items():
            parts = key.split(".", 2)
            if len(parts) == 3 and parts[0] == STATES_PREFIX and parts[1] in self.states:
                saved.setdefault(parts[1], {})[parts[2]] = entry
        stateful = {n: o for n, o in self.states.items() if n in saved and not is_loader(o)}
        now = capture(stateful).tensors
        targets: dict[str, dict[str, Any]] = {}
        for name, entries in saved.items():
            if name not in stateful:
                continue
            dest: dict[str, Any] = {}
            for key, entry in entries.items():
                if not isinstance(entry, TensorStorageMetadata):
                    continue
                have = now.get(name, {}).get(key)
                shape = tuple(entry.size)
                if have is not None and tuple(have.shape) != shape:
                    raise ValueError(
                        f"checkpoint {dcp_dir}: states[{name!r}] entry {key!r} was saved with "
                        f"shape {shape}, the object now holds {tuple(have.shape)}; hand over an "
                        "object of the saved shape, or start this state afresh under a new name"
                    )
                dest[key] = (
                    have if have is not None else torch.empty(shape, dtype=entry.properties.dtype)
                )
            targets[name] = dest
        return targets

    def _restore_states(
        self, saved: dict[str, Any], tensors: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """``load_state_dict`` on each handed-over state; loaders' entries come back to be
        applied with the first-iter guard."""
        loaders: dict[str, dict[str, Any]] = {}
        for name, obj in self.states.items():
            entry = saved.get(name)
            if entry is None:
                logger.warning(
                    "checkpoint: states[%r] is not in this checkpoint (handed over after it was "
                    "saved?); it keeps its current state",
                    name,
                )
                continue
            if entry.get("kind") == "loader":
                loaders[name] = entry
                continue
            obj.load_state_dict(join(entry["skeleton"], tensors.get(name, {})))
        return loaders

    def _agree_loadable(
        self,
        step_dir: Path,
        dcp_dir: Path,
        ts_file: Path,
        sd: dict[str, Any],
        meta: dict[str, Any],
    ) -> Any | None:
        """Every rank agrees the load can proceed (see the module docstring); returns the DCP
        metadata (None for a checkpoint without one, loaded with nothing from DCP)."""
        rank = self.control.rank
        need_md = bool(sd) or bool(self.states)
        has_md = (dcp_dir / storage.DCP_METADATA_FILE).is_file()
        mine: list[str] = []
        if not ts_file.is_file():
            mine.append(str(ts_file))
        if sd and not has_md:
            mine.append(str(dcp_dir / storage.DCP_METADATA_FILE))
        views = self.control.gather((rank, mine))
        problem: BaseException | None = None
        md = None
        if rank == 0:
            assert views is not None
            missing = [(r, f) for r, files in views for f in files]
            if missing:
                seen = "; ".join(f"rank {r} cannot see {f}" for r, f in missing)
                problem = FileNotFoundError(
                    f"checkpoint {step_dir} is incomplete for this job: {seen}. If the file is "
                    "there on other nodes, the shared filesystem is not consistent yet (wait "
                    "and rerun); otherwise load another step or delete this one."
                )
            else:
                try:
                    check_dir_safety(step_dir.parent, for_write=False)
                    if need_md and has_md:
                        md = load_dcp_metadata(dcp_dir)
                    if sd:
                        self._drop_state_never_saved(sd, md, meta)
                        check_compatible(dcp_dir, sd, md)
                except Exception as e:
                    problem = e
        problem = self.control.bcast(problem)
        if problem is not None:
            raise problem
        if rank != 0 and need_md and has_md:
            md = load_dcp_metadata(dcp_dir)
            if sd:
                self._drop_state_never_saved(sd, md, meta)
        return md

    def _drop_state_never_saved(self, sd: dict[str, Any], md: Any, meta: dict[str, Any]) -> None:
        """Leave out optimizer state the checkpoint records as never created.

        A parameter that never got a gradient (unused so far, or frozen from the start) has no
        optimizer state in the checkpoint and must have none after the resume; the save recorded
        which ones (``optimizer_without_state``). A frozen one stays stateless only while it is
        still frozen. Anything else missing stays in, and the compatibility check names it.
        """
        optim = sd.get("optimizer")
        if optim is None:
            return
        if isinstance(md.state_dict_metadata.get("optimizer"), BytesStorageMetadata):
            sd["optimizer"] = b""  # one opaque entry (an older DCP writer): loaded whole
            return
        if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict):
            return
        record = meta.get("optimizer_without_state") or {}
        frozen_now = {
            canonical_name(n) for n, p in self.model.named_parameters() if not p.requires_grad
        }
        allowed = set(record.get("never_stepped", [])) | (
            set(record.get("frozen", [])) & frozen_now
        )
        for name in list(optim["state"]):
            if name in allowed and not any(
                k.startswith(f"optimizer.state.{name}.") for k in md.state_dict_metadata
            ):
                del optim["state"][name]

    def _check_freeze(
        self, step_dir: Path, meta: dict[str, Any], expected: list[dict[str, Any]] | None
    ) -> None:
        """Compare the freeze list saved with the checkpoint and the one this run expects.

        Only modules both lists name are compared (a module one architecture has and the other
        lacks cannot disagree); the message lists the ones left out on each side.
        """
        saved = meta.get("vlm_freeze")
        if saved is None or expected is None:
            return
        s = {e["module"]: bool(e["frozen"]) for e in saved}
        x = {e["module"]: bool(e["frozen"]) for e in expected}
        shared = sorted(s.keys() & x.keys())
        if all(s[m] == x[m] for m in shared):
            return
        saved_only, current_only = sorted(s.keys() - x.keys()), sorted(x.keys() - s.keys())
        msg = (
            f"VLM freeze mismatch at {step_dir}: "
            f"saved={[{'module': m, 'frozen': s[m]} for m in shared]}, "
            f"current={[{'module': m, 'frozen': x[m]} for m in shared]}"
        )
        if saved_only or current_only:
            msg += (
                f" (cross-arch keys ignored: saved-only={saved_only}, current-only={current_only})"
            )
        if self.config.ignore_freeze_mismatch:
            logger.warning("%s; proceeding because checkpoint.ignore_freeze_mismatch=true", msg)
            return
        raise ValueError(msg + " (set checkpoint.ignore_freeze_mismatch=true to override)")
