"""Which of the project's files and functions one training step goes through.

Runs a tiny distillation (cached teachers, the study's batch AGRE-KD over all parameters, gamma
0.5 on layer4) and records, with ``sys.setprofile``, every call into the project's own source
between the return of the first and of the second optimiser step of the first epoch: the loop's
bookkeeping, the next batch (order, slot, rendering, teacher outputs), the step (forward,
weights, objective, backward) and ``opt.step()``. Prints the files and functions in the order
they were first entered. docs/usage.md#reading-the-code-one-training-step quotes the result.

    python benchmarks/trace_step.py [--cache CACHE.h5]   # without --cache: a tiny one in a temp folder
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECT = ("core", "data", "cache", "precompute", "distill", "experiments")  # benchmarks and tests excluded


def _project_file(filename: str) -> str | None:
    """``filename`` relative to the project root when it is one of the project's modules."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in PROJECT else None


def trace_one_step(cache: str | Path, out: str | Path) -> list[tuple[str, str | None]]:
    """``(file, function)`` of every project function called between the first two optimiser
    steps of a tiny run on ``cache`` (written to ``out``), in the order first entered; a file
    that only calls (the loop's) comes as ``(file, None)``."""
    import torch

    from distill.config import DistillConfig
    from distill.train import fit

    cfg = DistillConfig(cache=str(cache), out=str(out), weighting="agre-batch", agre_params="all",
                        gamma=0.5, epochs=1, batch_size=16, device="cpu", pretrained=False)
    sgd_step = torch.optim.SGD.step.__wrapped__.__code__ if hasattr(torch.optim.SGD.step, "__wrapped__") \
        else torch.optim.SGD.step.__code__
    state = {"steps": 0, "seen": {}}

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "return" and code is sgd_step:
            state["steps"] += 1
        elif event == "call" and state["steps"] == 1:
            rel = _project_file(code.co_filename)
            if rel is not None:
                state["seen"].setdefault((rel, code.co_qualname), None)
                caller = _project_file(frame.f_back.f_code.co_filename) if frame.f_back else None
                if caller is not None:  # the loop's own file (train_one_epoch calls the step)
                    state["seen"].setdefault((caller, None), None)

    sys.setprofile(profile)
    try:
        fit(cfg, progress=False)
    finally:
        sys.setprofile(None)
    if state["steps"] < 2:
        raise RuntimeError(f"the run took {state['steps']} optimiser steps; the trace needs two")
    return list(state["seen"])


def tiny_cache(folder: Path) -> tuple[Path, Path]:
    """A small synthetic cache (2 random views, every layer) and its teacher manifest, as the test
    suite's fixtures build them."""
    from data.synth import SynthSpec, generate
    from precompute.run import PrecomputeConfig, run_precompute
    from precompute.teachers import TeacherConfig, build_teachers

    data = generate(folder / "data", SynthSpec(scale=0.05, size=24, seed=1))
    build_teachers(TeacherConfig(str(data), str(folder / "teachers"), num_teachers=3, epochs=1, image_size=16,
                                 arch="resnet18", pretrained=False, shared_backbone=True, lr=1e-2,
                                 dfr_retrains=2, device="cpu", progress=False))
    manifest = folder / "teachers" / "manifest.json"
    return run_precompute(PrecomputeConfig(str(data), str(manifest), str(folder / "cache.h5"), random_views=2,
                                           batch_size=64, device="cpu", progress=False)), manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="a cache with layer4 features (default: build a tiny one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tiny_cache(Path(tmp))[0]
        calls = trace_one_step(cache, Path(tmp) / "run")
    files, functions, inline = count(calls)
    print(f"one training step (cached teachers, agre-batch all, gamma 0.5): {len(files)} files, "
          f"{len(functions)} functions (and {len(inline)} comprehensions or generator expressions)")
    for f in files:
        entered = ", ".join(name for g, name in functions if g == f)
        print(f"  {f}: {entered or '(the loop: calls the step)'}")


def count(calls: list[tuple[str, str | None]]) -> tuple[list, list, list]:
    """(files, functions, comprehensions) of a trace. Comprehensions and generator expressions
    are expressions of the function they sit in (Python 3.12 inlines the comprehensions), so
    they are listed apart; lambdas and nested functions count as functions."""
    files = list(dict.fromkeys(f for f, _ in calls))
    named = [(f, n) for f, n in calls if n is not None]
    expressions = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")
    inline = [(f, n) for f, n in named if n.rsplit(".", 1)[-1] in expressions]
    return files, [c for c in named if c not in inline], inline


if __name__ == "__main__":
    main()
