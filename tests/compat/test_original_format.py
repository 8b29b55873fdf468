"""The original's on-disk format: the helper against the fixture, and resuming such checkpoints.

``tests/fixtures/kf-original`` is a checkpoint the original package wrote (5666d0d, see its
README). The first tests check that ``helpers.original_format.write_original_checkpoint`` writes
the same kind of files (names, DCP keys/shapes/dtypes, ``train_state.pt`` records, pickle globals,
``metadata.json`` bytes), so tests can make more such checkpoints than the one fixture. The
rest resume checkpoints in that layout through ``CheckpointManager`` (exact state, RNG included):
they fail until this project reads the original's layout.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.kf_original import CHECKPOINTS, EXPECTED, copy_kf_original, latest_target
from helpers.original_format import (
    dcp_keys,
    files_under,
    pickle_globals,
    point_latest,
    write_original_checkpoint,
    zip_entries,
)
from torch import nn

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.config import CheckpointConfig

# What a train_state.pt of the original can reference (numpy >= 2 spells the first one
# numpy._core; files written under numpy 1.x say numpy.core.multiarray._reconstruct).
FIXTURE_GLOBALS = {
    "numpy._core.multiarray _reconstruct",
    "numpy ndarray",
    "numpy dtype",
    "_codecs encode",
    "torch._utils _rebuild_tensor_v2",
    "torch ByteStorage",
    "collections OrderedDict",
}


def _readme_recipe(seed: int = 42):
    """The model/optimizer/scheduler the fixture's README describes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(32, 12), nn.LayerNorm(12), nn.Linear(12, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    return model, opt, sched


def _train(model, opt, sched, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randint(0, 32, (4, 8), generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.fixture
def helper_ckpt(tmp_path):
    model, opt, sched = _readme_recipe()
    _train(model, opt, sched)
    write_original_checkpoint(
        tmp_path / "ours", 12, model, opt, tokens_seen=9000, scheduler=sched, extra={"phase": 1}
    )
    return tmp_path / "ours"


class TestHelperMatchesFixture:
    def test_same_files(self, helper_ckpt):
        fixture = [f.replace(" -> link", "") for f in files_under(CHECKPOINTS)]
        ours = [f.replace(" -> link", "") for f in files_under(helper_ckpt)]
        assert ours == fixture
        assert os.readlink(helper_ckpt / "latest") == "step_12"  # the original made a symlink
        assert latest_target(CHECKPOINTS) == "step_12"  # a link, or a file naming it

    def test_same_dcp_keys_shapes_dtypes(self, helper_ckpt):
        assert dcp_keys(helper_ckpt / "step_12") == dcp_keys(CHECKPOINTS / "step_12")

    def test_same_metadata_json_bytes(self, helper_ckpt):
        ours = (helper_ckpt / "step_12" / "metadata.json").read_bytes()
        assert ours == (CHECKPOINTS / "step_12" / "metadata.json").read_bytes()
        assert json.loads(ours) == {"step": 12, "tokens_seen": 9000}

    def test_same_train_state_records_and_globals(self, helper_ckpt):
        ours = helper_ckpt / "step_12" / "train_state.pt"
        theirs = CHECKPOINTS / "step_12" / "train_state.pt"
        assert zip_entries(ours) == zip_entries(theirs)
        assert pickle_globals(theirs) == FIXTURE_GLOBALS
        assert pickle_globals(ours) == pickle_globals(theirs)

    def test_same_train_state_structure(self, helper_ckpt):
        ours = torch.load(helper_ckpt / "step_12" / "train_state.pt", weights_only=False)
        theirs = torch.load(CHECKPOINTS / "step_12/train_state.pt", weights_only=False)
        assert list(ours) == list(theirs) == ["step", "tokens_seen", "rng", "scheduler", "phase"]
        assert list(ours["rng"]) == list(theirs["rng"]) == ["python", "numpy", "torch_cpu"]
        assert type(ours["rng"]["numpy"]) is type(theirs["rng"]["numpy"]) is tuple
        assert ours["scheduler"].keys() == theirs["scheduler"].keys()
        assert (theirs["step"], theirs["tokens_seen"], theirs["phase"]) == (12, 9000, 1)

    def test_train_state_needs_more_than_weights_only(self):
        """The fixture's train_state.pt is not loadable with weights_only=True (numpy globals)."""
        with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
            torch.load(CHECKPOINTS / "step_12/train_state.pt", weights_only=True)


def _fixture_copy(tmp_path, latest: str):
    """A writable copy of the fixture with ``latest`` as the original made it (a symlink) or as a
    regular file naming the step (how it survives an archive without links)."""
    root = copy_kf_original(tmp_path / "checkpoints")
    point_latest(root, latest_target(root), kind=latest)
    assert (root / "latest").is_symlink() is (latest == "symlink")
    return root


LATEST_FORMS = pytest.mark.parametrize("latest", ["symlink", "file"])


class TestResumeOriginalLayout:
    @LATEST_FORMS
    def test_peek_saved_step_on_fixture(self, tmp_path, latest):
        root = _fixture_copy(tmp_path, latest)
        model, opt, _ = _readme_recipe()
        assert (
            CheckpointManager(CheckpointConfig(dir=str(root)), model, opt).peek_saved_step() == 12
        )

    @LATEST_FORMS
    def test_resume_fixture_exactly(self, tmp_path, latest):
        """Weights, AdamW moments, scheduler, step/tokens/extra and the torch RNG as saved."""
        root = _fixture_copy(tmp_path, latest)
        expected = torch.load(EXPECTED, weights_only=True)
        model, opt, sched = _readme_recipe(seed=7)
        mgr = CheckpointManager(CheckpointConfig(dir=str(root)), model, opt)
        assert mgr.load(scheduler=sched) == (12, 9000, {"phase": 1})
        for name, value in expected["weights"].items():
            assert torch.equal(model.state_dict()[name], value), name
        params = list(model.parameters())
        for key, value in expected["moments"].items():
            index, field = key.split(".", 1)
            assert torch.equal(opt.state[params[int(index)]][field], value), key
        assert sched.last_epoch == expected["sched_last_epoch"]
        assert torch.equal(torch.get_rng_state(), expected["rng_after_save"])

    def test_resume_with_dataloader_state_and_extras(self, tmp_path):
        """A torchdata StatefulDataLoader's state in train_state.pt: stashed by load(), applied
        later; the resumed loader yields what the original run would have yielded next."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        def loader():
            return StatefulDataLoader(list(range(64)), batch_size=4, shuffle=True)

        torch.manual_seed(0)
        dl = loader()
        it = iter(dl)
        for _ in range(3):
            next(it)
        dl_state = dl.state_dict()
        want = [next(it).tolist() for _ in range(2)]

        model, opt, sched = _readme_recipe()
        _train(model, opt, sched, steps=2)
        extra = {"phase_idx": 1, "wandb_run_id": "abc123"}
        write_original_checkpoint(
            tmp_path, 3, model, opt, tokens_seen=96, scheduler=sched,
            dataloader_state=dl_state, extra=extra,
        )  # fmt: skip
        model2, opt2, sched2 = _readme_recipe(seed=1)
        mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), model2, opt2)
        assert mgr.load(scheduler=sched2) == (3, 96, extra)
        dl2 = loader()
        mgr.apply_dataloader_state(dl2)
        it2 = iter(dl2)
        assert [next(it2).tolist() for _ in range(2)] == want

    def test_resume_pipeline_parallel_stage_dir(self, tmp_path):
        """The original put a PP stage's DCP files in ``step_N/pp{rank}/``."""
        model, opt, sched = _readme_recipe()
        _train(model, opt, sched, steps=1)
        step_dir = write_original_checkpoint(tmp_path, 4, model, opt, pp_rank=0)
        assert (step_dir / "pp0" / ".metadata").is_file()
        model2, opt2, _ = _readme_recipe(seed=1)
        mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), model2, opt2, pp_rank=0)
        assert mgr.load()[0] == 4
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
