"""Command line: each command parses options, builds a config and calls one library function."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from cli_cache import cache
from core.constants import ARCHS, DFR_ALIASES, DFR_VARIANTS
from distill.config import SELECT_RULES
from cli_options import (dataset_options, default_of, floats, friendly, ints, main_process, renamed, setting,
                         words)
from experiments import defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Group-robust ensemble knowledge distillation: teachers -> cache -> student -> report."""
    from core.runtime import keep_freed_memory

    keep_freed_memory()


# ---------------------------------------------------------------- data
@cli.group()
def data():
    """Generate the synthetic data set or check a Waterbirds folder."""


@data.command("synth")
@click.option("--out", default=str(defaults.DATA), show_default=True, help="Folder to write.")
@click.option("--scale", default=0.25, show_default=True, help="Fraction of the real group counts.")
@click.option("--size", default=48, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--independent", is_flag=True, help="Birds independent of backgrounds (a pretraining set).")
@friendly
def data_synth(out, scale, size, seed, independent):
    """Write synthetic Waterbirds (metadata.csv + images) in the real layout, as the demo draws it
    (birds by shape only, under pixel noise: experiments/defaults.py SYNTH)."""
    from data.synth import SynthSpec, generate
    from data.folders import count_table, load_metadata

    generate(out, SynthSpec(**{**defaults.SYNTH, "scale": scale, "size": size, "seed": seed,
                               "independent": independent}))
    click.echo(f"wrote {out}\n{count_table(load_metadata(out))}")


@data.command("check")
@click.option("--root", required=True, type=click.Path(),
              help="Data folder (Waterbirds: the folder or its parent).")
@dataset_options
@friendly
def data_check(root, dataset, dataset_options):
    """Print split x group counts and every problem found; non-zero exit on any problem."""
    from data.folders import check_folder, count_table

    meta, problems = check_folder(root, dataset, **dataset_options)
    if meta is not None:
        click.echo(f"{meta.root}: {len(meta)} rows\n{count_table(meta)}")
    if problems:
        click.echo(f"{len(problems)} problem(s):", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    click.echo("no problems found")


# ---------------------------------------------------------------- teachers
@cli.group(invoke_without_command=True)
@click.option("--data-root", type=click.Path(), default=None,
              help="Data folder [default: the synthetic default].")
@click.option("--out", type=click.Path(), default=None,
              help=f"Teachers folder [default: {defaults.TEACHERS}].")
@click.option("--num-teachers", default=None, type=int, help="DFR teachers [default: 5].")
@click.option("--seed", default=None, type=int, help="First ERM seed [default: 0].")
@click.option("--epochs", default=None, type=int, help="ERM epochs [default: 100; synthetic default 3].")
@click.option("--image-size", default=None, type=int, help="Training view size [default: 224; synthetic 24].")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="Backbone [default: resnet50 (the study's); synthetic resnet18-w16].")
@click.option("--lr", default=None, type=float, help="ERM learning rate [default: 1e-3; synthetic 1e-2].")
@click.option("--pretrained/--no-pretrained", default=None,
              help="ImageNet init [default: on; synthetic off].")
@click.option("--weights-file", type=click.Path(exists=True), default=None,
              help="Local ImageNet ResNet-50 weights.")
@click.option("--resize", type=click.Choice(["keep-aspect", "squash"]), default=None,
              help="First transform: Resize(256) keeping the aspect ratio (the "
                   "study's) or Resize((256, 256)) (DFR's) [default: keep-aspect].")
@click.option("--shared-backbone", is_flag=True, default=None, help="One ERM backbone, T DFR heads.")
@click.option("--dfr", type=click.Choice([*DFR_VARIANTS, *DFR_ALIASES]), default=None,
              metavar=f"[{'|'.join(DFR_VARIANTS)}]", callback=renamed(DFR_ALIASES),
              help="DFR protocol: the study's dfr.py (lbfgs, L2, C=1, one balanced subsample), the DFR "
                   "authors' reference (L1, C tuned, 20 subsamples, scaler fit on train), or the tool's "
                   "earlier variant [default: study; 'report' is its deprecated name].")
@click.option("--dfr-bias", default=None, help="Per teacher, how much of the training split's spurious "
              "correlation its DFR data keeps, e.g. 0,0,0,0.6,0.8 (0: balanced).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default=None,
              help="Of ERM training and the DFR embeddings; float64 makes a "
                   "from-scratch backbone the same on any machine, at a cost (docs/method.md#dfr) [default: "
                   "float32; synthetic float64].")
@click.option("--overwrite", is_flag=True, default=None,
              help="Rebuild teachers that --out holds from other settings or data.")
@click.option("--device", default="auto", show_default=True)
@dataset_options
@click.pass_context
@friendly
def teachers(ctx, data_root, out, dfr_bias, **opts):
    """Build ERM + DFR teachers and the biased model (or `teachers import` your own)."""
    if ctx.invoked_subcommand is not None:
        return
    opts["dfr_bias"] = floats(dfr_bias, "--dfr-bias")
    from experiments.pipeline import build_teachers_for, scenario_report
    from precompute.teachers import describe

    man = build_teachers_for(data_root, out, **opts)
    click.echo(describe(man))
    if data_root is None:
        click.echo(scenario_report(man))
    click.echo(f"manifest: {man.root / 'manifest.json'} (table also in {man.root / 'eval.md'})")


@teachers.command("import")
@click.option("--out", required=True, type=click.Path(), help="Folder for manifest.json.")
@click.option("--teacher", "teacher_files", multiple=True, required=True, type=click.Path(),
              help="Teacher checkpoint (repeat).")
@click.option("--biased", "biased_file", required=True, type=click.Path(), help="Biased (ERM) checkpoint.")
@click.option("--arch", default="resnet50", show_default=True)
@click.option("--num-classes", default=2, show_default=True)
@click.option("--image-size", default=224, show_default=True)
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Were they ImageNet-initialised?")
@click.option("--resize", type=click.Choice(["keep-aspect", "squash"]), default="keep-aspect",
              show_default=True,
              help="How their images were resized: Resize(256) (aspect kept) or Resize((256, 256)).")
@click.option("--data-root", type=click.Path(), default=None, help="Evaluate them on this folder.")
@dataset_options
@friendly
def teachers_import(out, teacher_files, biased_file, arch, num_classes, image_size, pretrained, resize,
                    data_root, dataset, dataset_options):
    """Write a manifest for existing checkpoints (state dicts or {"model_state_dict": ...})."""
    from precompute.teachers import format_eval_table, import_teachers

    man = import_teachers(out, list(teacher_files), biased_file, arch, num_classes, image_size, pretrained,
                          data_root, resize, dataset=dataset, dataset_options=dataset_options)
    if data_root:
        click.echo(format_eval_table(man))

    click.echo(f"manifest: {Path(out) / 'manifest.json'} ({len(man.teachers)} teachers + biased)")


# ---------------------------------------------------------------- precompute and cache
@cli.command()
@click.option("--data-root", type=click.Path(), default=None,
              help="Data folder [default: synthetic default].")
@click.option("--teachers", "manifest", type=click.Path(), default=None, help="Teacher manifest.json.")
@click.option("--out", type=click.Path(), default=None, help=f"Cache file [default: {defaults.CACHE}].")
@click.option("--views", "random_views", default=None, type=int,
              help=f"Random crops K stored per training image besides the eval view: with K >= the student's "
                   f"epochs it sees a distinct crop every epoch [default: 30, the study's epochs; synthetic "
                   f"{defaults.RANDOM_VIEWS}].")
@click.option("--layers", default="layer2,layer3,layer4", show_default=True)
@click.option("--resize", type=click.Choice(["keep-aspect", "squash"]), default=None,
              help="First transform of every view [default: as the teachers' manifest says].")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--shard", default="", help="Write shard i/n (0-based) only.")
@click.option("--overwrite", is_flag=True,
              help="Delete a cache at --out made for other inputs and rebuild it.")
@click.option("--device", default="auto", show_default=True)
@dataset_options
@friendly
def precompute(data_root, manifest, out, random_views, layers, resize, batch_size, shard, overwrite, device,
               dataset, dataset_options):
    """Run every teacher once and write the HDF5 cache (+ the pre-decoded image store)."""
    from cache.info import format_summary, summarize
    from experiments.pipeline import ensure_data, ensure_teachers
    from precompute.run import PrecomputeConfig, run_precompute

    if data_root is None:
        data_root = str(ensure_data())
        manifest = manifest or str(ensure_teachers())
        random_views = defaults.RANDOM_VIEWS if random_views is None else random_views
    elif manifest is None or out is None:
        raise click.UsageError("--teachers and --out are required with --data-root (the defaults belong "
                               "to the synthetic data set)")
    given = {} if random_views is None else {"random_views": random_views}
    cfg = PrecomputeConfig(data_root=data_root, teachers=manifest, out=out or str(defaults.CACHE), **given,
                           layers=words(layers), resize=resize, batch_size=batch_size, shard=shard,
                           overwrite=overwrite, device=device, dataset=dataset, dataset_options=dataset_options)
    path = run_precompute(cfg)
    if main_process():
        click.echo(format_summary(summarize(path)))


cli.add_command(cache)


# ---------------------------------------------------------------- distill
def distill_options(fn):
    from distill.config import FEATURE_TARGETS
    from core.constants import AGRE_PARAMS, WEIGHTINGS
    from distill.config import DATA_MODES, FEATURE_WEIGHTINGS, KEEP_CHECKPOINTS, DistillConfig

    d = functools.partial(default_of, DistillConfig)
    opts = [
        click.option("--cache", "cache_path", type=click.Path(), default=str(defaults.CACHE),
                     show_default=True),
        click.option("--gamma", default=d("gamma"), show_default=True, help="Feature-loss weight."),
        click.option("--alpha", default=d("alpha"), show_default=True, help="KD weight against CE."),
        click.option("--tau", default=d("tau"), show_default=True),
        click.option("--weighting", type=click.Choice(WEIGHTINGS), default=d("weighting"), show_default=True,
                     help="Teacher weights: agre-batch = the study's AGRE-KD (one weight per teacher per batch, "
                          "from gradient cosines); agre = the paper's per-sample AGRE-KD; "
                          "cached = static weights written by precompute (for two classes: 'the teacher's "
                          "argmax differs from the biased model's', against a uniform student: not the "
                          "student's gradients); aver = uniform."),
        click.option("--agre-params", type=click.Choice(AGRE_PARAMS), default=d("agre_params"),
                     show_default=True,
                     help="agre-batch: gradients of all student parameters (the study), layer4 + classifier, "
                          "or the classifier only (closed form)."),
        click.option("--layers", default=",".join(d("layers")), show_default=True, help="e.g. layer3,layer4"),
        click.option("--layer-gammas", default=None, help="Per-layer gammas, e.g. 0.25,0.5"),
        click.option("--feature-weighting", type=click.Choice(FEATURE_WEIGHTINGS),
                     default=d("feature_weighting"), show_default=True),
        click.option("--feature-target", type=click.Choice(FEATURE_TARGETS), default=d("feature_target"),
                     show_default=True,
                     help="The teachers' features as cached (raw), or with the spurious attribute "
                          "erased (LEACE fit on the validation split)."),
        click.option("--epochs", default=d("epochs"), show_default=True),
        click.option("--select", type=click.Choice(SELECT_RULES), default=d("select"), show_default=True,
                     help="Model selection: the epoch of the best validation WGA (the study's; needs "
                          "validation group labels), worst-class accuracy or accuracy (class labels only), "
                          "or the last epoch. The report adds the oracle (best test WGA) as a diagnostic, "
                          "never as a rule."),
        click.option("--batch-size", default=d("batch_size"), show_default=True),
        click.option("--lr", default=d("lr"), show_default=True),
        click.option("--weight-decay", default=d("weight_decay"), show_default=True),
        click.option("--seed", default=d("seed"), show_default=True),
        click.option("--warmup-epochs", default=d("warmup_epochs"), show_default=True,
                     help="Linear lr warm-up epochs before the cosine decay."),
        click.option("--teachers-online", type=click.Path(), default=None,
                     help="A teacher manifest: the study's online loop (teachers run on a fresh crop every "
                          "step; the cache only gives the images), the yardstick for what caching changes."),
        click.option("--agre-compare", default=None,
                     help="agre-batch: also compute the weights from these parameter sets on the same steps and "
                          "log how they agree, e.g. last,layer4 (no effect on training)."),
        click.option("--sample-views", "sample_views", type=click.Choice(["on", "off", "auto"]),
                     default="auto",
                     show_default=True, help="Train on the cache's stored random views, one slot per epoch (off: "
                                             "the eval view only; auto: on when the cache has them). The number of "
                                             "stored views is precompute's --views K."),
        click.option("--pretrained/--no-pretrained", default=None,
                     help="ImageNet student [default: as the teachers]."),
        click.option("--weights-file", type=click.Path(exists=True), default=None,
                     help="Local ImageNet ResNet-18 weights."),
        click.option("--student-arch", type=click.Choice(ARCHS), default=d("student_arch"), show_default=True,
                     help="The student (resnet18-w16: a quarter-width ResNet-18, the synthetic default's)."),
        click.option("--data-root", type=click.Path(), default=None,
                     help="Check the cache against this folder."),
        click.option("--expect-cache", default=None, help="The cache's root digest its sender published "
                     "(`cache info` prints it): refuse any other cache."),
        click.option("--data-mode", type=click.Choice(DATA_MODES), default=d("data_mode"), show_default=True,
                     help="Hold the splits in memory, stream them from the store and the cache as the epoch "
                          "goes (same results), or auto: stream when memory would not hold them comfortably."),
        click.option("--keep-checkpoints", type=click.Choice(KEEP_CHECKPOINTS), default=d("keep_checkpoints"),
                     show_default=True,
                     help="What a finished run keeps: best weights, + last weights, + optimizer."),
        click.option("--device", default=d("device"), show_default=True),
        click.option("--tensorboard", is_flag=True, default=False,
                     help="Also log to TensorBoard event files in the run folder (RUN/tensorboard; needs "
                          "pip install tensorboard). Only rank 0 logs under torchrun."),
        click.option("--wandb", default=None, metavar="PROJECT",
                     help="Also log to this Weights & Biases project: the config, every epoch's metrics and "
                          "teacher weights, the summary (needs pip install wandb; WANDB_MODE=offline keeps "
                          "the run in RUN/wandb)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@distill_options
@click.option("--out", default=None, type=click.Path(),
              help="Run folder [default: artifacts/default/runs/<name>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--overwrite", is_flag=True, help="Delete the run in --out and start it again.")
@click.pass_context
@friendly
def distill(ctx, out, resume, overwrite, cache_path, layers, layer_gammas, sample_views, agre_compare, **kw):
    """Train the ResNet-18 student from the cache (no teacher runs at training time)."""
    from click.core import ParameterSource

    from distill.config import DistillConfig, run_name
    from distill.train import fit

    given = {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    student, message = defaults.student_defaults_for(cache_path, given)
    if message and main_process():
        click.echo(message)
    settings = dict(cache=cache_path, out=out or "", layers=words(layers),
                    layer_gammas=floats(layer_gammas, "--layer-gammas"),
                    sample_views={"on": True, "off": False}.get(sample_views),
                    agre_compare=words(agre_compare) or (), **kw)
    cfg = DistillConfig(**{**settings, **student})
    if not out:
        cfg.out = str(defaults.RUNS / run_name(cfg))
    s = fit(cfg, resume=resume, overwrite=overwrite)
    if not main_process():
        return
    rule = s.get("select", {}).get("rule", "val-wga")
    click.echo(f"selected epoch {s['best_epoch']} ({rule}): test WGA {100 * s['test_best']['wga']:.2f}%  "
               f"avg acc {100 * s['test_best']['avg_acc']:.2f}%  (last epoch: WGA "
               f"{100 * s['test_last']['wga']:.2f}%)")
    click.echo(f"run folder: {cfg.out}")


# ---------------------------------------------------------------- experiments
@cli.command()
@click.option("--cache", "cache_path", type=click.Path(), default=str(defaults.CACHE), show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Sweep folder (one sub-folder per run).")
@click.option("--preset", multiple=True,
              help="Preset table(s): the study's main, agre-vs-aver, gamma, labels, "
              "multilayer, disagree; and weighting, agre-params, demo, hypothesis (raw vs erased teacher "
              "features), cache-vs-online.")
@click.option("--agre-weighting", type=click.Choice(["agre-batch", "agre", "cached"]), default=None,
              help="Weighting of the presets' AGRE-KD rows (AVER rows stay AVER): agre = "
                   "the paper's per-sample formula, cached = the cache's static bias-disagreement weights. "
                   "--set weighting=... sets every row.")
@click.option("--teachers", "teachers_manifest", type=click.Path(), default=None,
              help="Teacher manifest (the cache's) for the online rows of cache-vs-online.")
@click.option("--jobs", default="1", show_default=True,
              help="Runs trained at once, each in its own process; auto: from free GPU memory (1 on CPU).")
@click.option("--plan", is_flag=True,
              help="Print the planned runs with their full settings as JSON; train nothing.")
@click.option("--gamma", default=None, help="Grid: comma list.")
@click.option("--weighting", default=None, help="Grid: comma list.")
@click.option("--alpha", default=None, help="Grid: comma list.")
@click.option("--seeds", default="42,43,44", show_default=True)
@click.option("--epochs", default=None, type=int, help="Override epochs of every run.")
@click.option("--lr", default=None, type=float, help="Override lr of every run.")
@click.option("--select", default=None, type=click.Choice(SELECT_RULES),
              help="Model selection of every run [default: val-wga, the study's]; see distill --select.")
@click.option("--set", "extra", multiple=True,
              help="Any other DistillConfig field for every run, e.g. --set sample_views=off.")
@friendly
def sweep(cache_path, out, preset, agre_weighting, teachers_manifest, jobs, plan, gamma, weighting, alpha,
          seeds, epochs, lr, select, extra):
    """Run a grid or preset tables, skipping runs already finished (--set always wins)."""
    from core.errors import ConfigError
    from experiments.sweep import expand_grid, plan_json, preset_runs, run_sweep

    if (agre_weighting or teachers_manifest) and not preset:
        raise ConfigError("--agre-weighting and --teachers apply to --preset tables; give a --preset")
    if jobs != "auto" and not jobs.isdigit():
        raise ConfigError(f"--jobs takes a number of runs or auto, got {jobs!r}")
    seeds = ints(seeds, "--seeds")
    base = {k: v for k, v in {"epochs": epochs, "lr": lr, "select": select}.items() if v is not None}
    base.update(setting(item) for item in extra)
    student, message = defaults.student_defaults_for(cache_path, base)
    base = {**student, **base}
    if message:
        click.echo(message, err=True)  # stderr: --plan prints JSON on stdout
    runs = preset_runs(*preset, seeds=seeds, agre_weighting=agre_weighting,
                       teachers_manifest=teachers_manifest) if preset else []
    grid = {k: list(f) for k, f in {"gamma": floats(gamma, "--gamma"), "alpha": floats(alpha, "--alpha"),
                                    "weighting": words(weighting)}.items() if f}
    if grid or not preset:
        runs += expand_grid(**grid, seed=seeds)
    if plan:
        click.echo(plan_json(cache_path, out, runs, base=base))
        return
    run_sweep(cache_path, out, runs, base=base, jobs=jobs if jobs == "auto" else int(jobs))


@cli.command()
@click.argument("runs_dir", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), default=None, help="Report folder [default: RUNS_DIR/report].")
@click.option("--reference", is_flag=True, help="Next to every row of a preset's table, the WGA the study "
              "printed for it, and the table it comes from (experiments/study_tables.json).")
@click.option("--latex", is_flag=True, help="Also report.tex: the tables as LaTeX tabulars (mean ± std; "
              "the best row per column in bold only when beyond seed noise of the "
              "second, by the paired test).")
@friendly
def report(runs_dir, out, reference, latex):
    """Tables (Markdown, CSV: mean +- std over seeds) and plots of a sweep folder."""
    from experiments.report import format_table, write_report

    paths = write_report(runs_dir, out, reference=reference, latex=latex)
    click.echo(format_table(runs_dir, reference=reference))
    click.echo("written: " + ", ".join(str(p) for p in paths.values()))


@cli.command()
@click.option("--epochs", default=defaults.DISTILL_EPOCHS, show_default=True, help="Student epochs per run.")
@click.option("--seeds", default=",".join(map(str, defaults.DEMO_SEEDS)), show_default=True)
@friendly
def demo(epochs, seeds):
    """The whole pipeline on the synthetic default: data, teachers, cache, 4 students x 3 seeds, report."""
    from experiments.pipeline import run_default

    run_default(epochs=epochs, seeds=ints(seeds, "--seeds"))


if __name__ == "__main__":
    cli()
