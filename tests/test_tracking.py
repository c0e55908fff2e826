"""distill --tensorboard / --wandb: what the trackers hold, read back from the event files and the
offline W&B run, equals metrics.jsonl and summary.json; missing packages are a message."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from distill.config import DistillConfig, run_name
from distill.tracking import Tracker, flatten, open_tracker

FAST = dict(epochs=2, batch_size=64, lr=1e-2, device="cpu", pretrained=False)
F32 = 2.0 ** -24  # TensorBoard stores float32 scalars: one rounding, relative error <= 2^-24


def test_flatten_names_list_entries_and_drops_what_is_not_a_number():
    rec = {"epoch": 3, "val": {"wga": 0.5, "group_acc": [1.0, float("nan")], "avg_acc": None},
           "teacher_weights": [0.25, 0.75], "note": "x"}
    flat = flatten(rec, {"group_acc": ["landbird/land", "g1"], "teacher_weights": ["t1", "t2"]})
    assert flat == {"epoch": 3.0, "val/wga": 0.5, "val/group_acc/landbird_land": 1.0,
                    "teacher_weights/t1": 0.25, "teacher_weights/t2": 0.75}


def test_tracking_is_placement_not_identity():
    assert run_name({"tensorboard": True, "wandb": "proj"}) == run_name({})
    with pytest.raises(ConfigError, match="--wandb"):
        DistillConfig(wandb=" ")


@pytest.mark.parametrize("module,option,pip", [
    ("torch.utils.tensorboard", "tensorboard", "pip install tensorboard"),
    ("wandb", "wandb", "pip install wandb")])
def test_a_missing_package_is_a_message_naming_the_pip_command(tmp_path, monkeypatch, module, option, pip):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    kw = {"tensorboard": True} if option == "tensorboard" else {"wandb_project": "p"}
    with pytest.raises(ConfigError, match=pip):
        Tracker(tmp_path, {}, {}, 0, **kw)


def test_only_rank_zero_logs(tmp_path):
    cfg = DistillConfig(out=str(tmp_path), tensorboard=True, wandb="p")
    t = open_tracker(cfg, tmp_path, is_main=False, names={}, start=0)
    assert t.writer is None and t.run is None
    t.log_epoch({"epoch": 1, "val": {"wga": 0.5}})
    t.finish({"best_epoch": 1})
    assert not any(tmp_path.iterdir())


def _names(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    teachers = [t["name"] for t in s["teachers"] if t["role"] != "biased"]
    return {"group_acc": s["group_names"], "group_count": s["group_names"], "teacher_weights": teachers}


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_equal_metrics_jsonl(tiny_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill.train import fit

    run = tmp_path / "run"
    cfg = DistillConfig(cache=str(tiny_cache), out=str(run), tensorboard=True, **FAST)
    summary = fit(cfg, progress=False)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    names = _names(run)
    for line in _lines(run):
        expected = flatten({k: v for k, v in line.items() if k != "epoch"}, names)
        assert {"val/wga", "test/ece", "teacher_weights/teacher_1", "val/group_acc/landbird_water"} <= set(
            expected)
        for tag, value in expected.items():
            assert logged[tag][line["epoch"]] == pytest.approx(value, rel=F32, abs=1e-45), tag
    assert logged["summary/test_best/wga"][2] == pytest.approx(summary["test_best"]["wga"], rel=F32)
    oracle = summary["oracle"]["test"]["wga"]
    assert logged["summary/oracle_diagnostic/test/wga"][2] == pytest.approx(oracle, rel=F32)


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file (a LevelDB-style log: 7-byte file header, 32 KiB blocks, each
    record ``crc32 u32, length u16, type u8`` then its bytes; type 1 whole, 2-4 first/middle/last)."""
    data, block, pos, out, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def test_offline_wandb_run_equals_metrics_jsonl_config_and_summary(tiny_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    from distill.train import fit

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = DistillConfig(cache=str(tiny_cache), out=str(run), wandb="gr-kd-test", **FAST)
    summary = fit(cfg, progress=False)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, final, config = {}, {}, {}
    for raw in _wandb_records(files[0]):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = items
        elif kind == "summary":
            final.update({i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    config.pop("_wandb", None)
    assert config == json.loads(json.dumps(cfg.to_dict()))
    names = _names(run)
    for line in _lines(run):
        expected = flatten({k: v for k, v in line.items() if k != "epoch"}, names)
        got = history[line["epoch"]]
        assert "teacher_weights/teacher_2" in expected and got["epoch"] == line["epoch"]
        assert {k: got[k] for k in expected} == expected  # JSON both ways: float64 values, equal bit for bit
    assert json.loads(final["summary/test_best/wga"]) == summary["test_best"]["wga"]
    assert json.loads(final["summary/select_rule"]) == "val-wga"
