"""The original KempnerForge's ``tests/unit/test_checkpoint.py``, ported to this API.

Source: KempnerInstitute/KempnerForge, the newest stored version of that file (the one with the
never-stepped-parameter and component-swap tests). One test here per test there, same intent and
assertions, except where the original reached into internals that do not exist here:

* The original built checkpoints by hand (``torch.save`` of ``train_state.pt`` next to a
  ``metadata.json``, DCP mocked). Here such checkpoints are written in the original's on-disk
  layout by ``helpers.original_format.write_original_checkpoint`` (real DCP shards, since ``dcp.load`` is
  not mocked): these tests say how a checkpoint of the original must resume.
* ``_make_mock_mgr`` mocked ``mgr._async_ckpt.save`` and ``dcp.load``; here saves are real
  (a 4x4 Linear), and ``_async_ckpt`` is ``checkpointer`` (public here).
* ``AsyncCheckpointer``: the original wrapped ``dcp.async_save`` and a future; ours runs
  ``dcp.save`` in its own background thread. The mocks follow that (``dcp.save`` is mocked and
  gated); the public names (``is_pending``) are the original's.
* ``_cleanup`` / ``_pending_finalize`` / ``_newest_complete_checkpoint`` /
  ``_resolve_dcp_load_dir`` / ``_sync_group`` / ``_sync_barrier`` / ``_intersect_freeze_meta_by_module``
  do not exist here: each such test checks the same property through ``save``/``load``/``peek``.
* Dropped (one line each): ``test_cleanup_protects_dynamic_milestones`` (``dyn_ckpt_window`` is
  not part of this config); ``test_save_runs_barrier_when_distributed`` (which collective fences
  a save is internal; the distributed port checks that no rank returns early);
  ``test_the_save_records_the_parameters_held_without_state``,
  ``test_only_recorded_parameters_count_as_never_stepped``,
  ``test_only_parameters_the_saved_optimizer_held_stay_stateless`` and the
  ``record_contradicts_saved_state`` case (unit tests of the original's private
  ``optimizer_never_stepped`` record format).
* Where the original matched DCP's own sentence ("Missing key in checkpoint state_dict: ...")
  the match is on the key it names; the exception types are the original's.
* Retention leaves ``.trash``/``.lock`` in the checkpoint dir here: listings look at ``step_*``.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _compat_common import (
    captured_logs,
    freeze_meta,
    lazy_adamw,
    messages,
    saved_train_state,
    tiny_gpt,
    train_steps,
)
from helpers.optim import adam_moments
from helpers.original_format import original_rng_state, point_latest, write_original_checkpoint
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from kempnerforge.checkpoint import (
    AsyncCheckpointer,
    CheckpointManager,
    build_train_state,
    get_rng_state,
    restore_train_state,
    set_rng_state,
)
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig

# DCP warns on each single-process save/load; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# ---------------------------------------------------------------------------
# RNG state capture/restore
# ---------------------------------------------------------------------------


class TestRNGState:
    def test_round_trip(self):
        torch.manual_seed(42)
        random.seed(42)
        np.random.seed(42)
        state = get_rng_state()
        a_torch, a_python, a_numpy = torch.randn(5), random.random(), np.random.randn(5)
        set_rng_state(state)
        b_torch, b_python, b_numpy = torch.randn(5), random.random(), np.random.randn(5)
        assert torch.equal(a_torch, b_torch)
        assert a_python == b_python
        np.testing.assert_array_equal(a_numpy, b_numpy)

    def test_contains_expected_keys(self):
        state = get_rng_state()
        assert "python" in state
        assert "numpy" in state
        assert "torch_cpu" in state


# ---------------------------------------------------------------------------
# Training state assembly
# ---------------------------------------------------------------------------


def _step_lr(gamma: float = 0.1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=gamma)


class TestBuildTrainState:
    def test_basic_fields(self):
        state = build_train_state(step=100, tokens_seen=50000)
        assert state["step"] == 100
        assert state["tokens_seen"] == 50000
        assert "rng" in state

    def test_with_scheduler(self):
        opt, sched = _step_lr()
        for _ in range(5):
            opt.step()
            sched.step()
        state = build_train_state(step=5, tokens_seen=0, scheduler=sched)
        assert "scheduler" in state
        assert state["scheduler"]["_step_count"] == 6  # 5 steps + the initial one

    def test_with_extra(self):
        state = build_train_state(step=0, tokens_seen=0, extra={"best_loss": 2.5})
        assert state["best_loss"] == 2.5

    def test_without_optional_fields(self):
        state = build_train_state(step=0, tokens_seen=0)
        assert "scheduler" not in state
        assert "dataloader" not in state


class TestRestoreTrainState:
    def test_restores_step_and_tokens(self):
        step, tokens, extra = restore_train_state({"step": 42, "tokens_seen": 99999})
        assert (step, tokens, extra) == (42, 99999, {})

    def test_restores_scheduler(self):
        opt, sched = _step_lr(gamma=0.5)
        for _ in range(15):
            opt.step()
            sched.step()
        saved = sched.state_dict()
        _, sched2 = _step_lr(gamma=0.5)
        restore_train_state({"step": 15, "tokens_seen": 0, "scheduler": saved}, scheduler=sched2)
        assert sched2.state_dict()["last_epoch"] == saved["last_epoch"]
        assert sched2.state_dict()["_last_lr"] == saved["_last_lr"]

    def test_restores_rng(self):
        torch.manual_seed(0)
        state = build_train_state(step=0, tokens_seen=0)
        _ = torch.randn(100)
        restore_train_state(state)
        a = torch.randn(5)
        restore_train_state(state)
        b = torch.randn(5)
        assert torch.equal(a, b)

    def test_defaults_for_missing_keys(self):
        assert restore_train_state({}) == (0, 0, {})

    def test_extra_keys_roundtrip(self):
        state = build_train_state(step=5, tokens_seen=100, extra={"wandb_run_id": "abc123"})
        assert state["wandb_run_id"] == "abc123"
        step, tokens, extra = restore_train_state(state)
        assert (step, tokens) == (5, 100)
        assert extra["wandb_run_id"] == "abc123"


# ---------------------------------------------------------------------------
# Checkpoint retention
# ---------------------------------------------------------------------------


def _linear_mgr(tmp_path: Path, **cfg: object) -> CheckpointManager:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return CheckpointManager(CheckpointConfig(dir=str(tmp_path), **cfg), model, opt)


def _step_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))


class TestCheckpointRetention:
    def test_cleanup_old_checkpoints(self, tmp_path):
        """Only the last keep_last_n checkpoints survive (here: real saves, not bare dirs)."""
        mgr = _linear_mgr(tmp_path, keep_last_n=2)
        for s in (10, 20, 30, 40):
            mgr.save(step=s)
        mgr.close()
        assert _step_dirs(tmp_path) == ["step_30", "step_40"]

    def test_cleanup_preserves_when_under_limit(self, tmp_path):
        mgr = _linear_mgr(tmp_path, keep_last_n=5)
        for s in (10, 20):
            mgr.save(step=s)
        mgr.close()
        assert _step_dirs(tmp_path) == ["step_10", "step_20"]


# ---------------------------------------------------------------------------
# AsyncCheckpointer
# ---------------------------------------------------------------------------


class _GatedSave:
    """Stands in for ``dcp.save``: records each call (thread, checkpoint) and blocks until let go."""

    def __init__(self, blocking: bool = True) -> None:
        self.calls: list[tuple[str, str]] = []
        self.done: list[str] = []
        self.release = threading.Semaphore(0)
        self.blocking = blocking

    def __call__(self, state_dict, *args, **kwargs) -> None:
        writer = kwargs.get("storage_writer")
        where = str(getattr(writer, "path", kwargs.get("checkpoint_id", "")))
        self.calls.append((threading.current_thread().name, where))
        if self.blocking:
            assert self.release.acquire(timeout=10), "test never released the save"
        self.done.append(where)


def _held_async_save(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[_GatedSave, AsyncCheckpointer]:
    """An async checkpointer with one save (``step_1``) started and held in ``dcp.save``."""
    gated = _GatedSave()
    monkeypatch.setattr("kempnerforge.checkpoint.async_save.dcp.save", gated)
    ckpt = AsyncCheckpointer(mode=AsyncCheckpointMode.async_)
    ckpt.save({"model": {}}, checkpoint_id=str(tmp_path / "step_1"))
    return gated, ckpt


class TestAsyncCheckpointer:
    def test_default_mode_is_disabled(self):
        assert AsyncCheckpointer().mode == AsyncCheckpointMode.disabled

    def test_is_pending_initially_false(self):
        assert not AsyncCheckpointer().is_pending

    def test_wait_with_no_pending_is_noop(self):
        AsyncCheckpointer().wait()

    def test_disabled_mode_calls_dcp_save(self, monkeypatch, tmp_path):
        mock_save = MagicMock()
        monkeypatch.setattr("kempnerforge.checkpoint.async_save.dcp.save", mock_save)
        ckpt = AsyncCheckpointer(mode=AsyncCheckpointMode.disabled)
        ckpt.save({"model": {}}, checkpoint_id=str(tmp_path / "step_1"))
        mock_save.assert_called_once()
        assert not ckpt.is_pending

    def test_async_mode_calls_async_save(self, monkeypatch, tmp_path):
        """Async mode writes off the caller's thread (ours: its own thread, not dcp.async_save)."""
        gated, ckpt = _held_async_save(monkeypatch, tmp_path)
        try:
            assert ckpt.is_pending
        finally:
            gated.release.release()
            ckpt.close()
        assert len(gated.calls) == 1
        assert gated.calls[0][0] != threading.current_thread().name

    def test_wait_resolves_pending_future(self, monkeypatch, tmp_path):
        gated, ckpt = _held_async_save(monkeypatch, tmp_path)
        try:
            assert ckpt.is_pending
            gated.release.release()
            ckpt.wait()
            assert len(gated.done) == 1
            assert not ckpt.is_pending
        finally:
            gated.release.release()  # let a save still held go (harmless if none is)
            ckpt.close()

    def test_save_waits_for_previous(self, monkeypatch, tmp_path):
        gated, ckpt = _held_async_save(monkeypatch, tmp_path)
        gated.release.release()  # the first may finish; the second save must wait for it
        ckpt.save({"model": {}}, checkpoint_id=str(tmp_path / "step_2"))
        try:
            assert len(gated.done) == 1, "second save started before the first one finished"
        finally:
            gated.release.release()
            ckpt.close()
        assert len(gated.done) == 2


# ---------------------------------------------------------------------------
# Dataloader state persistence (two-phase apply)
# ---------------------------------------------------------------------------


def _mgr(tmp_path: Path, *, ignore_freeze_mismatch: bool = False) -> CheckpointManager:
    return _linear_mgr(tmp_path, keep_last_n=5, ignore_freeze_mismatch=ignore_freeze_mismatch)


def _hand_written(
    mgr: CheckpointManager, root: Path, step: int, train_state: dict, **kw: object
) -> Path:
    """A checkpoint laid out as the original wrote it, with this manager's model/optimizer."""
    return write_original_checkpoint(
        root, step, mgr.model, mgr.optimizer, train_state=train_state, latest=None, **kw
    )


class TestDataloaderStatePersistence:
    def test_apply_no_op_when_nothing_pending(self, tmp_path):
        mgr = _mgr(tmp_path)
        loader = MagicMock(spec=["load_state_dict"])
        mgr.apply_dataloader_state(loader)
        loader.load_state_dict.assert_not_called()

    def test_apply_restores_state_to_stateful_loader(self, tmp_path):
        mgr = _mgr(tmp_path)
        stashed = {"epoch": 3, "batches_yielded": 100, "sampler": {"epoch": 3, "skip_samples": 0}}
        mgr._pending_dataloader_state = stashed
        loader = MagicMock(spec=["load_state_dict"])
        mgr.apply_dataloader_state(loader)
        loader.load_state_dict.assert_called_once_with(stashed)
        assert mgr._pending_dataloader_state is None

    def test_apply_clears_state_for_non_stateful_loader(self, tmp_path):
        mgr = _mgr(tmp_path)
        mgr._pending_dataloader_state = {"epoch": 1}

        class PlainLoader:
            pass

        mgr.apply_dataloader_state(PlainLoader())
        assert mgr._pending_dataloader_state is None

    def test_apply_clears_state_for_none_loader(self, tmp_path):
        mgr = _mgr(tmp_path)
        mgr._pending_dataloader_state = {"epoch": 1}
        mgr.apply_dataloader_state(None)
        assert mgr._pending_dataloader_state is None

    def test_save_persists_dataloader_state(self, tmp_path):
        mgr = _mgr(tmp_path)

        class Loader:
            def state_dict(self):
                return {"epoch": 4, "batches_yielded": 200}

        mgr.save(step=1, tokens_seen=64, dataloader=Loader())
        saved = saved_train_state(tmp_path / "step_1")
        assert saved["dataloader"] == {"epoch": 4, "batches_yielded": 200}

    def test_load_stashes_dataloader_state_when_no_loader_provided(self, tmp_path):
        mgr = _mgr(tmp_path)
        saved_state = {"epoch": 2, "batches_yielded": 50}
        ts = {"step": 1, "tokens_seen": 64, "rng": original_rng_state(), "dataloader": saved_state}
        ckpt_dir = _hand_written(mgr, tmp_path, 1, ts)
        step, tokens, _ = mgr.load(path=str(ckpt_dir))
        assert (step, tokens) == (1, 64)
        assert mgr._pending_dataloader_state == saved_state

    def test_load_restores_directly_when_loader_provided(self, tmp_path):
        mgr = _mgr(tmp_path)
        saved_state = {"epoch": 2, "batches_yielded": 50}
        ts = {"step": 1, "tokens_seen": 64, "rng": original_rng_state(), "dataloader": saved_state}
        ckpt_dir = _hand_written(mgr, tmp_path, 1, ts)
        loader = MagicMock(spec=["load_state_dict"])
        mgr.load(path=str(ckpt_dir), dataloader=loader)
        loader.load_state_dict.assert_called_once_with(saved_state)
        assert mgr._pending_dataloader_state is None

    def test_load_no_stash_when_no_dataloader_key(self, tmp_path):
        mgr = _mgr(tmp_path)
        ts = {"step": 1, "tokens_seen": 64, "rng": original_rng_state()}
        ckpt_dir = _hand_written(mgr, tmp_path, 1, ts)
        mgr.load(path=str(ckpt_dir))
        assert mgr._pending_dataloader_state is None

    def test_round_trip_save_load_apply(self, tmp_path):
        captured: dict[str, dict] = {}

        class RecorderLoader:
            def __init__(self, initial: dict) -> None:
                self._state = initial

            def state_dict(self) -> dict:
                return self._state

            def load_state_dict(self, state: dict) -> None:
                captured["restored"] = state

        mgr = _mgr(tmp_path)
        mgr.save(
            step=5, tokens_seen=128, dataloader=RecorderLoader({"epoch": 7, "batches_yielded": 333})
        )
        mgr2 = _mgr(tmp_path)
        step, tokens, _ = mgr2.load(path=str(tmp_path / "step_5"))
        assert (step, tokens) == (5, 128)
        assert mgr2._pending_dataloader_state == {"epoch": 7, "batches_yielded": 333}
        mgr2.apply_dataloader_state(RecorderLoader({"epoch": 0, "batches_yielded": 0}))
        assert captured["restored"] == {"epoch": 7, "batches_yielded": 333}
        assert mgr2._pending_dataloader_state is None


# ---------------------------------------------------------------------------
# VLM freeze metadata: the cross-arch intersection, save side, load side
# ---------------------------------------------------------------------------


def _save_then_load(tmp_path, saved, expected, **mgr_kw):
    _mgr(tmp_path).save(step=1, extra={"vlm_freeze": saved})
    return _mgr(tmp_path, **mgr_kw).load(
        path=str(tmp_path / "step_1"), vlm_freeze_expected=expected
    )


class TestIntersectFreezeMetaByModule:
    """The original unit-tested ``_intersect_freeze_meta_by_module``; here the same rule is
    checked through ``load(vlm_freeze_expected=...)``: only modules both lists name compare."""

    def test_disjoint_keys_filter_to_empty(self, tmp_path):
        saved = [{"module": "a", "frozen": True}]
        expected = [{"module": "b", "frozen": False}]
        assert _save_then_load(tmp_path, saved, expected)[0] == 1

    def test_shared_key_passes_through(self, tmp_path):
        both = [{"module": "vision_encoder", "frozen": True}]
        assert _save_then_load(tmp_path, both, both)[0] == 1

    def test_drops_one_sided_keys(self, tmp_path):
        saved = [
            {"module": "future_arch", "frozen": False},
            {"module": "vision_encoder", "frozen": True},
        ]
        expected = [
            {"module": "another_arch", "frozen": True},
            {"module": "vision_encoder", "frozen": True},
        ]
        assert _save_then_load(tmp_path, saved, expected)[0] == 1

    def test_preserves_canonical_order(self, tmp_path):
        """The saved list keeps its (canonical) order in metadata.json."""
        saved = [{"module": "a", "frozen": True}, {"module": "c", "frozen": False}]
        _mgr(tmp_path).save(step=1, extra={"vlm_freeze": saved})
        meta = json.loads((tmp_path / "step_1" / "metadata.json").read_text())
        assert [m["module"] for m in meta["vlm_freeze"]] == ["a", "c"]


class TestPeekSavedStep:
    def test_returns_none_when_no_checkpoint(self, tmp_path):
        assert _mgr(tmp_path).peek_saved_step() is None

    def test_returns_step_from_metadata(self, tmp_path):
        mgr = _mgr(tmp_path)
        mgr.save(step=42, tokens_seen=128)
        assert mgr.peek_saved_step(path=str(tmp_path / "step_42")) == 42

    def test_returns_none_when_metadata_missing(self, tmp_path):
        mgr = _mgr(tmp_path)
        (tmp_path / "step_3").mkdir()
        assert mgr.peek_saved_step(path=str(tmp_path / "step_3")) is None

    def test_returns_none_when_metadata_unreadable(self, tmp_path):
        mgr = _mgr(tmp_path)
        ckpt_dir = _hand_written(mgr, tmp_path, 3, {"step": 3, "tokens_seen": 0, "rng": {}})
        (ckpt_dir / "metadata.json").write_text("{ not valid json")
        assert mgr.peek_saved_step(path=str(ckpt_dir)) is None
        (ckpt_dir / "metadata.json").write_text(json.dumps({"step": 7}))
        assert mgr.peek_saved_step(path=str(ckpt_dir)) == 7

    def test_returns_none_when_step_field_absent(self, tmp_path):
        mgr = _mgr(tmp_path)
        ckpt_dir = _hand_written(mgr, tmp_path, 3, {"step": 3, "tokens_seen": 0, "rng": {}})
        (ckpt_dir / "metadata.json").write_text(json.dumps({"tokens_seen": 1024}))
        assert mgr.peek_saved_step(path=str(ckpt_dir)) is None


class TestFlushPendingSave:
    def test_delegates_to_async_wait(self, tmp_path, monkeypatch):
        mgr = _mgr(tmp_path)
        wait_mock = MagicMock()
        monkeypatch.setattr(mgr.checkpointer, "wait", wait_mock)
        mgr.flush_pending_save()
        wait_mock.assert_called_once()


class TestSaveVLMFreezeMetadata:
    def test_save_writes_vlm_freeze_to_metadata(self, tmp_path):
        freeze = freeze_meta(("vision_encoder", True), ("adapter", False))
        _mgr(tmp_path).save(step=1, extra={"vlm_freeze": freeze})
        meta = json.loads((tmp_path / "step_1" / "metadata.json").read_text())
        assert meta["vlm_freeze"] == freeze
        assert meta["step"] == 1

    def test_save_omits_vlm_freeze_when_extra_absent(self, tmp_path):
        _mgr(tmp_path).save(step=1)
        meta = json.loads((tmp_path / "step_1" / "metadata.json").read_text())
        assert "vlm_freeze" not in meta

    def test_save_omits_vlm_freeze_when_extra_lacks_key(self, tmp_path):
        _mgr(tmp_path).save(step=1, extra={"other": "thing"})
        meta = json.loads((tmp_path / "step_1" / "metadata.json").read_text())
        assert "vlm_freeze" not in meta


class TestLoadVLMFreezeCompare:
    def test_match_passes(self, tmp_path):
        freeze = freeze_meta(("vision_encoder", True))
        assert _save_then_load(tmp_path, freeze, freeze)[0] == 1

    def test_semantic_mismatch_raises(self, tmp_path):
        with pytest.raises(ValueError, match="VLM freeze mismatch"):
            _save_then_load(
                tmp_path,
                freeze_meta(("vision_encoder", True)),
                freeze_meta(("vision_encoder", False)),
            )

    def test_ignore_flag_demotes_to_warning(self, tmp_path):
        with captured_logs() as records:
            step, _, _ = _save_then_load(
                tmp_path,
                freeze_meta(("vision_encoder", True)),
                freeze_meta(("vision_encoder", False)),
                ignore_freeze_mismatch=True,
            )
        assert step == 1
        assert any("VLM freeze mismatch" in m for m in messages(records))

    def test_no_expected_skips_compare(self, tmp_path):
        _mgr(tmp_path).save(step=1, extra={"vlm_freeze": freeze_meta(("vision_encoder", True))})
        assert _mgr(tmp_path).load(path=str(tmp_path / "step_1"))[0] == 1

    def test_no_saved_skips_compare(self, tmp_path):
        _mgr(tmp_path).save(step=1)
        step, _, _ = _mgr(tmp_path).load(
            path=str(tmp_path / "step_1"), vlm_freeze_expected=freeze_meta(("vision_encoder", True))
        )
        assert step == 1

    def test_corrupt_metadata_logs_warning(self, tmp_path):
        """An original-layout checkpoint whose metadata.json is bad still loads (with a warning):
        the original read metadata.json only for the freeze check."""
        mgr = _mgr(tmp_path)
        ckpt_dir = _hand_written(
            mgr, tmp_path, 1, {"step": 1, "tokens_seen": 0, "rng": get_rng_state()}
        )
        (ckpt_dir / "metadata.json").write_text("not-json")
        with captured_logs() as records:
            step, _, _ = mgr.load(
                path=str(ckpt_dir), vlm_freeze_expected=freeze_meta(("vision_encoder", True))
            )
        assert step == 1
        assert any("Could not read" in m for m in messages(records))

    def test_cross_arch_extra_expected_key_drops_out(self, tmp_path):
        saved = freeze_meta(("vision_encoder", True))
        expected = freeze_meta(("future_arch", False), ("vision_encoder", True))
        assert _save_then_load(tmp_path, saved, expected)[0] == 1

    def test_cross_arch_extra_saved_key_drops_out(self, tmp_path):
        saved = freeze_meta(("future_arch", False), ("vision_encoder", True))
        expected = freeze_meta(("vision_encoder", True))
        assert _save_then_load(tmp_path, saved, expected)[0] == 1

    def test_cross_arch_error_message_lists_dropped(self, tmp_path):
        saved = freeze_meta(("future_arch", False), ("vision_encoder", True))
        with pytest.raises(ValueError) as exc_info:
            _save_then_load(tmp_path, saved, freeze_meta(("vision_encoder", False)))
        assert "cross-arch" in str(exc_info.value)
        assert "future_arch" in str(exc_info.value)


# ---------------------------------------------------------------------------
# Async-checkpoint `latest` safety
# ---------------------------------------------------------------------------


def _latest_target(root: Path) -> Path | None:
    latest = Path(root) / "latest"
    return latest.resolve() if latest.exists() else None


class _HeldFlushes:
    """Holds every background flush just after DCP wrote its shards (before the commit), until
    ``release()``: the window in which the original's bug let ``latest`` point at a half save."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kempnerforge.checkpoint.storage as storage

        self._sem = threading.Semaphore(0)
        real = storage.test_pause

        def pause(point: str, rank: int) -> None:
            if point == "dcp_written":
                assert self._sem.acquire(timeout=20), "flush never released"
            real(point, rank)

        monkeypatch.setattr(storage, "test_pause", pause)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()


class TestAsyncLatestSymlinkSafety:
    @staticmethod
    def _mgr(root: Path, mode: AsyncCheckpointMode) -> CheckpointManager:
        return _linear_mgr(root, keep_last_n=2, async_mode=mode)

    @staticmethod
    def _build_ckpt(mgr: CheckpointManager, root: Path, step: int, *, complete: bool) -> Path:
        """As the original's helper: train_state.pt + metadata.json (+ DCP .metadata if complete)."""
        return write_original_checkpoint(
            root,
            step,
            mgr.model,
            mgr.optimizer,
            train_state={"step": step, "tokens_seen": step * 100, "rng": {}},
            latest=None,
            dcp_complete=complete,
        )

    def test_async_save_defers_latest_until_flush_durable(self, tmp_path, monkeypatch):
        held = _HeldFlushes(monkeypatch)
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        mgr.save(step=10)
        assert _latest_target(tmp_path) is None, "latest advanced before the flush was durable"
        held.release()
        mgr.save(step=20)  # waits for step_10, which is then committed
        tgt = _latest_target(tmp_path)
        assert tgt == (tmp_path / "step_10").resolve()
        assert (tgt / ".metadata").exists()
        held.release()
        mgr.wait()
        tgt = _latest_target(tmp_path)
        assert tgt == (tmp_path / "step_20").resolve()
        assert (tgt / ".metadata").exists()
        mgr.close()

    def test_latest_invariant_holds_every_cycle(self, tmp_path):
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        for s in (5, 10, 15, 20, 25):
            mgr.save(step=s)
            tgt = _latest_target(tmp_path)
            if tgt is not None:
                assert (tgt / ".metadata").exists(), f"latest -> {tgt} not durable (step {s})"
        mgr.wait()
        tgt = _latest_target(tmp_path)
        assert tgt == (tmp_path / "step_25").resolve()
        assert (tgt / ".metadata").exists()
        mgr.close()

    def test_sync_mode_commits_latest_immediately(self, tmp_path):
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.disabled)
        mgr.save(step=7)
        tgt = _latest_target(tmp_path)
        assert tgt == (tmp_path / "step_7").resolve()
        assert (tgt / ".metadata").exists()

    def test_resume_falls_back_to_newest_complete(self, tmp_path):
        """Warning text adapted: ours names the unusable step rather than 'interrupted async flush'."""
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 10, complete=True)
        self._build_ckpt(mgr, tmp_path, 20, complete=False)
        point_latest(tmp_path, "step_20")
        with captured_logs() as records:
            step, tokens, _ = mgr.load()
        assert step == 10, "did not fall back to the newest COMPLETE checkpoint"
        assert tokens == 1000
        assert any("step_20" in m for m in messages(records) if "not usable" in m or "skip" in m)

    def test_auto_resume_falls_back_when_given_the_resolved_path(self, tmp_path):
        """Adapted: the newest original fell back off an incomplete step even when load() was
        given that path. Here a path given to load() is never substituted (an error names it);
        auto-resume (no path) falls back, see test_resume_falls_back_to_newest_complete."""
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 10, complete=True)
        incomplete = self._build_ckpt(mgr, tmp_path, 20, complete=False)
        with pytest.raises(FileNotFoundError, match="step_20"):
            mgr.load(path=str(incomplete))
        assert mgr.load()[:2] == (10, 1000)

    def test_explicit_load_path_still_fails_loudly(self, tmp_path):
        """A user-named incomplete checkpoint is not substituted: the load fails (the original's
        test saw step 20 only because its dcp.load was mocked)."""
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 10, complete=True)
        incomplete = self._build_ckpt(mgr, tmp_path, 20, complete=False)
        mgr.config.load_path = str(incomplete)
        with pytest.raises(Exception, match="step_20"):
            mgr.load(path=str(incomplete))

    def test_complete_checkpoint_resumes_unchanged(self, tmp_path):
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 10, complete=True)
        newest = self._build_ckpt(mgr, tmp_path, 20, complete=True)
        assert mgr.load(path=str(newest))[:2] == (20, 2000)

    def test_resume_no_fallback_when_dcp_excluded(self, tmp_path):
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 10, complete=True)
        self._build_ckpt(mgr, tmp_path, 20, complete=False)
        point_latest(tmp_path, "step_20")
        step, tokens, _ = mgr.load(exclude_keys=["model", "optimizer"])
        assert (step, tokens) == (20, 2000)

    def test_cleanup_never_deletes_latest_or_in_flight(self, tmp_path, monkeypatch):
        """Retention with keep_last_n=1 never removes latest's target while a save is in flight,
        and still prunes the stale ones (through saves: the original set internals by hand)."""
        held = _HeldFlushes(monkeypatch)
        mgr = _linear_mgr(tmp_path, keep_last_n=1, async_mode=AsyncCheckpointMode.async_pinned)
        for s in (1, 2, 3, 4):
            mgr.save(step=s)
            held.release()
        mgr.wait()
        mgr.save(step=5)  # held in flight
        try:
            tgt = _latest_target(tmp_path)
            assert tgt == (tmp_path / "step_4").resolve() and (tgt / ".metadata").exists()
            assert not (tmp_path / "step_1").exists()
            assert not (tmp_path / "step_2").exists()
        finally:
            held.release()
            mgr.close()
        assert _step_dirs(tmp_path) == ["step_5"]

    def test_wait_and_flush_drain_and_barrier_when_distributed(self, tmp_path):
        """Adapted: with nothing in flight wait() and flush_pending_save() return at once (the
        barrier half of the original is internal)."""
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        t0 = time.perf_counter()
        mgr.wait()
        mgr.flush_pending_save()
        assert time.perf_counter() - t0 < 5

    def test_newest_complete_none_when_base_dir_missing(self, tmp_path):
        mgr = self._mgr(tmp_path / "does_not_exist", AsyncCheckpointMode.async_pinned)
        assert mgr.peek_saved_step() is None
        assert mgr.load() == (0, 0, {})

    def test_newest_complete_none_when_no_durable_checkpoint(self, tmp_path):
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 1, complete=False)
        self._build_ckpt(mgr, tmp_path, 2, complete=False)
        assert mgr.load() == (0, 0, {})

    def test_resolve_dcp_load_dir_returns_resolved_when_no_fallback(self, tmp_path):
        """latest -> an incomplete step and nothing complete to fall back to: the load surfaces
        the error instead of silently starting from scratch."""
        mgr = self._mgr(tmp_path, AsyncCheckpointMode.async_pinned)
        self._build_ckpt(mgr, tmp_path, 5, complete=False)
        point_latest(tmp_path, "step_5")
        with pytest.raises(Exception):  # noqa: B017 - the original only required that it fail
            mgr.load()


# ---------------------------------------------------------------------------
# The manager's own collectives run on a dedicated gloo group
# ---------------------------------------------------------------------------


class TestSyncBarrierGroup:
    """``torch.distributed`` is patched as a module, so whichever checkpoint module issues the
    collective sees the stand-in (nothing real runs a multi-rank group in one process)."""

    def test_sync_group_none_when_not_distributed(self, tmp_path, monkeypatch):
        def no_group(*a, **k):
            raise AssertionError("a process group was created without torch.distributed")

        monkeypatch.setattr(dist, "new_group", no_group)
        _linear_mgr(tmp_path)

    def test_sync_barrier_noop_when_not_distributed(self, tmp_path, monkeypatch):
        def no_collective(*a, **k):
            raise AssertionError("collective issued in a single process")

        for name in ("barrier", "broadcast_object_list", "gather_object"):
            monkeypatch.setattr(dist, name, no_collective)
        mgr = _linear_mgr(tmp_path)
        mgr.save(step=1)
        mgr.wait()
        assert mgr.load()[0] == 1

    def test_init_creates_dedicated_gloo_group(self, tmp_path, monkeypatch):
        calls = {}

        def fake_new_group(*args, backend=None, **kwargs):
            calls["backend"] = backend
            return "SENTINEL_GLOO_GROUP"

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "new_group", fake_new_group)
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
        _linear_mgr(tmp_path)
        assert calls["backend"] == "gloo"

    def test_sync_barrier_uses_dedicated_group_not_default(self, tmp_path, monkeypatch):
        groups = []

        def fake_bcast(objs, src=0, group=None, **kw):
            groups.append(group)

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "new_group", lambda *a, **k: "GLOO_PG")
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
        monkeypatch.setattr(dist, "broadcast_object_list", fake_bcast)
        _linear_mgr(tmp_path).peek_saved_step()
        assert groups and all(g == "GLOO_PG" for g in groups)


# ---------------------------------------------------------------------------
# CheckpointManager.load -- moment restore + exclude_keys branches
# ---------------------------------------------------------------------------


class TestCheckpointManagerLoad:
    def test_restores_optimizer_moments_into_fresh_optimizer(self, tmp_path):
        model = tiny_gpt(0)
        opt = lazy_adamw(model)
        train_steps(model, opt, 3)
        ref = adam_moments(opt)
        assert ref and any(ea.abs().sum().item() > 0 for ea, _ in ref)
        ckpt_dir = str(tmp_path / "ckpt")
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model, opt).save(step=3)

        model2 = tiny_gpt(1)
        opt2 = lazy_adamw(model2)
        assert not adam_moments(opt2), "fresh optimizer should have empty state before load"
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model2, opt2).load()
        loaded = adam_moments(opt2)
        assert loaded, "optimizer moments not restored"
        for (rea, rev), (lea, lev) in zip(ref, loaded, strict=True):
            assert torch.equal(rea, lea), "exp_avg not restored bit-exactly"
            assert torch.equal(rev, lev), "exp_avg_sq not restored bit-exactly"

    def test_load_excludes_optimizer(self, tmp_path):
        model = tiny_gpt(0)
        opt = lazy_adamw(model)
        train_steps(model, opt, 3)
        ref_weights = {n: p.clone() for n, p in model.named_parameters()}
        ckpt_dir = str(tmp_path / "ckpt")
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model, opt).save(step=3)

        model2 = tiny_gpt(99)
        opt2 = lazy_adamw(model2)
        pre_load = {n: p.clone() for n, p in model2.named_parameters()}
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model2, opt2).load(
            exclude_keys=["optimizer"]
        )
        for n, p in model2.named_parameters():
            if not torch.equal(ref_weights[n], pre_load[n]):  # LayerNorm init is seed-independent
                assert not torch.equal(pre_load[n], p), f"{n} was not loaded"
            assert torch.equal(ref_weights[n], p), f"{n} mismatch vs saved"
        assert not adam_moments(opt2), (
            "optimizer should remain empty with exclude_keys=['optimizer']"
        )

    def test_load_excludes_model(self, tmp_path):
        model = tiny_gpt(0)
        opt = lazy_adamw(model)
        train_steps(model, opt, 3)
        ref_moments = adam_moments(opt)
        ckpt_dir = str(tmp_path / "ckpt")
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model, opt).save(step=3)

        model2 = tiny_gpt(99)
        opt2 = lazy_adamw(model2)
        pre_load = {n: p.clone() for n, p in model2.named_parameters()}
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), model2, opt2).load(exclude_keys=["model"])
        for n, p in model2.named_parameters():
            assert torch.equal(pre_load[n], p), f"{n} should not have changed"
        loaded = adam_moments(opt2)
        assert loaded, "optimizer moments should load with exclude_keys=['model']"
        for (rea, rev), (lea, lev) in zip(ref_moments, loaded, strict=True):
            assert torch.equal(rea, lea)
            assert torch.equal(rev, lev)


# ---------------------------------------------------------------------------
# Resume when some parameters were never stepped
# ---------------------------------------------------------------------------


class _UsedAndUnused(torch.nn.Module):
    """``unused`` is trainable but reaches the loss only when ``both`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, both: bool = False) -> torch.Tensor:
        return self.used(x) + self.unused(x) if both else self.used(x)


class _Renamed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.renamed = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)


class _WithExtra(_UsedAndUnused):
    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(4, 4)


class _CountingOptimizer(torch.optim.Optimizer):
    """Optimizer whose whole per-parameter state is a plain step counter."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                state["step"] = state.get("step", 0) + 1
                param.add_(param.grad, alpha=-group["lr"])


class TestResumeWithUnsteppedParameters:
    """A checkpoint holds optimizer state only for parameters that were stepped."""

    @staticmethod
    def _build(seed, ckpt_dir, model_cls=_UsedAndUnused, freeze_unused=False):
        torch.manual_seed(seed)
        model = model_cls()
        if freeze_unused:
            model.unused.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return (
            model,
            optimizer,
            CheckpointManager(CheckpointConfig(dir=str(ckpt_dir)), model, optimizer),
        )

    @staticmethod
    def _step(model, optimizer, seed, both=False):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
        model(x, both=both).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    @staticmethod
    def _assert_same_run(model, optimizer, model2, optimizer2, stepped=("used.",)):
        for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
            assert torch.equal(p, p2), name
            state, state2 = optimizer.state.get(p, {}), optimizer2.state.get(p2, {})
            assert state.keys() == state2.keys(), name
            assert bool(state2) is name.startswith(stepped), name
            for key in state:
                assert torch.equal(state[key], state2[key]), f"{name}.{key}"

    def test_resume_leaves_never_stepped_parameters_stateless(self, tmp_path):
        """(The original also pinned its info-log sentence; that wording is not kept here.)"""
        model, optimizer, manager = self._build(0, tmp_path)
        self._step(model, optimizer, 1)
        manager.save(step=1)
        model2, optimizer2, manager2 = self._build(1, tmp_path)
        assert manager2.load() == (1, 0, {})
        self._assert_same_run(model, optimizer, model2, optimizer2)

    def test_resumed_steps_match_the_uninterrupted_run(self, tmp_path):
        model, optimizer, manager = self._build(0, tmp_path)
        self._step(model, optimizer, 1)
        manager.save(step=1)
        self._step(model, optimizer, 2)
        self._step(model, optimizer, 3)
        model2, optimizer2, manager2 = self._build(1, tmp_path)
        manager2.load()
        self._step(model2, optimizer2, 2)
        self._step(model2, optimizer2, 3)
        self._assert_same_run(model, optimizer, model2, optimizer2)

    def test_first_gradient_after_resume_matches_the_uninterrupted_run(self, tmp_path):
        model, optimizer, manager = self._build(0, tmp_path)
        self._step(model, optimizer, 1)
        manager.save(step=1)
        self._step(model, optimizer, 2, both=True)
        self._step(model, optimizer, 3, both=True)
        model2, optimizer2, manager2 = self._build(1, tmp_path)
        manager2.load()
        assert not optimizer2.state.get(model2.unused.weight)
        self._step(model2, optimizer2, 2, both=True)
        self._step(model2, optimizer2, 3, both=True)
        self._assert_same_run(model, optimizer, model2, optimizer2, stepped=("used.", "unused."))

    def test_a_stepped_parameter_missing_part_of_its_state_still_fails(self, tmp_path):
        model, optimizer, manager = self._build(0, tmp_path)
        self._step(model, optimizer, 1)
        del optimizer.state[model.used.weight]["exp_avg_sq"]
        manager.save(step=1)
        _, _, manager2 = self._build(1, tmp_path)
        with pytest.raises(
            CheckpointException, match=re.escape("optimizer.state.used.weight.exp_avg_sq")
        ):
            manager2.load()

    @pytest.mark.parametrize(
        ("case", "named"),
        [
            ("frozen_at_save", "unused.weight"),
            ("renamed_without_model", "renamed.weight"),
            ("added_without_model", "extra.weight"),
            ("integer_keyed", "used.weight"),
        ],
    )
    def test_state_the_saved_optimizer_did_not_hold_still_fails(self, tmp_path, case, named):
        model, optimizer, manager = self._build(0, tmp_path, freeze_unused=case == "frozen_at_save")
        self._step(model, optimizer, 1, both=case == "added_without_model")
        if case == "integer_keyed":  # an optimizer saved raw (positional ids), as before the fix
            raw = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            write_original_checkpoint(tmp_path, 1, None, None, dcp_state=raw, latest=None)
        else:
            manager.save(step=1)
        model_cls = {"renamed_without_model": _Renamed, "added_without_model": _WithExtra}
        _, _, manager2 = self._build(1, tmp_path, model_cls=model_cls.get(case, _UsedAndUnused))
        exclude = ["model"] if case.endswith("without_model") else None
        with pytest.raises((CheckpointException, RuntimeError), match=re.escape(named)):
            manager2.load(path=str(tmp_path / "step_1"), exclude_keys=exclude)

    @pytest.mark.parametrize(
        ("mutate", "named"),
        [
            pytest.param(
                lambda state: state["optimizer"]["state"].pop("unused.weight"),
                "optimizer.state.unused.weight.",
                id="whole_state_missing",
            ),
            pytest.param(
                lambda state: state["optimizer"].update(state={}),
                "optimizer.state.",
                id="state_omitted",
            ),
            pytest.param(
                lambda state: state["optimizer"]["state"].update(
                    renamed=state["optimizer"]["state"].pop("unused.weight")
                ),
                "optimizer.state.unused.weight.",
                id="state_key_renamed",
            ),
        ],
    )
    def test_a_stepped_parameter_without_a_sound_record_still_fails(self, tmp_path, mutate, named):
        """State that went missing is not a parameter that never received a gradient."""
        model, optimizer, _ = self._build(0, tmp_path)
        self._step(model, optimizer, 1, both=True)
        saved = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        mutate(saved)
        write_original_checkpoint(tmp_path, 1, None, None, dcp_state=saved, latest=None)
        _, _, manager2 = self._build(1, tmp_path)
        with pytest.raises((CheckpointException, ValueError), match=re.escape(named)):
            manager2.load(path=str(tmp_path / "step_1"))

    def test_an_opaque_optimizer_entry_keeps_its_loaded_state(self, tmp_path, monkeypatch):
        """A checkpoint that stores the optimizer as one entry (older DCP writers) loads whole."""
        from torch.distributed.checkpoint import FileSystemReader, _version

        def build(seed):
            torch.manual_seed(seed)
            model = _UsedAndUnused()
            return model, _CountingOptimizer(model.parameters())

        model, optimizer = build(0)
        for seed in (1, 2):
            self._step(model, optimizer, seed, both=True)
        saved = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        monkeypatch.setattr(_version, "_derived_version", "2_3")
        write_original_checkpoint(tmp_path, 1, None, None, dcp_state=saved, latest=None)
        monkeypatch.undo()
        index = FileSystemReader(str(tmp_path / "step_1")).read_metadata()
        assert "optimizer" in index.state_dict_metadata

        model2, optimizer2 = build(1)
        CheckpointManager(CheckpointConfig(dir=str(tmp_path)), model2, optimizer2).load(
            path=str(tmp_path / "step_1")
        )
        assert [optimizer2.state[p] for p in model2.parameters()] == [{"step": 2}] * 4

    def test_a_resumed_run_saves_and_resumes_again(self, tmp_path):
        model, optimizer, manager = self._build(0, tmp_path)
        self._step(model, optimizer, 1)
        manager.save(step=1)
        model2, optimizer2, manager2 = self._build(1, tmp_path)
        manager2.load()
        self._step(model2, optimizer2, 2)
        manager2.save(step=2)
        model3, optimizer3, manager3 = self._build(2, tmp_path)
        assert manager3.load() == (2, 0, {})
        self._step(model, optimizer, 2)
        self._assert_same_run(model, optimizer, model3, optimizer3)


# ---------------------------------------------------------------------------
# Resume into a different component build
# ---------------------------------------------------------------------------


class TestComponentSwapOnResume:
    def test_resume_into_a_different_component_is_rejected(self, tmp_path):
        """Saved a linear adapter, resumed an MLP one (the original used its adapter registry)."""
        ckpt_dir = str(tmp_path / "ckpt")
        saved = torch.nn.Sequential(torch.nn.Linear(8, 4))
        CheckpointManager(CheckpointConfig(dir=ckpt_dir), saved, lazy_adamw(saved)).save(step=1)
        resumed = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)
        )
        with pytest.raises(CheckpointException, match=r"(?i)missing"):
            CheckpointManager(CheckpointConfig(dir=ckpt_dir), resumed, lazy_adamw(resumed)).load()
