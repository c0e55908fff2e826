"""Does the weighting favour the better teachers (hand-made run folders), and the embedded default's student settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from distill.config import DistillConfig, run_name
from experiments import defaults
from experiments.report import favour_section, write_report
from experiments.runs import aggregate, load_runs

TEACHERS = [{"name": f"dfr_seed{i}", "role": "teacher"} for i in range(4)] + [{"name": "erm", "role": "biased"}]
VAL_WGA = [0.90, 0.60, 0.75, 0.50]  # teacher validation WGA; the biased model's below


def m(wga):
    return {"group_acc": [0.9, wga, wga, 0.9], "wga": wga, "mean_acc": 0.9, "avg_acc": 0.9}


def write_run(root: Path, weights: list[float], teacher_val=True, **overrides) -> Path:
    cfg = DistillConfig(out=str(root / run_name(overrides)), **overrides)
    out = Path(cfg.out)
    out.mkdir(parents=True)
    cfg.save(out / "config.json")
    lines = [{"epoch": e, "time_s": 1.0, "val": m(0.8), "teacher_weights": w}
             for e, w in ((1, [0.25] * 4), (2, weights))]  # only the last epoch counts
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"status": "finished", "config": cfg.to_dict(), "teachers": TEACHERS, "best_epoch": 2,
               "test_best": m(0.8), "test_last": m(0.8), "val_best": m(0.8),
               "teacher_test": {t["name"]: m(0.7) for t in TEACHERS}}
    if teacher_val:
        summary["teacher_val"] = {**{t["name"]: m(w) for t, w in zip(TEACHERS, VAL_WGA)}, "erm": m(0.1)}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_rank_correlation_per_run_and_mean_std_over_seeds(tmp_path):
    favour = [[0.4, 0.2, 0.3, 0.1], [0.4, 0.1, 0.3, 0.2], [0.1, 0.4, 0.3, 0.2]]  # rho +1, +0.8, -0.4
    for seed, w in zip((42, 43, 44), favour):
        write_run(tmp_path, w, seed=seed, weighting="agre")
    for seed in (42, 43, 44):
        write_run(tmp_path, [0.25] * 4, seed=seed, weighting="aver")
    rows = {r.label.split(" γ")[0]: r for r in aggregate(load_runs(tmp_path))}
    agre, aver = rows["AGRE-KD per-sample (paper)"], rows["AVER"]
    want = [spearmanr(w, VAL_WGA).statistic for w in favour]
    assert [agre.spearman_by_seed[s] for s in (42, 43, 44)] == pytest.approx(want)
    assert want == pytest.approx([1.0, 0.8, -0.4])
    mean, std, n = agre.spearman
    assert n == 3 and mean == pytest.approx(sum(want) / 3) and std == pytest.approx(0.7571877794400365)
    assert set(aver.spearman_by_seed.values()) == {None} and aver.spearman == (None, None, 0)  # uniform: undefined

    md = favour_section([agre, aver])
    assert "Does the weighting favour the better teachers?" in md
    assert "| +1.00 | +0.80 | -0.40 | +0.47 ± 0.76 | 3 |" in md
    assert "| n/a | n/a | n/a | n/a | 0 |" in md
    report = write_report(tmp_path)["markdown"].read_text()
    assert "+0.47 ± 0.76" in report


def test_runs_without_teacher_val_read_as_na(tmp_path):
    write_run(tmp_path, [0.4, 0.1, 0.3, 0.2], teacher_val=False)
    (run,) = load_runs(tmp_path)
    assert run.weight_wga_spearman is None


def test_embedded_default_student_settings_unless_the_user_sets_them(tmp_path):
    wanted = {**defaults.DISTILL_OVERRIDES, "epochs": defaults.DISTILL_EPOCHS}
    overrides, message = defaults.student_defaults_for(str(defaults.CACHE), {})
    assert overrides == wanted and len(message.splitlines()) == 1 and "lr=0.005" in message
    overrides, message = defaults.student_defaults_for(str(defaults.CACHE), {"lr": 0.1, "gamma": 0.5})
    assert overrides == {k: v for k, v in wanted.items() if k != "lr"} and "lr=" not in message
    assert defaults.student_defaults_for(str(defaults.CACHE), dict.fromkeys(wanted, 1)) == ({}, "")
    assert defaults.student_defaults_for(str(tmp_path / "cache.h5"), {}) == ({}, "")  # another cache: untouched
    # the user's own epochs leave no room for the warm-up: no warm-up rather than a refused config
    overrides, _ = defaults.student_defaults_for(str(defaults.CACHE), {"epochs": 1})
    DistillConfig(**overrides, epochs=1)


def test_cli_distill_and_sweep_take_them_on_the_default_cache(monkeypatch):
    from click.testing import CliRunner

    import cli
    import distill.train

    seen = {}
    monkeypatch.setattr(distill.train, "fit", lambda cfg, **kw: seen.setdefault("cfg", cfg) and None)
    runner = CliRunner()
    runner.invoke(cli.cli, ["distill", "--gamma", "0.5", "--lr", "0.02"])
    cfg = seen["cfg"]
    assert (cfg.lr, cfg.epochs, cfg.warmup_epochs) == (0.02, defaults.DISTILL_EPOCHS,
                                                      defaults.DISTILL_OVERRIDES["warmup_epochs"])
    seen.clear()
    runner.invoke(cli.cli, ["distill", "--cache", "elsewhere.h5", "--gamma", "0.5"])
    assert (seen["cfg"].lr, seen["cfg"].epochs) == (DistillConfig.lr, DistillConfig.epochs)
    result = runner.invoke(cli.cli, ["sweep", "--out", "unused", "--plan", "--gamma", "0", "--seeds", "42",
                                     "--epochs", "3"])
    plan = json.loads(result.stdout)
    assert plan["base"] == {**defaults.DISTILL_OVERRIDES, "epochs": 3}  # the user's --epochs wins
    settings = plan["tables"][0]["rows"][0]["settings"]
    assert (settings["lr"], settings["epochs"]) == (defaults.DISTILL_OVERRIDES["lr"], 3)
