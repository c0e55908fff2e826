"""Report aggregation, tables, missing-run listing and plots, on hand-made run folders."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from distill.config import DistillConfig, run_name
from experiments.report import format_table, missing_runs, write_report
from experiments.runs import aggregate, build_tables, describe, load_plan, load_runs
from experiments.sweep import preset_runs, run_sweep

SEED_OFFSET = {42: -0.02, 43: 0.0, 44: 0.02}  # -> sample std of exactly 2 points
TEACHERS = [{"name": f"dfr_seed{i}", "role": "teacher"} for i in range(5)] + [
    {"name": "erm_seed0", "role": "biased"}]


def metrics(wga: float) -> dict:
    return {"group_acc": [0.99, wga, wga + 0.05, 0.97], "group_count": [467, 466, 133, 133],
            "wga": wga, "mean_acc": 0.92, "avg_acc": 0.93}


def write_run(root: Path, wga: float | None, status: str = "finished", weights=True, time_s: float = 1.0,
              **overrides):
    """A run folder as distill.train.fit writes it (one epoch of ``time_s`` seconds); wga None
    leaves it without a summary."""
    cfg = DistillConfig(out=str(root / run_name(overrides)), **overrides)
    out = Path(cfg.out)
    out.mkdir(parents=True)
    cfg.save(out / "config.json")
    epoch = {"epoch": 0, "lr": 1e-3, "time_s": time_s, "val": metrics(0.8),
             "train": {"loss": 1.0, "ce": 0.5, "kd": 0.4, "feat": 0.1}, "teacher_weights": [.2] * 5}
    (out / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    if weights:
        rng = np.random.default_rng(cfg.seed)
        w = (np.full((200, 5), 0.2) if cfg.weighting == "aver"
             else rng.dirichlet(np.ones(5), size=200)).astype(np.float32)
        np.save(out / "teacher_weights.npy", w)
    if wga is None:
        return out
    summary = {"status": status, "config": cfg.to_dict(), "cache_fingerprint": "abc123",
               "git_commit": "deadbeef", "teachers": TEACHERS, "best_epoch": 0,
               "val_best": metrics(0.8), "test_best": metrics(wga), "test_last": metrics(0.5),
               "teacher_test": {t["name"]: metrics(0.91 + 0.005 * i)
                                for i, t in enumerate(TEACHERS)}}
    if status == "failed":
        summary = {"status": "failed", "error": "RuntimeError: loss is NaN at epoch 3"}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def write_seeds(root, wgas, **overrides):
    for seed, wga in zip((42, 43, 44), wgas):
        write_run(root, wga, seed=seed, **overrides)


def test_mean_std_and_delta_vs_baseline(tmp_path):
    write_seeds(tmp_path, [0.80, 0.82, 0.84], gamma=0.5)
    write_seeds(tmp_path, [0.78, 0.79, 0.80], gamma=0.0)
    rows = {r.label: r for r in aggregate(load_runs(tmp_path))}
    feat, base = rows["AGRE-KD γ=0.5"], rows["AGRE-KD γ=0"]
    assert feat.wga_by_seed == pytest.approx({42: 80.0, 43: 82.0, 44: 84.0})
    assert feat.mean == pytest.approx(82.0) and feat.std == pytest.approx(2.0)
    assert base.is_baseline and base.delta is None
    assert feat.delta == pytest.approx(3.0) and feat.avg_acc == pytest.approx(93.0)
    assert feat.group_acc == pytest.approx([99.0, 82.0, 87.0, 97.0])

    md = format_table(tmp_path)
    assert "| Method | Seed 42 | Seed 43 | Seed 44 | Mean ± Std | Δ vs Baseline |" in md
    assert "| AGRE-KD γ=0.5 | 80.00 | 82.00 | 84.00 | 82.00 ± 2.00 | +3.00 |" in md
    assert "| AGRE-KD γ=0 | 78.00 | 79.00 | 80.00 | 79.00 ± 1.00 | — |" in md


def test_one_seed_has_no_std_and_delta_needs_its_paired_baseline(tmp_path):
    write_run(tmp_path, 0.85, gamma=0.5, layers=("layer3", "layer4"))
    write_run(tmp_path, 0.80, gamma=0.5, epochs=5)  # its baseline would need epochs=5 too
    write_run(tmp_path, 0.79, gamma=0.0)
    rows = {r.label: r for r in aggregate(load_runs(tmp_path))}
    assert rows["AGRE-KD γ=0.5, layer3+layer4"].std is None
    assert rows["AGRE-KD γ=0.5, layer3+layer4"].delta == pytest.approx(6.0)
    assert rows["AGRE-KD γ=0.5, ep5"].delta is None
    md = format_table(tmp_path)
    assert "85.00 ± n/a | +6.00 |" in md and "80.00 ± n/a | n/a |" in md


def test_load_runs_statuses(tmp_path):
    write_run(tmp_path, 0.8, gamma=0.5)
    write_run(tmp_path, 0.8, status="failed", gamma=0.25)
    write_run(tmp_path, None, gamma=1.0)
    bad = write_run(tmp_path, None, gamma=0.75)
    (bad / "summary.json").write_text("{not json")
    (tmp_path / "notes").mkdir()  # not a run folder
    recs = {r.config["gamma"]: r for r in load_runs(tmp_path)}
    assert len(recs) == 4
    assert recs[0.5].finished
    assert recs[0.25].status == "failed" and "loss is NaN" in recs[0.25].reason
    assert recs[1.0].status == "incomplete" and "1/30 epochs" in recs[1.0].reason
    assert recs[0.75].status == "failed" and "unreadable" in recs[0.75].reason


def sweep_fit(fail_on):
    """A fake distill.train.fit for run_sweep: WGA by gamma and weighting, plus seed offset."""
    def fit(cfg):
        if (cfg.gamma, cfg.seed) == fail_on:
            raise RuntimeError("out of memory")
        wga = 0.80 + 0.02 * cfg.gamma + (0.01 if cfg.weighting == "agre-batch" else 0.0)
        overrides = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "cache")}
        Path(cfg.out).rmdir()
        write_run(Path(cfg.out).parent, wga + SEED_OFFSET[cfg.seed], **overrides)
        return {}
    return fit


@pytest.fixture
def sweep_dir(tmp_path):
    """The "main" and "agre-vs-aver" presets with one failed, one incomplete, one missing run."""
    runs = tmp_path / "runs"
    specs = preset_runs("main", "agre-vs-aver")
    run_sweep("c.h5", runs, specs, fit=sweep_fit(fail_on=(0.25, 43)))
    incomplete = runs / run_name({"weighting": "aver", "gamma": 1.0, "seed": 44})
    (incomplete / "summary.json").unlink()
    missing = runs / run_name({"weighting": "aver", "gamma": 0.0, "seed": 42})
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    return runs


def test_preset_tables_follow_the_report(sweep_dir):
    tables = {t.name: t for t in build_tables(sweep_dir)}
    assert list(tables) == ["main", "agre-vs-aver"]
    main = tables["main"]
    assert main.title == "Main Results" and main.seeds == [42, 43, 44]
    assert [r.label for r in main.rows][0] == "AGRE-KD + Features"
    rows = {r.label: r for r in main.rows}
    assert rows["AGRE-KD + Features"].mean == pytest.approx(82.0)   # 0.80 + 0.01 + 0.01
    assert rows["AGRE-KD + Features"].std == pytest.approx(2.0)
    assert rows["AGRE-KD + Features"].delta == pytest.approx(1.0)
    assert rows["AVER Baseline"].wga_by_seed == pytest.approx({43: 80.0, 44: 82.0})
    assert rows["AVER Baseline"].delta == pytest.approx(0.0)  # 81.00 vs 81.00
    md = format_table(sweep_dir, "main")
    assert "### Main Results" in md and "Baseline: AGRE-KD Baseline." in md
    assert "| AVER Baseline | — | 80.00 | 82.00 | 81.00 ± 1.41 | +0.00 |" in md


def test_report_lists_missing_and_failed_runs(sweep_dir):
    missing = {m["name"]: m for m in missing_runs(load_runs(sweep_dir), load_plan(sweep_dir))}
    failed = run_name({"gamma": 0.25, "alpha": 0.9, "seed": 43})
    assert set(missing) == {failed, run_name({"weighting": "agre-batch", "gamma": 0.25, "seed": 43}),
                            run_name({"weighting": "aver", "gamma": 0.25, "seed": 43}),
                            run_name({"weighting": "aver", "gamma": 1.0, "seed": 44}),
                            run_name({"weighting": "aver", "gamma": 0.0, "seed": 42})}
    assert missing[failed]["status"] == "failed"
    assert "out of memory" in missing[failed]["reason"]
    assert missing[failed]["planned_for"] == "main: Combined (α=0.9)"

    md = write_report(sweep_dir)["markdown"].read_text()
    section = md.split("## Missing or failed runs")[1].split("## Plots")[0]
    for name, m in missing.items():
        assert f"`{name}`" in section and m["status"] in section
    assert "RuntimeError: out of memory" in section
    assert "not run (no run folder)" in section and "no summary.json" in section


def test_report_files_contain_the_numbers(sweep_dir, tmp_path):
    paths = write_report(sweep_dir, tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "wga_vs_gamma", "group_accuracy", "teacher_weights"}
    md = paths["markdown"].read_text()
    assert "| AGRE-KD + Features | 80.00 | 82.00 | 84.00 | 82.00 ± 2.00 | +1.00 | 93.00 |" in md
    assert "### AGRE-KD vs AVER, paired by γ" in md and "## Teachers (test set)" in md
    assert "| dfr_seed0 | teacher | 91.00 | 93.00 | 92.00 |" in md
    assert "| erm_seed0 | biased | 93.50 |" in md
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    feat = next(r for r in rows if r["table"] == "main" and r["row"] == "AGRE-KD + Features")
    assert (feat["seed_42"], feat["wga_mean"], feat["wga_std"], feat["delta_vs_baseline"]) == (
        "80.00", "82.00", "2.00", "1.00")
    base = next(r for r in rows if r["table"] == "main" and r["is_baseline"] == "1")
    assert base["row"] == "AGRE-KD Baseline" and base["delta_vs_baseline"] == ""
    for key in ("wga_vs_gamma", "group_accuracy", "teacher_weights"):
        path = paths[key]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01
        assert f"]({path.name})" in md


def test_plots_are_skipped_and_said_so_when_runs_are_absent(tmp_path):
    write_run(tmp_path, 0.8, weights=False, gamma=0.5, seed=42)
    paths = write_report(tmp_path)
    assert "group_accuracy" in paths and "wga_vs_gamma" not in paths
    assert "teacher_weights" not in paths
    md = paths["markdown"].read_text()
    assert "`wga_vs_gamma.png` skipped: needs finished runs of one weighting (α=1, layer4) at two" in md
    assert "`teacher_weights.png` skipped: no finished run saved" in md
    assert "### All runs" in md and "None: every planned run finished." in md


def test_empty_folder_still_writes_a_report(tmp_path):
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "No finished runs." in md and "group_accuracy.png` skipped" in md
    assert format_table(tmp_path) == "No finished or planned runs.\n"


def test_adhoc_runs_next_to_presets_get_the_paired_baseline(tmp_path):
    run_sweep("c.h5", tmp_path, preset_runs("gamma", seeds=[42]), fit=sweep_fit(fail_on=None))
    write_run(tmp_path, 0.85, gamma=0.3, seed=42)  # not in any preset, not in sweep.json
    tables = {t.name: t for t in build_tables(tmp_path)}
    assert list(tables) == ["gamma", "runs"] and tables["runs"].title == "Other runs"
    (row,) = tables["runs"].rows
    assert row.label == "AGRE-KD γ=0.3" and row.delta == pytest.approx(85.0 - 79.0)
    assert missing_runs(load_runs(tmp_path), load_plan(tmp_path)) == []


def test_captions_name_the_weightings_and_tables_show_minutes_per_run(tmp_path):
    fit = sweep_fit(fail_on=None)
    run_sweep("c.h5", tmp_path, preset_runs("weighting", "main", seeds=[42]), fit=fit)
    run_sweep("c.h5", tmp_path, preset_runs("main", agre_weighting="cached", seeds=[42]), fit=fit)
    tables = {t.name: t for t in build_tables(tmp_path)}
    assert list(tables) == ["main", "main [agre_weighting=cached]", "weighting"]
    report_agre = "AGRE-KD: batch weights from the gradients of all student parameters (the study's method)"
    assert tables["weighting"].caption == (
        f"Teacher weighting: AVER; {report_agre}; per-sample AGRE-KD (the paper's formula); "
        "cached static bias-disagreement weights.")
    assert tables["main"].caption == f"Teacher weighting: {report_agre}; AVER."
    switched = tables["main [agre_weighting=cached]"]
    assert switched.title == "Main Results [agre_weighting=cached]" and switched.baseline == "AGRE-KD Baseline"
    assert switched.caption == "Teacher weighting: cached static bias-disagreement weights; AVER."
    rows = {r.label: r for r in switched.rows}
    assert rows["AGRE-KD + Features"].runs[0].config["weighting"] == "cached"
    assert rows["AGRE-KD + Features"].delta == pytest.approx(1.0)  # vs the cached γ=0 baseline
    md = format_table(tmp_path, "main [agre_weighting=cached]")
    assert "Baseline: AGRE-KD Baseline. Teacher weighting: cached static bias-disagreement weights; AVER." in md
    # Run labels never call the cached weights AGRE-KD.
    assert describe({"weighting": "cached", "gamma": 0.5}) == "Cached bias-disagreement weights (static) γ=0.5"
    assert describe({"weighting": "agre", "gamma": 0}) == "AGRE-KD per-sample (paper) γ=0"
    assert describe({"weighting": "agre-batch", "agre_params": "last", "gamma": 0}) == "AGRE-KD (last) γ=0"


def test_minutes_per_run_column_in_markdown_and_csv(tmp_path):
    for seed, seconds in ((42, 60.0), (43, 120.0)):
        write_run(tmp_path, 0.8, time_s=seconds, gamma=0.5, seed=seed)
    write_run(tmp_path, 0.8, time_s=30.0, gamma=0.0, seed=42)
    rows = {r.label: r for r in aggregate(load_runs(tmp_path))}
    assert rows["AGRE-KD γ=0.5"].minutes == pytest.approx(1.5)  # (1 + 2) / 2 minutes
    md = format_table(tmp_path)
    assert "| Mean ± Std | Δ vs Baseline | Avg Acc | Min / run |" in md
    assert "| AGRE-KD γ=0.5 | 80.00 | 80.00 | 80.00 ± 0.00 | +0.00 | 93.00 | 1.50 |" in md
    assert "| AGRE-KD γ=0 | 80.00 | — | 80.00 ± n/a | — | 93.00 | 0.50 |" in md
    paths = write_report(tmp_path)
    with open(paths["csv"]) as f:
        csv_rows = {r["row"]: r for r in csv.DictReader(f)}
    assert csv_rows["AGRE-KD γ=0.5"]["min_per_run"] == "1.50" and csv_rows["AGRE-KD γ=0"]["min_per_run"] == "0.50"
    assert csv_rows["AGRE-KD γ=0"]["weighting"].startswith("AGRE-KD: batch weights from the gradients of all")


def test_a_presets_pairs_give_its_verdicts():
    """A table with pairs (the hypothesis preset: erased against raw, ...) compares each pair,
    paired by seed, instead of every row against the baseline."""
    from types import SimpleNamespace

    from experiments.report import verdicts
    from experiments.runs import Row, Table

    def row(label, wgas):
        r = Row(label)
        r.runs = [SimpleNamespace(seed=s, test={"wga": w / 100}) for s, w in zip((42, 43, 44), wgas)]
        return r

    a, b, c = row("A", [80, 81, 82]), row("B", [85, 86, 87]), row("C", [86, 85, 87])
    table = Table("t", "t", [a, b, c], baseline="A", pairs=[("B", "A"), ("C", "B")])
    said = verdicts(table)
    assert len(said) == 2
    assert said[0].startswith("B beats A by 5.0 ± 0.0 WGA points over 3 seeds")
    assert said[1].startswith("C vs B: no difference beyond seed noise (+0.0 ± 1.0")
    table.pairs, a.is_baseline = [], True  # no pairs: every row against the baseline
    assert [s.split(" ")[0] for s in verdicts(table)] == ["B", "C"]


def test_hypothesis_preset_rows_and_pairs_reach_its_table(tmp_path):
    from experiments.report import verdicts
    from experiments.sweep import PRESETS

    specs = preset_runs("hypothesis", seeds=[42, 43])
    erased = {s["label"] for s in specs if s["overrides"].get("feature_target") == "erased"}
    assert erased == {"AGRE-KD γ=0.5, erased L4", "L2+L3+L4, erased"}
    multi = {s["label"]: s["overrides"]["layers"] for s in specs if len(s["overrides"]["layers"]) == 3}
    assert set(multi) == {"L2+L3+L4, raw", "L2+L3+L4, erased"}
    run_sweep("c.h5", tmp_path, specs, fit=sweep_fit(fail_on=None))
    table = next(t for t in build_tables(tmp_path) if t.name == "hypothesis")
    assert table.pairs == [tuple(p) for p in PRESETS["hypothesis"]["pairs"]]
    assert len(verdicts(table)) == len(table.pairs)


def test_per_group_and_standard_metric_tables_give_mean_and_std_per_row(tmp_path):
    from experiments.report import group_table, metrics_table

    write_seeds(tmp_path, [0.80, 0.82, 0.84])  # group_acc [0.99, wga, wga + 0.05, 0.97] per seed
    table = build_tables(tmp_path)[0]
    groups = group_table(table, ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"])
    row = next(line for line in groups.splitlines() if line.startswith("| AGRE-KD γ=0 |"))
    # by hand: 82 ± 2 and 87 ± 2 points (sample std of -2, 0, +2), the others constant
    assert row.split(" | ")[1:] == ["99.00 ± 0.00", "82.00 ± 2.00", "87.00 ± 2.00", "97.00 ± 0.00 |"]
    assert "landbird/water (n=466)" in groups
    standard = metrics_table(table)
    assert "| Method | Epoch | WGA | Avg Acc (train-weighted) |" in standard and "| ECE |" in standard
    assert "82.00 ± 2.00" in standard and "93.00 ± 0.00" in standard  # wga, avg_acc
    md = write_report(tmp_path)["markdown"].read_text()
    assert groups in md and standard in md


def _tabular_rows(tex: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the one tabular in ``tex``, checked to be well formed on the way."""
    assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
    for env in ("table", "tabular"):
        assert tex.count(r"\begin{" + env + "}") == tex.count(r"\end{" + env + "}") == 1
    spec = tex.split(r"\begin{tabular}{", 1)[1].split("}", 1)[0]
    inner = tex.split(r"\begin{tabular}{" + spec + "}", 1)[1].split(r"\end{tabular}", 1)[0]
    lines = [l.replace(r"\hline", "").strip() for l in inner.split(r"\\")]
    rows = [[c.strip() for c in l.split(" & ")] for l in lines if l]
    assert all(len(r) == len(spec) for r in rows), (spec, rows)
    return rows[0], rows[1:]


def test_latex_tables_bold_the_best_row_only_beyond_seed_noise(tmp_path):
    from experiments.latex import latex_table

    write_seeds(tmp_path / "a", [0.80, 0.82, 0.84])                  # AGRE-KD γ=0: 82 ± 2
    write_seeds(tmp_path / "a", [0.70, 0.75, 0.72], weighting="aver")  # 10, 7, 12 below: beyond noise
    header, body = _tabular_rows(latex_table(build_tables(tmp_path / "a")[0]))
    assert header[:3] == ["Method", "WGA", "Avg Acc"] and header[-1] == r"Oracle WGA$^\dagger$"
    cells = {row[0]: row for row in body}
    assert cells[r"AGRE-KD $\gamma$=0"][1] == r"\textbf{82.00 $\pm$ 2.00}"
    assert cells[r"AVER $\gamma$=0"][1] == r"72.33 $\pm$ 2.52"
    assert sum(c.startswith(r"\textbf") for row in body for c in row) == 1  # equal Avg Acc: no winner
    # a second row within seed noise of the best (differences -1, +1, +2 points): nothing in bold
    write_seeds(tmp_path / "b", [0.80, 0.82, 0.84])
    write_seeds(tmp_path / "b", [0.79, 0.83, 0.86], gamma=0.5)
    _, body = _tabular_rows(latex_table(build_tables(tmp_path / "b")[0]))
    assert not any(r"\textbf" in c for row in body for c in row)


def test_report_latex_writes_a_document_of_every_table(tmp_path):
    import shutil
    import subprocess

    write_seeds(tmp_path, [0.80, 0.82, 0.84])
    paths = write_report(tmp_path, latex=True)
    tex = paths["latex"].read_text()
    assert tex.startswith(r"\documentclass{article}") and tex.rstrip().endswith(r"\end{document}")
    assert r"\caption{" in tex and "val-wga" in tex and "diagnostic only, never a selection rule" in tex
    if shutil.which("pdflatex"):  # compiles where a TeX installation is at hand
        subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", paths["latex"].name],
                       cwd=paths["latex"].parent, check=True, capture_output=True, timeout=120)
