"""Sweep planning and execution: presets, the plan, runs with a fake fit, and N runs at once
(fake fits in processes, then a tiny real fit with jobs=2 against jobs=1)."""
import json
import os
import re
import signal
from pathlib import Path

import numpy as np

import pytest

from core.errors import ConfigError
from distill.config import DistillConfig, group_key, run_name
from experiments.sweep import PRESETS, expand_grid, plan_json, plan_sweep, preset_runs, resolve, run_sweep


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
    assert run_name({"gamma": 0.5, "seed": 42}) == "agre-batch_g0.5_a1_layer4_none_s42"
    a = {"seed": 43, "weighting": "aver", "gamma": 0.25, "layers": ["layer3", "layer4"]}
    b = {"layers": ("layer3", "layer4"), "gamma": 0.25, "weighting": "aver", "seed": 43,
         "tau": 4.0, "alpha": 1}
    assert run_name(a) == run_name(b) == "aver_g0.25_a1_layer3-layer4_none_s43"
    assert run_name({"gamma": 0}) == run_name({"gamma": 0.0})


def test_run_name_spells_non_default_fields_and_is_filesystem_safe():
    name = run_name({"gamma": 0.5, "epochs": 5, "tau": 2, "weights_file": "/w/my r18.pth",
                     "device": "cuda", "cache": "/x/cache.h5"})
    assert re.fullmatch(r"agre-batch_g0\.5_a1_layer4_none_ep5_tau2_wfmy-r18-[0-9a-f]{6}_s42", name), name
    # two files of one name are two runs
    assert run_name({"weights_file": "/a/w.pth"}) != run_name({"weights_file": "/b/w.pth"})


def test_run_name_rejects_unknown_field():
    with pytest.raises(ValueError, match="gama"):
        run_name({"gama": 0.5})


def test_group_key_drops_seed_and_placement():
    cfg = DistillConfig(gamma=0.25, alpha=0.9, seed=44, out="/a/b", cache="/c", data_root="/d").to_dict()
    other = DistillConfig(gamma=0.25, alpha=0.9, seed=42, out="/x", cache="/y", device="cpu").to_dict()
    assert group_key(cfg) == group_key(other) == group_key({**cfg, "field_of_a_later_version": 1})
    assert json.loads(group_key(cfg))["alpha"] == 0.9 and "seed" not in json.loads(group_key(cfg))
    assert group_key(cfg) != group_key({**cfg, "tau": 2.0})
    assert run_name({"gamma": 0.5, "data_root": "/d", "device": "cpu"}) == "agre-batch_g0.5_a1_layer4_none_s42"


def test_names_unique_within_each_preset_and_one_per_config(tmp_path):
    manifest = str(tmp_path / "manifest.json")
    for name in PRESETS:
        names = [run_name(s["overrides"]) for s in preset_runs(name, teachers_manifest=manifest)]
        assert len(names) == len(set(names)), name
    # Across presets, equal names mean equal configurations and vice versa.
    by_name = {}
    for spec in preset_runs(*PRESETS, teachers_manifest=manifest):
        cfg = DistillConfig.from_settings(spec["overrides"]).identity()
        assert by_name.setdefault(run_name(spec["overrides"]), cfg) == cfg
    configs = {json.dumps(c, sort_keys=True, default=list) for c in by_name.values()}
    # 14 configurations of the study's tables; "weighting" adds per-sample AGRE-KD and cached at
    # gamma 0 and 0.5 (4), "agre-params" layer4 and last at gamma 0 and 0.5 (4), "cache-vs-online"
    # the online run (1), "hypothesis" the erased feature targets at L4 and at L2+L3+L4 (2; its raw
    # rows are the study's own).
    assert len(configs) == len(by_name) == (14 + 4 + 4 + 1 + 2) * 3


def rows_of(preset: str) -> dict:
    return {r["label"]: r["overrides"] for r in PRESETS[preset]["rows"]}


def test_presets_mirror_the_study():
    assert set(PRESETS) == {"main", "agre-vs-aver", "gamma", "labels", "multilayer", "disagree",
                            "weighting", "agre-params", "cache-vs-online", "demo", "hypothesis"}
    hyp = rows_of("hypothesis")
    assert [ov.get("feature_target", "raw") for ov in hyp.values()] == ["raw", "raw", "erased",
                                                                        "raw", "erased"]
    assert hyp["L2+L3+L4, raw"] == rows_of("multilayer")["L2 + L3 + L4"]  # the study's own row
    demo = PRESETS["demo"]
    assert [r["overrides"]["weighting"] for r in demo["rows"]] == ["aver", "agre-batch", "agre-batch", "agre"]
    assert demo["baseline"] == "AVER γ=0" and [r["overrides"]["gamma"] for r in demo["rows"]] == [0, 0, 0.5, 0]
    main = PRESETS["main"]
    assert [r["label"] for r in main["rows"]][:2] == ["AGRE-KD + Features", "Disagree-Weight"]
    assert len(main["rows"]) == 7
    base = next(r for r in main["rows"] if r["label"] == main["baseline"])
    assert base["overrides"]["weighting"] == "agre-batch" and base["overrides"]["agre_params"] == "all"
    assert base["overrides"]["gamma"] == 0
    assert len(PRESETS["agre-vs-aver"]["rows"]) == 8
    assert [r["overrides"]["gamma"] for r in PRESETS["gamma"]["rows"]] == [0, .05, .25, .5, .75, 1]
    for name in ("main", "agre-vs-aver", "gamma", "labels", "multilayer", "disagree"):
        for label, ov in rows_of(name).items():
            # Every AGRE-KD row of the study's tables is its method: batch weights, all parameters.
            assert ov["weighting"] in ("agre-batch", "aver"), (name, label)
            assert ov["weighting"] == "aver" or ov["agre_params"] == "all", (name, label)
            assert label.startswith("AVER") == (ov["weighting"] == "aver"), (name, label)
    # The study splits a total gamma of 0.5 across layers (its notebook 03).
    for ov in (rows_of("main")["Multi-Layer (L3+L4)"], rows_of("multilayer")["L3 + L4"]):
        assert ov["layers"] == ("layer3", "layer4") and ov["layer_gammas"] == (0.15, 0.35)
        assert ov["gamma"] == 0.5 and sum(ov["layer_gammas"]) == pytest.approx(0.5)
    l234 = rows_of("multilayer")["L2 + L3 + L4"]
    assert l234["layer_gammas"] == (0.10, 0.15, 0.25) and sum(l234["layer_gammas"]) == pytest.approx(0.5)
    assert DistillConfig(**l234).gammas == {"layer2": 0.10, "layer3": 0.15, "layer4": 0.25}
    assert "layer_gammas" not in rows_of("multilayer")["L4 only"]
    for preset in PRESETS.values():
        assert preset["seeds"] == [42, 43, 44] and preset["title"]
        labels = [r["label"] for r in preset["rows"]]
        assert preset["baseline"] in labels and len(set(labels)) == len(labels)
        for row in preset["rows"]:
            DistillConfig(**row["overrides"])  # every row is a valid config


def test_the_study_baseline_is_one_run_for_the_presets_the_report_and_distill():
    """core.constants.STUDY_BASELINE is the study's baseline run: DistillConfig's defaults, the
    main table's baseline row and the row every report pairs a configuration with."""
    from core.constants import STUDY_BASELINE
    from experiments.runs import baseline_key

    defaults = DistillConfig()
    assert {k: getattr(defaults, k) for k in STUDY_BASELINE} == dict(STUDY_BASELINE)
    assert DistillConfig(**rows_of("main")[PRESETS["main"]["baseline"]]).identity() == defaults.identity()
    other = DistillConfig(weighting="aver", gamma=0.5, alpha=0.9, layers=("layer3", "layer4"),
                          layer_gammas=(0.15, 0.35), feature_weighting="disagree", epochs=5, seed=43)
    paired = DistillConfig(epochs=5, seed=43)  # the study's baseline, with the run's other settings
    assert baseline_key(other.to_dict()) == group_key(paired.to_dict()) != group_key(other.to_dict())


def test_new_presets_compare_weightings_parameters_and_the_online_loop(tmp_path):
    weighting = rows_of("weighting")
    assert {(ov["weighting"], ov.get("agre_params", "all"), ov["gamma"]) for ov in weighting.values()} == {
        (w, "all", g) for w in ("aver", "agre-batch", "agre", "cached") for g in (0.0, 0.5)}
    assert weighting["Cached bias-disagreement weights (static) γ=0.00"]["weighting"] == "cached"
    assert not any("AGRE" in label for label, ov in weighting.items() if ov["weighting"] == "cached")
    assert weighting[PRESETS["weighting"]["baseline"]] == rows_of("main")["AGRE-KD Baseline"]
    params = rows_of("agre-params")
    assert {(ov["weighting"], ov["agre_params"], ov["gamma"]) for ov in params.values()} == {
        ("agre-batch", p, g) for p in ("all", "layer4", "last") for g in (0.0, 0.5)}
    assert params[PRESETS["agre-params"]["baseline"]] == rows_of("main")["AGRE-KD Baseline"]
    with pytest.raises(ConfigError, match="--teachers"):
        preset_runs("cache-vs-online")
    manifest = str(tmp_path / "teachers" / "manifest.json")
    cached, online = (s["overrides"] for s in preset_runs("cache-vs-online", seeds=[42],
                                                          teachers_manifest=manifest))
    assert PRESETS["cache-vs-online"]["baseline"] == "Cached teachers (stored views)"
    assert cached == {k: v for k, v in online.items() if k != "teachers_online"} == rows_of("main")["AGRE-KD + Features"] | {"seed": 42}
    assert online["teachers_online"] == manifest
    assert DistillConfig(**online).teachers_online == manifest


def resolve_specs(specs, base):
    return [{**s, "overrides": resolve(s["overrides"], base)} for s in specs]


def test_set_wins_over_every_preset_value(tmp_path):
    specs = preset_runs(*PRESETS, teachers_manifest="m.json")
    base = {"alpha": 0.8, "epochs": 3, "tau": 2.0, "feature_weighting": "none", "agre_params": "last"}
    plan = plan_sweep("c.h5", tmp_path / "runs", specs, base=base)
    settings = [row["settings"] for t in plan["tables"] for row in t["rows"]]
    assert len(settings) == sum(len(p["rows"]) for p in PRESETS.values())
    for s in settings:
        # agre_params only matters to agre-batch: the identity of the other weightings ignores it
        keys = [k for k in base if k != "agre_params" or s["weighting"] == "agre-batch"]
        assert {k: s[k] for k in keys} == {k: base[k] for k in keys}
    # Even the weighting: --set weighting=... turns AVER rows into it too (unlike --agre-weighting).
    plan = plan_sweep("c.h5", tmp_path, preset_runs("main"), base={"weighting": "agre"})
    assert {row["settings"]["weighting"] for row in plan["tables"][0]["rows"]} == {"agre"}
    # A sweep-wide gamma rescales a row's split of gamma over layers; sweep-wide layers drop it.
    resolved = {s["label"]: s["overrides"] for s in resolve_specs(preset_runs("multilayer", seeds=[42]),
                                                                  {"gamma": 1})}
    assert resolved["L3 + L4"]["layer_gammas"] == (0.3, 0.7)
    assert resolved["L2 + L3 + L4"]["layer_gammas"] == (0.2, 0.3, 0.5)
    assert resolved["L4 only"]["gamma"] == 1 and resolved["L4 only"].get("layer_gammas") is None
    for spec in resolve_specs(preset_runs("multilayer", seeds=[42]), {"layers": "layer4"}):
        assert spec["overrides"]["layers"] == "layer4" and spec["overrides"].get("layer_gammas") is None
    split = resolve(rows_of("main")["Multi-Layer (L3+L4)"], {"layer_gammas": [0.25, 0.25]})
    assert split["layer_gammas"] == [0.25, 0.25]
    # What a sweep trains follows the same rule.
    calls = []
    run_sweep("c.h5", tmp_path / "sw", preset_runs("main", seeds=[42]), base={"alpha": 0.7},
              fit=fake_fit(calls))
    assert {c.alpha for c in calls} == {0.7} and len(calls) == 7


def test_agre_weighting_switch_changes_the_agre_rows_only():
    plain = {(s["label"], s["overrides"]["seed"]): s for s in preset_runs("main")}
    for weighting in ("agre", "cached"):
        switched = preset_runs("main", agre_weighting=weighting)
        assert len(switched) == len(plain)
        for spec in switched:
            before = plain[(spec["label"], spec["overrides"]["seed"])]["overrides"]
            assert spec["table"] == f"main [agre_weighting={weighting}]" and spec["preset"] == "main"
            if before["weighting"] == "aver":
                assert spec["overrides"] == before
            else:
                assert spec["overrides"]["weighting"] == weighting and "agre_params" not in spec["overrides"]
                assert {k: v for k, v in spec["overrides"].items() if k != "weighting"} == {
                    k: v for k, v in before.items() if k not in ("weighting", "agre_params")}
    assert preset_runs("main", agre_weighting="agre-batch") == preset_runs("main")
    # Presets that compare weightings keep theirs (their labels name each one).
    assert [s["overrides"] for s in preset_runs("weighting", "agre-params", agre_weighting="cached")] == [
        s["overrides"] for s in preset_runs("weighting", "agre-params")]
    online = preset_runs("cache-vs-online", agre_weighting="agre", teachers_manifest="m.json", seeds=[42])
    assert [s["overrides"]["weighting"] for s in online] == ["agre", "agre"]
    online = preset_runs("cache-vs-online", agre_weighting="cached", teachers_manifest="m.json", seeds=[42])
    assert [s["overrides"]["weighting"] for s in online] == ["cached", "cached"]  # computed live online
    with pytest.raises(ConfigError, match="--agre-weighting"):
        preset_runs("main", agre_weighting="aver")


def test_plan_shows_the_studys_settings_and_trains_nothing(tmp_path):
    out = tmp_path / "runs"
    plan = json.loads(plan_json("c.h5", out, preset_runs("main"), base={"epochs": 30}))
    assert not out.exists()
    assert plan["distinct_runs"] == 21 and plan["base"] == {"epochs": 30}
    (table,) = plan["tables"]
    # The epochs asked for are the default: the runs and the table are the study's own.
    assert table["table"] == "main" and table["baseline"] == "AGRE-KD Baseline"
    tagged = plan_sweep("c.h5", out, preset_runs("main"), base={"epochs": 5, "device": "cpu"})["tables"][0]
    assert tagged["table"] == "main [epochs=5]" and tagged["title"] == "Main Results [epochs=5]"
    rows = {r["label"]: r for r in table["rows"]}
    assert list(rows) == [r["label"] for r in PRESETS["main"]["rows"]]
    identity = set(DistillConfig().identity()) - {"seed"}
    for row in rows.values():
        assert set(row["settings"]) == identity
        assert [r["seed"] for r in row["runs"]] == [42, 43, 44]
        assert all(r["status"] == "not started" and r["folder"] == str(out / r["name"]) for r in row["runs"])
    feat = rows["AGRE-KD + Features"]["settings"]
    assert (feat["weighting"], feat["agre_params"], feat["gamma"], feat["alpha"], feat["tau"],
            feat["epochs"], feat["lr"],
            feat["batch_size"]) == ("agre-batch", "all", 0.5, 1.0, 4.0, 30, 1e-3, 128)
    multi = rows["Multi-Layer (L3+L4)"]["settings"]
    assert multi["layers"] == ["layer3", "layer4"] and multi["layer_gammas"] == [0.15, 0.35]
    assert rows["AVER Baseline"]["settings"]["weighting"] == "aver"
    assert rows["AGRE-KD Baseline"]["runs"][0]["name"] == "agre-batch_g0_a1_layer4_none_s42"
    # Ad-hoc grid runs are listed too, and an invalid value fails the plan, naming its row.
    grid = json.loads(plan_json("c.h5", out, expand_grid(gamma=[0, 0.5], seed=42)))["tables"]
    assert grid[0]["table"] == "ad-hoc grid" and len(grid[0]["rows"]) == 2
    with pytest.raises(ConfigError, match=r"main, row 'Multi-Layer \(L3\+L4\)': --layer-gammas has 1 value"):
        plan_sweep("c.h5", out, preset_runs("main"), base={"layer_gammas": [0.5]})


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
    assert Path(cfg.out) == tmp_path / "agre-batch_g0_a1_layer4_none_ep2_s42"
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


def process_fit(cfg):
    """A picklable fake fit for runs in their own processes: gamma 0.25 raises, gamma 0.75 kills
    its process (as the kernel does when memory runs out), others finish."""
    if cfg.gamma == 0.25:
        raise RuntimeError("CUDA out of memory")
    if cfg.gamma == 0.75:
        os.kill(os.getpid(), signal.SIGKILL)
    out = Path(cfg.out)
    cfg.save(out / "config.json")
    summary = {"status": "finished", "config": cfg.to_dict(), "test_best": {"wga": 0.8}, "pid": os.getpid()}
    (out / "summary.json").write_text(json.dumps(summary))


def test_runs_in_processes_fail_alone(tmp_path, capfd):
    runs = expand_grid(gamma=[0, 0.25, 0.5, 0.75, 1.0])
    counts = run_sweep("c.h5", tmp_path, runs, fit=process_fit, jobs=2)
    assert counts == {"finished": 3, "skipped": 0, "failed": 2}
    summaries = {g: json.loads((tmp_path / run_name({"gamma": g}) / "summary.json").read_text())
                 for g in (0, 0.25, 0.5, 0.75, 1.0)}
    assert summaries[0.25]["status"] == "failed" and "RuntimeError: CUDA out of memory" in summaries[0.25]["error"]
    assert summaries[0.75]["status"] == "failed" and "killed by signal 9" in summaries[0.75]["error"]
    assert summaries[0.75]["config"]["gamma"] == 0.75
    pids = {summaries[g]["pid"] for g in (0, 0.5, 1.0)}
    assert len(pids) == 3 and os.getpid() not in pids  # one process per run, none in this one
    assert "killed by signal 9" in capfd.readouterr().err
    # Finished runs are skipped, failed ones tried again; one run left trains in this process.
    counts = run_sweep("c.h5", tmp_path, expand_grid(gamma=[0, 0.5, 0.25]), fit=process_fit, jobs=2)
    assert counts == {"finished": 0, "skipped": 2, "failed": 1}
    with pytest.raises(ConfigError, match="--jobs"):
        run_sweep("c.h5", tmp_path, runs, fit=process_fit, jobs=0)


def test_two_jobs_give_the_runs_of_one(tiny_cache, tmp_path):
    """jobs=2 (two processes at once, one torch thread each on 2 cores) writes the same run folders
    with the same numbers as jobs=1 (in this process, held to one thread too: the thread count
    changes the order of float sums). Tolerance: rtol 1e-5 on losses and teacher weights,
    accuracies equal."""
    import torch

    base = {"epochs": 1, "batch_size": 64, "pretrained": False, "device": "cpu"}
    runs = expand_grid(weighting=["agre-batch", "aver"], gamma=0.5, seed=42)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        one = run_sweep(str(tiny_cache), tmp_path / "one", runs, base=base, jobs=1)
    finally:
        torch.set_num_threads(threads)
    two = run_sweep(str(tiny_cache), tmp_path / "two", runs, base=base, jobs=2)
    assert one == two == {"finished": 2, "skipped": 0, "failed": 0}
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir()) and len(names) == 2
    for name in names:
        a, b = (json.loads((tmp_path / d / name / "summary.json").read_text()) for d in ("one", "two"))
        assert a["config"] == {**b["config"], "out": a["config"]["out"]}
        for split in ("val_best", "test_best", "test_last"):
            assert a[split]["group_acc"] == pytest.approx(b[split]["group_acc"], abs=1e-9), (name, split)
        ma, mb = (json.loads((tmp_path / d / name / "metrics.jsonl").read_text()) for d in ("one", "two"))
        for key in ("loss", "kd", "feat"):
            assert ma["train"][key] == pytest.approx(mb["train"][key], rel=1e-5), (name, key)
        wa, wb = (np.load(tmp_path / d / name / "teacher_weights.npy") for d in ("one", "two"))
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-7)


def test_auto_jobs_from_free_gpu_memory(tiny_cache, monkeypatch, capsys):
    import torch

    import core.runtime
    from experiments import jobs

    cpu = DistillConfig(cache=str(tiny_cache), device="cpu", gamma=0.5)
    assert jobs.resolve_jobs("auto", [cpu, cpu]) == 1 and "CPU" in capsys.readouterr().out
    assert jobs.resolve_jobs(3, [cpu]) == 3 and jobs.resolve_jobs("auto", []) == 1
    # The estimate: compute grows with batch x pixels, data is what fit would place on the GPU.
    compute, data = jobs.run_memory_bytes(cpu)
    assert data > 0 and jobs.run_memory_bytes(DistillConfig(cache=str(tiny_cache), batch_size=256))[0] > compute
    assert jobs.run_memory_bytes(DistillConfig(cache="nowhere.h5"))[1] is None
    # On a GPU: 0.9 x free memory over the largest estimate, capped by the runs and the cores.
    monkeypatch.setattr(core.runtime, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * jobs.GiB, 80 * jobs.GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(jobs, "run_memory_bytes", lambda cfg: (4 * jobs.GiB, 6 * jobs.GiB))
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 16)
    many = [DistillConfig(seed=s) for s in range(10)]
    assert jobs.resolve_jobs("auto", many) == 7  # 72 GiB // 10 GiB
    assert jobs.resolve_jobs("auto", many[:3]) == 3
    assert "jobs auto: 3 (Fake GPU: 80.0 GiB free, ~10.0 GiB per run)" in capsys.readouterr().out


def test_a_relabelled_row_stays_one_row_under_its_new_label(tmp_path):
    """A preset whose row label changed between two sweeps (a new release) plans one entry per run
    and table, under the newest label, not the run twice."""
    from experiments.runs import load_plan
    from experiments.sweep import _update_plan

    spec = {"name": "agre-batch_g0_a1_layer4_none_s42", "overrides": {"seed": 42}, "preset": "demo",
            "table": "demo", "label": "AGRE-KD batch (report) γ=0"}
    _update_plan(tmp_path / "sweep.json", "c.h5", {}, [spec])
    _update_plan(tmp_path / "sweep.json", "c.h5", {}, [{**spec, "label": "AGRE-KD batch (study) γ=0"},
                                                       {**spec, "table": "other", "label": "x"}])
    plan = load_plan(tmp_path)
    assert [(e["table"], e["label"]) for e in plan] == [("demo", "AGRE-KD batch (study) γ=0"), ("other", "x")]
