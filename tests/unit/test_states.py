"""A user's own state handed over once (``CheckpointManager(states=...)``), saved and restored.

Real DCP on disk, a real ``StatefulDataLoader`` with worker processes, torch's own GradScaler and
EMA (``AveragedModel``), and an object of the user's own with plain values.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchdata.stateful_dataloader import StatefulDataLoader

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.checkpoint.safe_unpickle import load_dcp_metadata
from kempnerforge.checkpoint.state import read_train_state
from kempnerforge.cli import main as cli_main
from kempnerforge.config import CheckpointConfig


class Counters:
    def __init__(self) -> None:
        self.seen = 0
        self.best = float("inf")
        self.history = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"seen": self.seen, "best": self.best, "history": self.history}

    def load_state_dict(self, sd: dict) -> None:
        self.seen, self.best, self.history = sd["seen"], sd["best"], sd["history"].clone()


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(64, 6, generator=g)
        self.y = torch.randint(0, 3, (64,), generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def build(root: Path, mode: str, workers: int = 2) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 3))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest}], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    counters = Counters()
    loader = StatefulDataLoader(
        Data(), batch_size=8, shuffle=True, num_workers=workers, generator=torch.Generator()
    )
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(root), interval=4, async_mode=mode),
        model,
        opt,
        states={"sched": sched, "scaler": scaler, "ema": ema, "counters": counters, "data": loader},
    )
    return dict(
        model=model, opt=opt, scaler=scaler, ema=ema, counters=counters, loader=loader, mgr=mgr
    )


def train(o: dict, start: int, stop: int, losses: dict[int, float]) -> None:
    step = start
    while step < stop:
        for x, y in o["loader"]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(o["model"](x), y)
            o["scaler"].scale(loss).backward()
            o["scaler"].step(o["opt"])
            o["scaler"].update()
            o["opt"].zero_grad(set_to_none=True)
            o["mgr"].states["sched"].step()
            o["ema"].update_parameters(o["model"])
            step += 1
            o["counters"].seen += len(y)
            o["counters"].best = min(o["counters"].best, loss.item())
            o["counters"].history[step % 3] += loss.detach().float()
            losses[step] = loss.item()
            o["mgr"].maybe_save(step)
            if step == stop:
                break
    o["mgr"].wait()


def snapshot(o: dict) -> dict:
    return {
        "model": {k: v.clone() for k, v in o["model"].state_dict().items()},
        "ema": {k: v.clone() for k, v in o["ema"].state_dict().items()},
        "moments": {
            k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
            for k, s in o["opt"].state_dict()["state"].items()
        },
        "scaler": o["scaler"].state_dict(),
        "counters": (o["counters"].seen, o["counters"].best, o["counters"].history.clone()),
    }


def assert_equal(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    for k, s in a["moments"].items():
        for n, t in s.items():
            assert torch.equal(t, b["moments"][k][n]), f"optimizer state {k}.{n}"
    assert a["scaler"] == b["scaler"]
    assert a["counters"][:2] == b["counters"][:2]
    assert torch.equal(a["counters"][2], b["counters"][2])


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_states_resume_bit_exact(tmp_path: Path, mode: str) -> None:
    ref_losses: dict[int, float] = {}
    ref = build(tmp_path / "ref", mode)
    train(ref, 0, 14, ref_losses)
    want = snapshot(ref)
    ref["mgr"].close()

    first: dict[int, float] = {}
    run = build(tmp_path / "run", mode)
    train(run, 0, 10, first)  # saves at 4 and 8; steps 9-10 are lost with the process
    run["mgr"].close()
    again = build(tmp_path / "run", mode)
    step, _, _ = again["mgr"].resume()  # no arguments: every handed-over state comes back
    assert step == 8
    assert again["counters"].seen == 8 * 8
    resumed: dict[int, float] = {}
    train(again, step, 14, resumed)
    assert {s: ref_losses[s] for s in resumed} == resumed
    assert_equal(want, snapshot(again))
    again["mgr"].close()


def test_tensors_in_dcp_plain_values_in_train_state(tmp_path: Path) -> None:
    o = build(tmp_path, "disabled", workers=0)
    train(o, 0, 4, {})
    step_dir = tmp_path / "step_4"
    keys = set(load_dcp_metadata(step_dir).state_dict_metadata)
    assert "states.ema.module.0.weight" in keys and "states.counters.history" in keys
    assert not any(k.startswith(("states.scaler", "states.sched", "states.data")) for k in keys)
    saved = read_train_state(step_dir, 0)["states"]
    assert saved["scaler"]["skeleton"] == o["scaler"].state_dict()
    assert saved["counters"]["skeleton"]["seen"] == 32
    assert saved["data"]["kind"] == "loader" and "generator" in saved["data"]
    o["mgr"].close()


def test_inspect_and_export_show_states(tmp_path: Path) -> None:
    o = build(tmp_path, "disabled", workers=0)
    train(o, 0, 4, {})
    o["mgr"].close()
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["ckpt", "inspect", str(tmp_path / "latest")]) == 0
    text = out.getvalue()
    assert "states: 5" in text
    assert f"ema: {len(o['ema'].state_dict())} tensors" in text  # weights, BN buffers, count
    assert "scaler: 0 tensors (0 elements), values {'scale': " in text
    assert "data: data loader position" in text
    dest = tmp_path / "ema.pt"
    with redirect_stdout(io.StringIO()):
        assert (
            cli_main(
                [
                    "ckpt",
                    "export",
                    str(tmp_path / "latest"),
                    "--key",
                    "states.ema",
                    "--to",
                    str(dest),
                ]
            )
            == 0
        )
    exported = torch.load(dest, weights_only=True)
    live = o["ema"].state_dict()
    assert set(exported) == set(live)
    assert all(torch.equal(exported[k], live[k]) for k in live)


def test_bad_handover_says_what_to_do(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    cfg = CheckpointConfig(dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"states\['plain'\].*Stateful"):
        CheckpointManager(cfg, model, None, states={"plain": {"a": 1}})
    with pytest.raises(ValueError, match="must be letters"):
        CheckpointManager(cfg, model, None, states={"a.b": nn.Linear(1, 1)})


def test_shape_change_names_the_entry_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None, states={"ema": nn.Linear(3, 3)}
    )
    mgr.save(1)
    mgr.close()
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None, states={"ema": nn.Linear(4, 3)}
    )
    with pytest.raises(ValueError, match=r"states\['ema'\] entry 'weight'.*\(3, 3\).*\(3, 4\)"):
        mgr.resume()
    mgr.close()
    assert (tmp_path / "step_1" / "metadata.json").is_file()


def test_state_handed_over_after_the_save_keeps_its_value(tmp_path: Path, caplog) -> None:
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None)
    mgr.save(1)
    mgr.close()
    c = Counters()
    c.seen = 5
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None, states={"counters": c}
    )
    with caplog.at_level("WARNING"):
        assert mgr.resume()[0] == 1
    assert c.seen == 5
    assert "states['counters'] is not in this checkpoint" in caplog.text
    mgr.close()


def test_lazily_created_state_loads_from_the_checkpoint(tmp_path: Path) -> None:
    """An object whose state_dict() is empty until used (an optimizer-like state) still gets
    its saved tensors: they are allocated from the checkpoint's metadata."""

    class Lazy:
        def __init__(self) -> None:
            self.buf: torch.Tensor | None = None

        def state_dict(self) -> dict:
            return {} if self.buf is None else {"buf": self.buf}

        def load_state_dict(self, sd: dict) -> None:
            self.buf = sd.get("buf")

    used = Lazy()
    used.buf = torch.arange(6.0).reshape(2, 3)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None, states={"lazy": used}
    )
    mgr.save(1)
    mgr.close()
    fresh = Lazy()
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path)), nn.Linear(2, 2), None, states={"lazy": fresh}
    )
    mgr.resume()
    assert fresh.buf is not None and torch.equal(fresh.buf, used.buf)
    mgr.close()
