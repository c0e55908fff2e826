"""Command line, the ``cache`` group: inspect, verify, merge, slim, compare, extend and probe a teacher cache."""
from __future__ import annotations

import sys

import click

from cli_options import friendly, words


@click.group()
def cache():
    """Inspect, verify, merge, slim, compare (diff) or extend caches."""


@cache.command("info")
@click.argument("path", type=click.Path())
@friendly
def cache_info(path):
    """Sizes, splits, views, layers, teachers and their accuracy, provenance."""
    from cache.info import format_summary, summarize

    click.echo(format_summary(summarize(path)))


@cache.command("verify")
@click.argument("path", type=click.Path())
@click.option("--data-root", type=click.Path(), default=None,
              help="Check the fingerprint against this folder.")
@click.option("--expect", default=None, help="The root digest its sender published (`cache info` prints it): "
              "anything else is refused.")
@click.option("--recompute", type=click.IntRange(1), default=None, metavar="N",
              help="Run the teachers and the biased model again on N stored views and compare their "
                   "logits, features and cached weights with the file's (needs --teachers).")
@click.option("--teachers", "manifest", type=click.Path(), default=None,
              help="The manifest of the models the cache was made from (for --recompute).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which N views --recompute draws.")
@click.option("--device", default="cpu", show_default=True, help="Where --recompute runs.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="The arithmetic the cache was made in (bfloat16: precompute on a GPU): --recompute's "
                   "tolerances.")
@friendly
def cache_verify(path, data_root, expect, recompute, manifest, seed, device, precision):
    """Checksums, schema, completeness and data fingerprint; with --recompute, that the stored outputs
    are the teachers'. Non-zero exit on any problem."""
    from cache.reader import open_cache
    from cache.verify import recompute as recompute_views
    from cache.verify import verify
    from data.folders import fingerprint, load_metadata

    from core.errors import ConfigError, ToolError

    if (recompute is None) != (manifest is None):
        raise ConfigError("--recompute N and --teachers MANIFEST go together: the teachers the cache was "
                          "made from are run again on N of its views")
    fp = None
    if data_root:
        try:
            meta = open_cache(path, require_complete=False).meta
        except ToolError:  # a damaged file: verify lists what is wrong with it
            meta = None
        if meta is not None:
            fp = fingerprint(load_metadata(data_root, meta.dataset, **meta.dataset_options))
    problems = verify(path, fp, expect=expect)
    if not problems and recompute:  # outputs are judged on a sound file only
        lines, problems = recompute_views(path, manifest, recompute, seed, device, precision)
        click.echo("\n".join(lines))
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    click.echo(f"{path}: OK" + (" (matches the data folder)" if fp else "")
               + (" (root digest as published)" if expect else "")
               + (f" (outputs recomputed on {recompute} views)" if recompute else ""))


@cache.command("merge")
@click.argument("out", type=click.Path())
@click.argument("shards", nargs=-1, required=True, type=click.Path())
@friendly
def cache_merge(out, shards):
    """Combine shards written with --shard i/n into one cache (and its image store)."""
    from cache.merge import merge

    merge(out, list(shards))  # under a lock on OUT: a second merge into it is refused
    click.echo(f"merged {len(shards)} shards into {out}")


@cache.command("slim")
@click.argument("path", type=click.Path())
@click.option("--out", required=True, type=click.Path())
@click.option("--layers", default=None, help="Comma list of the layers to keep [default: all].")
@click.option("--views", type=click.IntRange(0), default=None,
              help="Keep the first K random views [default: all].")
@click.option("--overwrite", is_flag=True)
@friendly
def cache_slim(path, out, layers, views, overwrite):
    """A verified copy with fewer layers and/or random views (every model kept)."""
    from cache.tools import slim
    click.echo(f"wrote {slim(path, out, layers.split(',') if layers else None, views, overwrite)}")


@cache.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--atol", type=float, default=0.0, show_default=True)
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative to |B|.")
@friendly
def cache_diff(a, b, atol, rtol):
    """Header, teachers, rows, per dataset and slot the largest differences; exit 1 unless equal."""
    from cache.tools import diff, format_diff
    d = diff(a, b, atol, rtol)
    click.echo(format_diff(d))
    sys.exit(0 if d["equal"] else 1)


@cache.command("extend")
@click.argument("path", type=click.Path())
@click.option("--teachers", "manifest", required=True, type=click.Path(),
              help="Every model the new cache holds.")
@click.option("--out", required=True, type=click.Path())
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="The precompute's, for equal bits.")
@click.option("--device", default="auto", show_default=True)
@click.option("--data-root", type=click.Path(), default=None,
              help="Check the fingerprint against this folder.")
@click.option("--overwrite", is_flag=True)
@friendly
def cache_extend(path, manifest, out, batch_size, device, data_root, overwrite):
    """Copy the models the cache holds; run only the new ones' backbones, on the stored views."""
    from precompute.extend import extend
    click.echo(f"wrote {extend(path, manifest, out, batch_size, device, data_root, overwrite)}")


@cache.command("probe")
@click.argument("path", type=click.Path())
@click.option("--layers", default=None, help="Comma list [default: every cached layer].")
@friendly
def cache_probe(path, layers):
    """How well a linear probe recovers the spurious attribute from raw and LEACE-erased features."""
    from cache.reader import open_cache
    from distill.erasure import format_probe, probe_attribute

    with open_cache(path) as c:
        click.echo(format_probe(probe_attribute(c, words(layers))))
