"""The embedded default: every stage on the generated synthetic data set, each step reused if done."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from experiments import defaults

DEFAULT_RUNS = (  # the README's end-to-end run: AGRE-KD with and without features, AVER
    {"weighting": "agre", "gamma": 0.0},
    {"weighting": "agre", "gamma": 0.5},
    {"weighting": "aver", "gamma": 0.0},
)


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


def run_default(epochs: int = defaults.DISTILL_EPOCHS, seeds=(42,)) -> dict:
    """Data -> teachers -> cache -> three students -> report; prints the table and the plot paths."""
    from experiments.report import format_table, write_report
    from experiments.sweep import run_sweep

    cache = ensure_cache()
    runs = [dict(r, seed=s) for r in DEFAULT_RUNS for s in seeds]
    run_sweep(str(cache), str(defaults.RUNS), runs, base={"epochs": epochs, **defaults.DISTILL_OVERRIDES})
    paths = write_report(defaults.RUNS)
    print(format_table(defaults.RUNS))
    print("report and plots: " + ", ".join(str(p) for p in paths.values()))
    return paths
