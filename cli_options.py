"""Command-line helpers shared by the commands: the tool's errors as messages, option parsers."""
from __future__ import annotations

import dataclasses
import functools
import json

import click


def friendly(fn):
    """Turn the tool's own errors (bad data, cache, checkpoint, option) into a one-line message;
    anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from core.errors import ToolError

        try:
            return fn(*args, **kwargs)
        except ToolError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def main_process() -> bool:
    """False in the processes of a torchrun launch but rank 0: only one prints results."""
    import os

    return os.environ.get("RANK", "0") == "0"


def default_of(cls, name: str):
    """A dataclass field's default: the CLI never restates a config default."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def renamed(aliases: dict[str, str]):
    """An option callback for a choice whose values were renamed: an old name (a key of
    ``aliases``) becomes its new one, with a one-line note on stderr saying what to write."""
    def callback(ctx, param, value):
        new = aliases.get(value)
        if new is None:
            return value
        option = param.opts[0]
        click.echo(f"note: {option} {value} is deprecated, write {option} {new} (the same thing)", err=True)
        return new
    return callback


def _comma_list(text: str | None, cast, kind: str, example: str, option: str):
    from core.errors import ConfigError

    try:
        return None if text is None else [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes a comma list of {kind}, e.g. {example}; got {text!r}") from None


def floats(text: str | None, option: str = "the option"):
    values = _comma_list(text, float, "numbers", "0.25,0.5", option)
    return None if values is None else tuple(values)


def ints(text: str | None, option: str = "the option"):
    return _comma_list(text, int, "integers", "42,43,44", option)


def words(text: str | None):
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def setting(item: str) -> tuple[str, object]:
    """``key=value`` of ``--set``: JSON when it parses (numbers, true/false, null, lists), on/off
    as booleans, anything else a string (``agre_params=all``)."""
    from core.errors import ConfigError

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set takes key=value (e.g. --set weighting=agre), got {item!r}")
    if text in ("on", "off"):
        return key.strip(), text == "on"
    try:
        return key.strip(), json.loads(text)
    except ValueError:
        return key.strip(), text


def dataset_options(fn):
    """``--dataset`` and the CelebA attribute choice, passed on as ``dataset`` and ``dataset_options``."""
    @click.option("--dataset", type=click.Choice(["waterbirds", "celeba", "csv"]), default="waterbirds",
                  show_default=True,
                  help="Layout of the data folder (csv: metadata.csv with image,label,attribute,split).")
    @click.option("--target", default=None, help="CelebA: the attribute to predict [default: Blond_Hair].")
    @click.option("--spurious", default=None, help="CelebA: the spurious attribute [default: Male].")
    @functools.wraps(fn)
    def wrapper(*args, dataset, target, spurious, **kwargs):
        options = {k: v for k, v in {"target": target, "spurious": spurious}.items() if v is not None}
        return fn(*args, dataset=dataset, dataset_options=options, **kwargs)
    return wrapper
