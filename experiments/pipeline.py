"""The embedded default: every stage on the generated synthetic data set, each step reused if done."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import ToolError
from core.files import atomic_write_json
from experiments import defaults


def _generated(folder: Path, spec) -> Path:
    """``folder`` holding the synthetic data set of ``spec``: generated on first use, and again when
    the default's spec changed (the folder is the tool's own, not the user's)."""
    import shutil

    from data.synth import generate, made_with

    if not made_with(folder, spec):
        if folder.exists():
            shutil.rmtree(folder)
        tqdm.write(f"generating the synthetic data set in {folder}")
        generate(folder, spec)
    return folder


def ensure_data() -> Path:
    """The synthetic data set (defaults.SYNTH)."""
    from data.synth import SynthSpec

    return _generated(defaults.DATA, SynthSpec(**defaults.SYNTH))


def ensure_pretrained() -> Path:
    """The default's stand-in for ImageNet weights: a backbone trained to tell the four (bird,
    background) pairs apart on a generated set where they are independent (defaults.PRETRAIN_*)."""
    from core.files import read_json_object
    from data.folders import fingerprint, load_metadata
    from data.synth import SynthSpec
    from precompute.teachers import TeacherConfig, pretrain_backbone, recorded_identity

    data = _generated(defaults.PRETRAIN / "data", SynthSpec(**defaults.PRETRAIN_SYNTH))
    cfg = TeacherConfig(data_root=str(data), out=str(defaults.PRETRAIN), **defaults.PRETRAIN_OVERRIDES)
    want = json.loads(json.dumps({"config": cfg.identity(),
                                  "dataset_fingerprint": fingerprint(load_metadata(data))}))
    record = defaults.PRETRAIN / "backbone_config.json"
    held = read_json_object(record) if record.is_file() else None
    if held is not None:  # recorded by an older version: the same identity in today's names
        held = {**held, "config": recorded_identity(held.get("config"))}
    if defaults.PRETRAINED.is_file() and held == want:
        return defaults.PRETRAINED
    for stale in (defaults.PRETRAINED, defaults.PRETRAINED.with_name(defaults.PRETRAINED.name + ".ckpt"),
                  record):
        stale.unlink(missing_ok=True)
    tqdm.write(f"pretraining the default's backbone on {data} (bird x background, independent)")
    pretrain_backbone(cfg, defaults.PRETRAINED)
    atomic_write_json(record, want)
    return defaults.PRETRAINED


def build_teachers_for(data_root: str | None, out: str | None, **opts):
    """Teachers for a given folder, or the synthetic default's (its sizes) when none is given."""
    from precompute.teachers import TeacherConfig, build_teachers

    given = {k: v for k, v in opts.items() if v is not None}
    if data_root is None:
        data_root = str(ensure_data())
        if "weights_file" not in given and "pretrained" not in given:
            ensure_pretrained()
        given = {**defaults.TEACHERS_OVERRIDES, **given}
    return build_teachers(TeacherConfig(data_root=data_root, out=out or str(defaults.TEACHERS), **given))


def _default_teachers_current() -> bool:
    """Whether the default teachers folder holds teachers built with today's default settings and data."""
    from core.files import read_json_object
    from core.provenance import settings_diff
    from data.folders import fingerprint, load_metadata
    from precompute.teachers import TeacherConfig, recorded_identity

    record = read_json_object(defaults.TEACHERS / "teachers_config.json") if (
        defaults.TEACHERS / "teachers_config.json").is_file() else None
    if not (defaults.TEACHERS / "manifest.json").is_file() or not record:
        return False
    want = TeacherConfig(data_root=str(defaults.DATA), out=str(defaults.TEACHERS),
                         **defaults.TEACHERS_OVERRIDES)
    return (not settings_diff(recorded_identity(record.get("config")) or {}, want.identity())
            and record.get("dataset_fingerprint") == fingerprint(load_metadata(defaults.DATA)))


def ensure_teachers() -> Path:
    """The default teachers; rebuilt (with the cache made from them) when the default's settings or
    data changed since they were built: that folder is the tool's own, not the user's. Prints the
    scenario's numbers when it builds them."""
    manifest = defaults.TEACHERS / "manifest.json"
    ensure_data()
    ensure_pretrained()
    if not _default_teachers_current():
        stale = manifest.is_file()
        doing = ("the default teachers predate its current settings: rebuilding" if stale
                 else "no teachers yet: building")
        tqdm.write(f"{doing} the synthetic default's teachers in {defaults.TEACHERS}")
        # the pretrained backbone was ensured above: named, so that it is not fingerprinted again
        man = build_teachers_for(None, None, overwrite=True, weights_file=str(defaults.PRETRAINED))
        from precompute.teachers import describe

        tqdm.write(describe(man) + "\n" + scenario_report(man))
    return manifest


def ensure_cache() -> Path:
    """The default cache; ``run_precompute`` reuses a finished one and resumes a partial one. One
    made from other teachers than today's default ones (rebuilt since) is rebuilt: like the
    teachers folder, it is the tool's own file."""
    from precompute.run import PrecomputeConfig, run_precompute

    data = ensure_data()
    manifest = ensure_teachers()
    return run_precompute(PrecomputeConfig(data_root=str(data), teachers=str(manifest),
                                           out=str(defaults.CACHE), random_views=defaults.RANDOM_VIEWS,
                                           overwrite=_cache_stale(manifest)))


def _cache_stale(manifest: Path) -> bool:
    """Whether the default cache exists and holds other models than ``manifest`` names."""
    from cache.reader import open_cache
    from core.manifest import read_manifest

    if not defaults.CACHE.is_file():
        return False
    try:
        with open_cache(defaults.CACHE, require_complete=False) as reader:
            cached = [m.get("sha256") for m in reader.meta.teachers]
    except ToolError:
        return True  # unreadable or damaged: the tool's own file, rebuilt
    stale = cached != [m.sha256 for m in read_manifest(manifest).models]
    if stale:
        tqdm.write(f"the default cache {defaults.CACHE} was made from other teachers: rebuilding it")
    return stale


def run_default(epochs: int = defaults.DISTILL_EPOCHS, seeds=defaults.DEMO_SEEDS) -> dict:
    """Data -> teachers -> cache -> the demo table's students (AVER, the study's AGRE-KD with and
    without features, the paper's per-sample AGRE-KD; each seed) -> report. Prints the table, how
    settled each row's validation WGA was, what the table shows in words, and the wall time."""
    import time

    from experiments.report import format_table, verdicts, weights_found, write_report
    from experiments.runs import build_tables
    from experiments.sweep import preset_runs, run_sweep

    start = time.time()
    cache = ensure_cache()
    run_sweep(str(cache), str(defaults.RUNS), preset_runs("demo", seeds=list(seeds)),
              base={"epochs": epochs, **defaults.DISTILL_OVERRIDES})
    paths = write_report(defaults.RUNS)
    table = next(t for t in build_tables(defaults.RUNS) if t.name.split(" ")[0] == "demo")
    print(format_table(table))
    print("Validation WGA over each run's last 5 epochs (max - min, mean over seeds; small = settled): "
          + "; ".join(f"{r.label} {r.val_spread:.1f}" for r in table.rows if r.val_spread is not None))
    for line in verdicts(table):
        print(line)
    print("Does the weighting find the debiased teachers?")
    for line in weights_found(table.rows):
        print("  " + line)
    print("Synthetic data, not Waterbirds. Report and plots: " + ", ".join(str(p) for p in paths.values()))
    print(f"demo wall time: {(time.time() - start) / 60:.1f} min")
    return paths


def scenario_problems(man, summary: dict) -> list[str]:
    """Every bound of ``defaults.SCENARIO`` that the teachers in ``man`` (with their ensemble's
    ``summary``, precompute.teachers.ensemble_summary) miss, in words; [] when the scenario holds."""
    b = defaults.SCENARIO
    problems = []

    def test(m):
        return m.metrics["test"]

    def worst_two(metrics):
        order = sorted(range(len(metrics["group_acc"])), key=lambda g: metrics["group_acc"][g])
        return {metrics["group_names"][g] for g in order[:2]}

    minority = set(defaults.MINORITY_GROUPS)
    biased = test(man.biased)
    if biased["avg_acc"] < b["biased_avg_min"] or biased["wga"] > b["biased_wga_max"]:
        problems.append(f"the biased model's test avg acc {100 * biased['avg_acc']:.1f} / WGA "
                        f"{100 * biased['wga']:.1f} (wanted >= {100 * b['biased_avg_min']:.0f} / <= "
                        f"{100 * b['biased_wga_max']:.0f})")
    if worst_two(biased) != minority:
        problems.append(f"the biased model's two worst groups are {sorted(worst_two(biased))}, "
                        "not the minority ones")
    wga = [test(m)["wga"] for m in man.teachers]
    strong = [w for w in wga if w >= b["strong_wga_min"]]
    weak = [m for m in man.teachers if test(m)["wga"] <= b["weak_wga_max"] and worst_two(test(m)) & minority]
    if len(strong) < 2 or len(weak) < 2:
        problems.append(f"teachers' test WGA {' / '.join(f'{100 * w:.1f}' for w in wga)}: wanted two >= "
                        f"{100 * b['strong_wga_min']:.0f} and two <= {100 * b['weak_wga_max']:.0f} "
                        "failing a minority group")
    aver = (summary.get("aver") or {}).get("test")
    if strong and (aver is None or aver["wga"] > np.mean(strong) - b["aver_gap_min"]):
        problems.append(f"the AVER ensemble's test WGA {100 * aver['wga']:.1f} is not "
                        f"{100 * b['aver_gap_min']:.0f} points below the strong teachers' mean "
                        f"{100 * np.mean(strong):.1f}" if aver else
                        "no AVER ensemble numbers")
    probe = summary.get("attribute_probe")
    if probe is None or probe["test"] < b["attribute_probe_min"]:
        problems.append(f"the attribute probe reads {100 * probe['test']:.1f}% on test rows (wanted >= "
                        f"{100 * b['attribute_probe_min']:.0f})" if probe else "no attribute probe")
    return problems


def scenario_report(man) -> str:
    """One line: whether the default's teachers have the scenario's structure (defaults.SCENARIO)."""
    from precompute.teachers import read_ensemble

    problems = scenario_problems(man, read_ensemble(man))
    if not problems:
        return ("scenario: as intended (biased model relies on the background; strong and weak teachers; "
                "the AVER ensemble far below the strong ones; the backbone's features carry the background)")
    return "scenario NOT as intended: " + "; ".join(problems)
