"""The embedded default: every stage on the generated synthetic data set, each step reused if done."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from experiments import defaults

def ensure_data() -> Path:
    """The synthetic data set, generated on first use."""
    if not (defaults.DATA / "metadata.csv").is_file():
        from data.synth import SynthSpec, generate

        tqdm.write(f"generating the synthetic data set in {defaults.DATA}")
        generate(defaults.DATA, SynthSpec())
    return defaults.DATA


def build_teachers_for(data_root: str | None, out: str | None, **opts):
    """Teachers for a given folder, or the synthetic default's (its sizes) when none is given."""
    from precompute.teachers import TeacherConfig, build_teachers

    given = {k: v for k, v in opts.items() if v is not None}
    if data_root is None:
        data_root = str(ensure_data())
        given = {**defaults.TEACHERS_OVERRIDES, **given}
    return build_teachers(TeacherConfig(data_root=data_root, out=out or str(defaults.TEACHERS), **given))


def ensure_teachers() -> Path:
    manifest = defaults.TEACHERS / "manifest.json"
    if not manifest.is_file():
        tqdm.write(f"no teachers yet: building the synthetic default's teachers in {defaults.TEACHERS}")
        build_teachers_for(None, None)
    return manifest


def ensure_cache() -> Path:
    """The default cache; ``run_precompute`` reuses a finished one and resumes a partial one."""
    from precompute.run import PrecomputeConfig, run_precompute

    data = ensure_data()
    manifest = ensure_teachers()
    return run_precompute(PrecomputeConfig(data_root=str(data), teachers=str(manifest),
                                           out=str(defaults.CACHE), random_views=defaults.RANDOM_VIEWS))


def run_default(epochs: int = defaults.DISTILL_EPOCHS, seeds=defaults.DEMO_SEEDS) -> dict:
    """Data -> teachers -> cache -> the demo table's students (AVER, the study's AGRE-KD with and
    without features, the paper's per-sample AGRE-KD; each seed) -> report. Prints the table, how
    settled each row's validation WGA was, what the table shows in words, and the wall time."""
    import time

    from experiments.report import format_table, verdicts, write_report
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
    print("Synthetic data, not Waterbirds. Report and plots: " + ", ".join(str(p) for p in paths.values()))
    print(f"demo wall time: {(time.time() - start) / 60:.1f} min")
    return paths
