"""The embedded default: every stage on the generated synthetic data set, each step reused if done."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from core.errors import ToolError
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


def _default_teachers_current() -> bool:
    """Whether the default teachers folder holds teachers built with today's default settings."""
    from core.files import read_json_object
    from core.provenance import settings_diff
    from precompute.teachers import TeacherConfig

    record = defaults.TEACHERS / "teachers_config.json"
    if not (defaults.TEACHERS / "manifest.json").is_file() or not record.is_file():
        return False
    want = TeacherConfig(data_root=str(defaults.DATA), out=str(defaults.TEACHERS), **defaults.TEACHERS_OVERRIDES)
    return not settings_diff((read_json_object(record) or {}).get("config") or {}, want.identity())


def ensure_teachers() -> Path:
    """The default teachers; rebuilt (with the cache made from them) when the default's settings changed
    since they were built: that folder is the tool's own, not the user's."""
    manifest = defaults.TEACHERS / "manifest.json"
    if not _default_teachers_current():
        stale = manifest.is_file()
        tqdm.write(f"{'the default teachers predate its current settings: rebuilding' if stale else 'no teachers yet: building'}"
                   f" the synthetic default's teachers in {defaults.TEACHERS}")
        build_teachers_for(None, None, overwrite=stale or None)
    return manifest


def ensure_cache() -> Path:
    """The default cache; ``run_precompute`` reuses a finished one and resumes a partial one. One
    made from other teachers than today's default ones (rebuilt since) is rebuilt: like the
    teachers folder, it is the tool's own file."""
    from precompute.run import PrecomputeConfig, run_precompute

    data = ensure_data()
    manifest = ensure_teachers()
    return run_precompute(PrecomputeConfig(data_root=str(data), teachers=str(manifest), out=str(defaults.CACHE),
                                           random_views=defaults.RANDOM_VIEWS, overwrite=_cache_stale(manifest)))


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
