"""Sweep planning and execution with a fake fit (no torch training)."""
import json
import re
from pathlib import Path

import pytest

from distill.config import DistillConfig, group_key, run_name
from experiments.sweep import PRESETS, expand_grid, preset_runs, run_sweep


def fake_fit(calls, fail_if=lambda cfg: False):
    """A fit that records its configs and writes a finished summary.json (or raises)."""
    def fit(cfg):
        calls.append(cfg)
        if fail_if(cfg):
            raise RuntimeError(f"CUDA out of memory for gamma={cfg.gamma}")
        out = Path(cfg.out)
        cfg.save(out / "config.json")
        summary = {"status": "finished", "config": cfg.to_dict(), "test_best": {"wga": 0.8}}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
    return fit


def test_run_name_readable_and_independent_of_order_and_spelled_defaults():
    assert run_name({"gamma": 0.5, "seed": 42}) == "agre_g0.5_a1_layer4_none_s42"
    a = {"seed": 43, "weighting": "aver", "gamma": 0.25, "layers": ["layer3", "layer4"]}
    b = {"layers": ("layer3", "layer4"), "gamma": 0.25, "weighting": "aver", "seed": 43,
         "tau": 4.0, "alpha": 1}
    assert run_name(a) == run_name(b) == "aver_g0.25_a1_layer3-layer4_none_s43"
    assert run_name({"gamma": 0}) == run_name({"gamma": 0.0})


def test_run_name_spells_non_default_fields_and_is_filesystem_safe():
    name = run_name({"gamma": 0.5, "epochs": 5, "tau": 2, "weights_file": "/w/my r18.pth",
                     "device": "cuda", "cache": "/x/cache.h5"})
    assert name == "agre_g0.5_a1_layer4_none_ep5_tau2_wfmy-r18_s42"
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)


def test_run_name_rejects_unknown_field():
    with pytest.raises(ValueError, match="gama"):
        run_name({"gama": 0.5})


def test_group_key_drops_seed_and_placement():
    cfg = DistillConfig(gamma=0.25, alpha=0.9, seed=44, out="/a/b", cache="/c", data_root="/d").to_dict()
    other = DistillConfig(gamma=0.25, alpha=0.9, seed=42, out="/x", cache="/y", device="cpu").to_dict()
    assert group_key(cfg) == group_key(other) == group_key({**cfg, "field_of_a_later_version": 1})
    assert json.loads(group_key(cfg))["alpha"] == 0.9 and "seed" not in json.loads(group_key(cfg))
    assert group_key(cfg) != group_key({**cfg, "tau": 2.0})
    assert run_name({"gamma": 0.5, "data_root": "/d", "device": "cpu"}) == "agre_g0.5_a1_layer4_none_s42"


def test_names_unique_within_each_preset_and_one_per_config():
    for name in PRESETS:
        names = [run_name(s["overrides"]) for s in preset_runs(name)]
        assert len(names) == len(set(names)), name
    # Across presets, equal names mean equal configurations and vice versa.
    by_name = {}
    for spec in preset_runs(*PRESETS):
        cfg = DistillConfig.from_settings(spec["overrides"]).identity()
        assert by_name.setdefault(run_name(spec["overrides"]), cfg) == cfg
    configs = {json.dumps(c, sort_keys=True, default=list) for c in by_name.values()}
    assert len(configs) == len(by_name) == 14 * 3


def test_presets_mirror_the_report():
    assert set(PRESETS) == {"main", "agre-vs-aver", "gamma", "labels", "multilayer", "disagree"}
    main = PRESETS["main"]
    assert [r["label"] for r in main["rows"]][:2] == ["AGRE-KD + Features", "Disagree-Weight"]
    assert len(main["rows"]) == 7
    base = next(r for r in main["rows"] if r["label"] == main["baseline"])
    assert base["overrides"]["weighting"] == "agre" and base["overrides"]["gamma"] == 0
    assert len(PRESETS["agre-vs-aver"]["rows"]) == 8
    assert [r["overrides"]["gamma"] for r in PRESETS["gamma"]["rows"]] == [0, .05, .25, .5, .75, 1]
    for preset in PRESETS.values():
        assert preset["seeds"] == [42, 43, 44] and preset["title"]
        labels = [r["label"] for r in preset["rows"]]
        assert preset["baseline"] in labels and len(set(labels)) == len(labels)
        for row in preset["rows"]:
            DistillConfig(**row["overrides"])  # every row is a valid config


def test_expand_grid():
    grid = expand_grid(gamma=[0, 0.5], weighting=["agre", "aver"], seed=42)
    assert len(grid) == 4
    assert grid[1] == {"gamma": 0, "weighting": "aver", "seed": 42}


def test_sweep_runs_then_skips_finished(tmp_path, capsys):
    calls = []
    runs = expand_grid(gamma=[0, 0.5], seed=[42, 43])
    counts = run_sweep("c.h5", tmp_path, runs, base={"epochs": 2}, fit=fake_fit(calls))
    assert counts == {"finished": 4, "skipped": 0, "failed": 0}
    cfg = calls[0]
    assert cfg.epochs == 2 and cfg.cache == "c.h5"
    assert Path(cfg.out) == tmp_path / "agre_g0_a1_layer4_none_ep2_s42"
    plan = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["name"] for r in plan["runs"]} == {Path(c.out).name for c in calls}
    assert plan["base"] == {"epochs": 2}

    calls.clear()
    counts = run_sweep("c.h5", tmp_path, runs, base={"epochs": 2}, fit=fake_fit(calls))
    assert counts == {"finished": 0, "skipped": 4, "failed": 0} and calls == []
    assert "already finished" in capsys.readouterr().out


def test_sweep_records_a_failure_and_goes_on(tmp_path, capsys):
    calls = []
    runs = expand_grid(gamma=[0, 0.25, 0.5])
    counts = run_sweep("c.h5", tmp_path, runs, fit=fake_fit(calls, lambda c: c.gamma == 0.25))
    assert counts == {"finished": 2, "skipped": 0, "failed": 1} and len(calls) == 3
    summary = json.loads((tmp_path / run_name({"gamma": 0.25}) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "RuntimeError: CUDA out of memory" in summary["error"]
    assert "Traceback" in summary["traceback"] and summary["config"]["gamma"] == 0.25
    assert "CUDA out of memory" in capsys.readouterr().err

    # A failed run is retried on the next call; finished ones are not.
    calls.clear()
    counts = run_sweep("c.h5", tmp_path, runs, fit=fake_fit(calls))
    assert counts == {"finished": 1, "skipped": 2, "failed": 0}
    assert [c.gamma for c in calls] == [0.25]


def test_fit_without_finished_summary_counts_as_failed(tmp_path):
    counts = run_sweep("c.h5", tmp_path, [{"seed": 1}], fit=lambda cfg: {})
    assert counts["failed"] == 1


def test_shared_configs_train_once_and_plan_keeps_every_table(tmp_path):
    calls = []
    specs = preset_runs("main", "gamma", seeds=[42])
    counts = run_sweep("c.h5", tmp_path, specs, fit=fake_fit(calls))
    distinct = {run_name(s["overrides"]) for s in specs}
    assert counts["finished"] == len(calls) == len(distinct) < len(specs)
    plan = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert len(plan) == len(specs)
    assert {(e["preset"], e["label"]) for e in plan} >= {("main", "AGRE-KD Baseline"),
                                                         ("gamma", "γ=0.00")}
    # A second call into the same folder adds its plan instead of replacing it.
    run_sweep("c.h5", tmp_path, preset_runs("labels", seeds=[42]), fit=fake_fit(calls))
    plan = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert {e["preset"] for e in plan} == {"main", "gamma", "labels"}


def test_invalid_config_fails_before_anything_trains(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="alpha"):
        run_sweep("c.h5", tmp_path, [{"gamma": 0.5}, {"alpha": 2.0}], fit=fake_fit(calls))
    assert calls == []
    with pytest.raises(ValueError, match="unknown preset"):
        preset_runs("mian")


def test_finished_run_from_another_data_set_is_not_skipped_nor_touched(tmp_path, monkeypatch):
    import json

    import experiments.sweep as sweep

    calls = []

    def fake_fit(cfg):
        calls.append(cfg.out)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"status": "finished", "cache_identity": "aaa",
                                                      "config": cfg.to_dict()}))

    monkeypatch.setattr(sweep, "_cache_identity", lambda cache: "aaa")
    counts = sweep.run_sweep("cache.h5", str(tmp_path), [{"gamma": 0.0, "seed": 42}], fit=fake_fit)
    assert counts["finished"] == 1 and len(calls) == 1
    assert sweep.run_sweep("cache.h5", str(tmp_path), [{"gamma": 0.0, "seed": 42}], fit=fake_fit)["skipped"] == 1
    monkeypatch.setattr(sweep, "_cache_identity", lambda cache: "bbb")
    counts = sweep.run_sweep("cache.h5", str(tmp_path), [{"gamma": 0.0, "seed": 42}], fit=fake_fit)
    assert counts["failed"] == 1 and len(calls) == 1
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["cache_identity"] == "aaa"  # left as it was
