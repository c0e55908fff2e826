"""`report --reference`: the study's numbers (experiments/study_tables.json), their checks, the column."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from core.errors import ConfigError
from experiments.reference import STUDY_FILE, load_study, study_column, validate
from experiments.report import format_table, write_report
from experiments.runs import Row, Table
from experiments.sweep import PRESETS, preset_runs, run_sweep

REPORTED = ("main", "agre-vs-aver", "gamma", "labels", "multilayer", "disagree")


def raw() -> dict:
    return json.loads(STUDY_FILE.read_text(encoding="utf-8"))


def hand_row(label: str, wgas, minutes: float = 2.0) -> Row:
    """A Row of finished runs for seeds 42, 43, ... with these test WGAs (percent)."""
    row = Row(label)
    row.runs = [SimpleNamespace(seed=s, test={"wga": w / 100, "avg_acc": 0.9}, epoch_seconds=60 * minutes,
                                select_rule="val-wga", selected_epoch=1, oracle=None)
                for s, w in zip((42, 43, 44), wgas)]
    row.seeds = [r.seed for r in row.runs]
    return row


# ----------------------------------------------------------------------------- the data file

def test_every_label_of_the_data_file_is_a_row_of_its_preset():
    presets = raw()["presets"]
    assert set(presets) == set(REPORTED)
    for preset, rows in presets.items():
        labels = [r["label"] for r in PRESETS[preset]["rows"]]
        assert set(rows) <= set(labels), (preset, sorted(set(rows) - set(labels)))
    # The study reports every row of these presets.
    assert all(set(presets[p]) == {r["label"] for r in PRESETS[p]["rows"]} for p in REPORTED)
    study = load_study()
    assert study.presets.keys() == presets.keys()


def test_a_few_numbers_as_the_report_printed_them():
    study = load_study()

    def number(preset, label):
        entry = study.row(preset, label)
        return entry.mean, entry.std, entry.source

    assert number("main", "AGRE-KD + Features") == (85.57, 0.36, "Main Results")
    assert number("main", "AVER Baseline") == (83.95, 0.95, "Main Results")
    assert number("main", "Multi-Layer (L3+L4)") == (85.20, None, "Main Results")
    assert number("gamma", "γ=0.00") == (84.62, 1.06, "A1: Feature Weight (γ) Sensitivity")
    assert number("gamma", "γ=0.05") == (83.96, None, "A1: Feature Weight (γ) Sensitivity")
    assert "84.48 ± 1.02" in study.row("gamma", "γ=0.00").note  # the per-seed table's value
    assert number("agre-vs-aver", "AVER γ=0.25") == (84.42, None, "A2: AGRE-KD vs AVER Across γ Values")
    assert number("multilayer", "L2 + L3 + L4") == (84.74, None, "Experiment 5: Multi-Layer Distillation")
    assert number("labels", "Combined (α=0.9, γ=0.25)")[:2] == (84.16, None)
    assert number("disagree", "Disagree-Weight Features")[:2] == (85.31, None)
    assert study.row("weighting", "AVER (uniform) γ=0.00") is None  # not in the study


@pytest.mark.parametrize("change, message", [
    (lambda d: d["presets"]["main"].update({"AGRE-KD + Feature": {"mean": 1, "std": None, "source": "x"}}),
     "row 'AGRE-KD + Feature', which preset 'main' does not have"),
    (lambda d: d["presets"].update({"mian": {}}), "preset 'mian' is not a sweep preset"),
    (lambda d: d["presets"]["main"]["AVER Baseline"].update(mean="83.95"), "mean must be a number"),
    (lambda d: d["presets"]["main"]["AVER Baseline"].update(std=-1), "std (or null) must be a percentage"),
    (lambda d: d["presets"]["main"]["AVER Baseline"].pop("source"), "missing source"),
    (lambda d: d["presets"]["main"]["AVER Baseline"].update(sdt=1), "unknown key(s) sdt"),
    (lambda d: d.update(version=2), "version must be 1"),
    (lambda d: d.pop("study"), '"study" must be an object'),
])
def test_a_malformed_file_is_a_clear_error(tmp_path, change, message):
    data = raw()
    change(data)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match="study.json") as err:
        load_study(path)
    assert message in str(err.value)


def test_a_file_that_is_not_json_or_not_there(tmp_path):
    (tmp_path / "bad.json").write_text('{"version": 1,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_study(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="missing"):
        load_study(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        validate([1, 2], "x.json")


# ----------------------------------------------------------------------------- the column

def test_the_column_sits_after_mean_and_std_with_footnotes():
    rows = [hand_row("AGRE-KD + Features", [85.0, 86.0, 87.0]),
            hand_row("AGRE-KD Baseline", [84.0, 84.0, 85.0]), hand_row("AVER + Features", [84.0, 85.0, 86.0])]
    table = Table("main", "Main Results", rows, baseline="AGRE-KD Baseline")
    rows[1].is_baseline = True
    plain = format_table(table)
    assert "Study" not in plain and plain.endswith("|\n")
    md = format_table(table, reference=True)
    assert "| Method | Seed 42 | Seed 43 | Seed 44 | Mean ± Std | Study | Δ vs Baseline | Avg Acc | Min / run |" in md
    assert "| AGRE-KD + Features | 85.00 | 86.00 | 87.00 | 86.00 ± 1.00 | 85.57 ± 0.36 [1] |" in md
    assert "| AVER + Features | 84.00 | 85.00 | 86.00 | 85.00 ± 1.00 | 84.89 |" in md
    assert "| AGRE-KD Baseline | 84.00 | 84.00 | 85.00 | 84.33 ± 0.58 | 84.62 ± 1.06 [2] | — |" in md
    assert 'from its table "Main Results"' in md and "real Waterbirds" in md
    assert "[2] AGRE-KD Baseline: A3: Seed Variance Analysis prints the baseline (γ=0) as 84.48 ± 1.02" in md
    # The same title, caption and rows; each row with one cell more.
    assert md.split("\n\n")[:2] == plain.split("\n\n")[:2]
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert [line.count(" | ") for line in lines] == [line.count(" | ") + 1 for line in plain.splitlines()
                                                     if line.startswith("|")]


def test_rows_and_tables_the_study_does_not_have():
    odd = Table("main [epochs=5]", "Main Results [epochs=5]", [hand_row("AGRE-KD + Features", [80, 81]),
                                                               hand_row("Something else", [70, 71])])
    column = study_column(odd)
    assert column.cells == ["85.57 ± 0.36 [1]", "—"]
    assert "this table's runs differ ([epochs=5])" in column.footnotes[0]
    demo = Table("demo", "Demo", [hand_row("AVER γ=0", [70, 71])])
    assert study_column(demo).cells == ["—"]
    assert study_column(demo).footnotes == ["Study: the study reports no table for this preset."]
    other = Table("runs", "Other runs", [hand_row("AGRE-KD γ=0.3", [70, 71])])
    assert study_column(other) is None
    assert "Study" not in format_table(other, reference=True)


# ----------------------------------------------------------------------------- the command

def fake_fit(cfg):
    """A finished run as distill.train.fit leaves it, WGA 0.80 + gamma / 10."""
    out = Path(cfg.out)
    cfg.save(out / "config.json")
    test = {"wga": 0.80 + cfg.gamma / 10, "avg_acc": 0.9, "mean_acc": 0.9, "group_acc": [0.9, 0.8, 0.8, 0.9]}
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "time_s": 6.0, "val": test}) + "\n")
    (out / "summary.json").write_text(json.dumps({"status": "finished", "config": cfg.to_dict(),
                                                  "test_best": test, "val_best": test}))


def test_report_reference_prints_and_writes_the_column(tmp_path):
    from cli import cli

    runs = tmp_path / "runs"
    run_sweep("c.h5", runs, preset_runs("labels", "demo", seeds=[42]), fit=fake_fit)
    plain = CliRunner().invoke(cli, ["report", str(runs)])
    assert plain.exit_code == 0, plain.output
    assert "Study" not in plain.output and "Study" not in (runs / "report" / "report.md").read_text()
    result = CliRunner().invoke(cli, ["report", str(runs), "--reference"])
    assert result.exit_code == 0, result.output
    assert "| Feature only (α=1.0, γ=0.25) | 82.50 | 82.50 ± n/a | 85.20 [1] | — |" in result.output
    assert 'Study: test WGA (%) as the study printed it' in result.output
    md = (runs / "report" / "report.md").read_text()
    assert "| Combined (α=0.9, γ=0.25) | 82.50 | 82.50 ± n/a | 84.16 [2] |" in md
    assert "| AVER γ=0 | 80.00 | 80.00 ± n/a | — |" in md  # the demo: not in the study
    with open(runs / "report" / "report.csv") as f:
        by_row = {r["row"]: r for r in csv.DictReader(f)}
    assert by_row["Feature only (α=1.0, γ=0.25)"]["study_wga_mean"] == "85.20"
    assert by_row["Feature only (α=1.0, γ=0.25)"]["study_wga_std"] == ""
    assert by_row["Feature only (α=1.0, γ=0.25)"]["study_source"] == "Experiment 3: Class Labels (α < 1)"
    assert by_row["AVER γ=0"]["study_wga_mean"] == ""


def test_write_report_without_the_flag_has_no_study_columns(tmp_path):
    run_sweep("c.h5", tmp_path, preset_runs("labels", seeds=[42]), fit=fake_fit)
    paths = write_report(tmp_path)
    with open(paths["csv"]) as f:
        assert not any(h.startswith("study_") for h in next(csv.reader(f)))
