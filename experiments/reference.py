"""The study's own numbers next to a preset's table: the data file, its checks, the "Study" column.

``experiments/study_tables.json`` holds, for each preset whose rows the study reports (main,
agre-vs-aver, gamma, labels, multilayer, disagree), per row label exactly as in
:data:`experiments.sweep.PRESETS`: the study's test WGA mean, its std (null where the study's
table printed none), the study's table it comes from (``source``, the heading as written in the
study), the row as that table names it (``study_row``) and an optional ``note`` (where another
table of the study prints the same configuration, or prints it with other values). Each row is
taken from the table the preset rebuilds. Rows the study does not report have no entry and show
as a dash; so do the presets it has no table for (weighting, agre-params, demo, cache-vs-online).

``report --reference`` (:func:`experiments.report.format_table` with ``reference=True``) adds
the column "Study" after "Mean ± Std" and, under the table, footnotes naming the study's tables
and the notes.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from experiments.runs import DASH, Table
from experiments.sweep import PRESETS

STUDY_FILE = Path(__file__).with_name("study_tables.json")
STUDY_VERSION = 1
COLUMN = "Study"
_TOP_KEYS = {"version", "about", "study", "presets"}
_ROW_KEYS = {"mean", "std", "source", "study_row", "note"}
_REQUIRED = {"mean", "std", "source"}


@dataclass(frozen=True)
class StudyRow:
    """One row's number as the study printed it (WGA in percent; std None where it printed none)."""

    mean: float
    std: float | None
    source: str
    study_row: str | None = None
    note: str | None = None

    @property
    def cell(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class StudyTables:
    """The data file, checked: ``presets[preset][label]`` -> StudyRow."""

    title: str
    setup: str
    presets: dict[str, dict[str, StudyRow]]

    def row(self, preset: str, label: str) -> StudyRow | None:
        return self.presets.get(preset, {}).get(label)


@dataclass(frozen=True)
class StudyColumn:
    """The column for one table: a cell per row (in the table's row order) and footnote lines."""

    cells: list[str]
    footnotes: list[str]


# ----------------------------------------------------------------------------- loading and checks

def _number(value, where: str, lowest: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not lowest <= value <= 100:
        raise ConfigError(f"{where} must be a percentage between {lowest:g} and 100, got {value!r}")
    return float(value)


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _row(entry, where: str) -> StudyRow:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object with {', '.join(sorted(_REQUIRED))}, got {entry!r}")
    missing, unknown = _REQUIRED - set(entry), set(entry) - _ROW_KEYS
    if missing or unknown:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(sorted(missing))}"] if missing else [])
            + ([f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_ROW_KEYS))})"]
               if unknown else [])))
    def optional(key):
        return None if entry.get(key) is None else _text(entry[key], f"{where}: {key}")

    std = entry["std"]
    return StudyRow(mean=_number(entry["mean"], f"{where}: mean"),
                    std=None if std is None else _number(std, f"{where}: std (or null)"),
                    source=_text(entry["source"], f"{where}: source"),
                    study_row=optional("study_row"), note=optional("note"))


def validate(data, where: str = str(STUDY_FILE)) -> StudyTables:
    """The parsed data file as StudyTables; ConfigError naming the file and the entry when it is
    malformed: not an object, another version, unknown keys, a preset or row label that
    PRESETS does not have (a renamed preset row), a mean or std that is not a percentage."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the study's tables must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("version") != STUDY_VERSION:
        raise ConfigError(f"{where}: version must be {STUDY_VERSION}, got {data.get('version')!r}")
    study = data.get("study")
    if not isinstance(study, dict):
        raise ConfigError(f"{where}: \"study\" must be an object with a title and a setup, got {study!r}")
    presets = data.get("presets")
    if not isinstance(presets, dict) or not presets:
        raise ConfigError(f"{where}: \"presets\" must be a non-empty object (preset -> row label -> numbers)")
    out: dict[str, dict[str, StudyRow]] = {}
    for preset, rows in presets.items():
        if preset not in PRESETS:
            raise ConfigError(f"{where}: preset {preset!r} is not a sweep preset ({', '.join(PRESETS)})")
        if not isinstance(rows, dict):
            raise ConfigError(f"{where}: presets.{preset} must be an object (row label -> numbers)")
        labels = [row["label"] for row in PRESETS[preset]["rows"]]
        for label in rows:
            if label not in labels:
                raise ConfigError(f"{where}: presets.{preset} has row {label!r}, which "
                                  f"preset {preset!r} does not have (its rows: "
                                  f"{', '.join(repr(x) for x in labels)}); rename it in the data file")
        out[preset] = {label: _row(entry,
                                   f"{where}: presets.{preset}[{label!r}]") for label, entry in rows.items()}
    return StudyTables(_text(study.get("title"), f"{where}: study.title"),
                       _text(study.get("setup"), f"{where}: study.setup"), out)


def load_study(path: str | Path | None = None) -> StudyTables:
    """Read and check the study's tables (default: ``experiments/study_tables.json``, read once)."""
    if path is None:
        return _default_study()
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: the study's tables are missing (they belong in the repository)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return validate(data, str(path))


@functools.lru_cache(maxsize=1)
def _default_study() -> StudyTables:
    return load_study(STUDY_FILE)


# ----------------------------------------------------------------------------- the column

def preset_of(table: Table) -> str:
    """The preset a table belongs to: its name without a tag (``main [epochs=5]`` -> main)."""
    return table.name.split(" [", 1)[0]


def study_column(table: Table, study: StudyTables | None = None) -> StudyColumn | None:
    """The "Study" cells of a preset's table and the footnotes under it; None for a table of no
    preset ("Other runs"). A row the study does not report gets a dash; a row with a note gets a
    marker ``[n]`` and a footnote."""
    preset = preset_of(table)
    if preset not in PRESETS:
        return None
    study = study or load_study()
    cells, notes, sources = [], [], {}
    for row in table.rows:
        entry = study.row(preset, row.label)
        if entry is None:
            cells.append(DASH)
            continue
        sources.setdefault(entry.source, []).append(row.label)
        cell = entry.cell
        if entry.note:
            notes.append(f"[{len(notes) + 1}] {row.label}: {entry.note}")
            cell += f" [{len(notes)}]"
        cells.append(cell)
    if not sources:
        return StudyColumn(cells, [f"{COLUMN}: the study reports no table for this preset."])
    if len(sources) == 1:
        where = f'its table "{next(iter(sources))}"'
    else:
        where = "its tables " + "; ".join(f'"{s}" ({", ".join(labels)})' for s, labels in sources.items())
    head = (f"{COLUMN}: test WGA (%) as the study printed it ({study.setup}), from {where}; "
            f"std only where it printed one; {DASH} = not in the study.")
    if table.name != preset:
        head += (f" The study's numbers are for its own settings: this table's runs differ "
                 f"({table.name[len(preset):].strip()}).")
    return StudyColumn(cells, [head] + notes)
