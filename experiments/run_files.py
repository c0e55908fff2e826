"""A run folder's files read as untrusted input: summary.json and config.json bounded in size and
depth (:func:`core.files.load_json`), the fields the report reads type-checked, the config checked as
DistillConfig checks it. A copied runs folder may hold anything; a bad file is a reason, not a crash."""
from __future__ import annotations

from pathlib import Path

from core.errors import ToolError
from core.files import JSONFileError, load_json
from distill.config import CONFIG, SELECT_RULES, SUMMARY, identity_of


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metrics_problem(m, where: str) -> str | None:
    """What is wrong with a metrics object (``{"wga": 0.8, "group_acc": [...], ...}``), or None."""
    if not isinstance(m, dict):
        return f"{where} is not an object"
    for k, v in m.items():
        ok = v is None or _number(v) or isinstance(v, str) or (
            isinstance(v, list) and all(x is None or _number(x) for x in v))
        if not ok:
            return f"{where}.{k} is not a number or a list of numbers"
    return None


def summary_problem(summary: dict) -> str | None:
    """The first field of a run's summary.json whose type is not what the report reads, or None.
    The file is written by ``distill`` but may come from anywhere (a copied runs folder)."""
    kinds = {"status": str, "test_best": dict, "test_last": dict, "val_best": dict, "group_names": list,
             "teachers": list, "teacher_val": dict, "teacher_test": dict, "config": dict}
    for key, kind in kinds.items():
        if key in summary and summary[key] is not None and not isinstance(summary[key], kind):
            return f"field {key} is not {({dict: 'an object', list: 'a list'}).get(kind, 'a string')}"
    for key in ("test_best", "test_last", "val_best"):
        problem = _metrics_problem(summary[key], key) if summary.get(key) is not None else None
        if problem:
            return f"field {problem}"
    if not all(isinstance(g, str) for g in summary.get("group_names") or []):
        return "field group_names is not a list of names"
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("role", ""), str)
               for t in summary.get("teachers") or []):
        return "field teachers is not a list of {name, role} objects"
    problem = _selection_problem(summary)
    if problem:
        return f"field {problem}"
    for key in ("teacher_val", "teacher_test"):
        for name, m in (summary.get(key) or {}).items():
            problem = _metrics_problem(m, f"{key}[{name[:40]!r}]")
            if problem:
                return f"field {problem}"
    return None


def _selection_problem(summary: dict) -> str | None:
    """The selection fields (``select``, ``selection_epochs``, ``oracle``): absent in runs of
    earlier versions, of the right kinds when present."""
    sel, epochs, oracle = summary.get("select"), summary.get("selection_epochs"), summary.get("oracle")
    if sel is not None and not (isinstance(sel, dict) and sel.get("rule") in SELECT_RULES
                                and _epoch(sel.get("epoch"))):
        return f"select is not {{rule: one of {', '.join(SELECT_RULES)}, epoch: a positive integer}}"
    if epochs is not None and not (isinstance(epochs, dict) and all(
            k in SELECT_RULES and _epoch(v) for k, v in epochs.items())):
        return "selection_epochs is not {rule: epoch}"
    if oracle is not None:
        if not (isinstance(oracle, dict) and _epoch(oracle.get("epoch"))):
            return "oracle is not {epoch: a positive integer, test: metrics}"
        return _metrics_problem(oracle.get("test"), "oracle.test")
    return None


def _epoch(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _read_object(path: Path) -> tuple[dict | None, str]:
    """A run file's JSON object (bounded: :func:`core.files.load_json`), or None and why."""
    if not path.exists():
        return None, ""
    try:
        return load_json(path, path.name, kind=dict), ""
    except JSONFileError as e:
        return None, str(e).replace(f"{path.name} {path}: ", f"{path.name} is unreadable: ", 1)


def read_run_files(path: Path) -> tuple[dict | None, dict, str]:
    """A run folder's summary (None when absent or unusable), config ({} when unusable) and what
    makes either unusable ("" when nothing): size, depth and top-level type bounded, the fields the
    report reads type-checked, the config's values checked as DistillConfig checks them."""
    summary, why = _read_object(path / SUMMARY)
    if summary is not None and summary_problem(summary):
        summary, why = None, f"{SUMMARY} is unreadable: {summary_problem(summary)}"
    config, why_config = _read_object(path / CONFIG)
    if config is None and not why_config:
        config = (summary or {}).get("config") or {}
    if config:
        try:
            identity_of(config)
        except (ToolError, TypeError, ValueError) as e:
            config, why_config = None, f"{CONFIG}: {str(e)[:300]}"
    return summary, config or {}, why or why_config
