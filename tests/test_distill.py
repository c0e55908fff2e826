"""Distillation from the cache: end to end, every mode, resume, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.config import DistillConfig
from distill.data import DistillError
from distill.train import fit

FAST = dict(epochs=1, batch_size=64, lr=1e-2, device="cpu", pretrained=False)


def _cfg(cache, out, **kw):
    return DistillConfig(cache=str(cache), out=str(out), **{**FAST, **kw})


def test_end_to_end_run_writes_everything(tiny_cache, tmp_path):
    s = fit(_cfg(tiny_cache, tmp_path / "run", epochs=2, gamma=0.5), progress=False)
    run = tmp_path / "run"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for l in lines:
        assert set(l["train"]) == {"loss", "ce", "kd", "feat"} and l["train"]["feat"] > 0
        assert abs(sum(l["teacher_weights"]) - 1) < 1e-4 and 0 <= l["val"]["wga"] <= 1
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine schedule
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["best_epoch"] in (1, 2)
    assert set(summary["teacher_test"]) == {"teacher_1", "teacher_2", "teacher_3", "biased"}
    assert summary["test_best"]["group_count"] == s["test_best"]["group_count"]
    w = np.load(run / "teacher_weights.npy")
    assert w.shape == (240, 3) and np.allclose(w.sum(1), 1, atol=1e-4)
    # the lean default: a finished run keeps the best epoch's weights, no optimizer state
    assert (run / "best.pt").is_file() and not (run / "last.pt").exists()
    ck = torch.load(run / "best.pt", weights_only=True)
    assert set(ck) == {"model", "epoch", "config"} and ck["epoch"] == summary["best_epoch"]
    assert any(k.startswith("adapters.layer4") for k in ck["model"])  # adapters saved with the student


@pytest.mark.parametrize("kw", [
    dict(weighting="aver"), dict(weighting="agre"), dict(weighting="cached"),
    dict(weighting="agre-batch", agre_params="last"), dict(weighting="agre-batch", agre_params="all"),
    dict(gamma=0.5, feature_weighting="disagree"), dict(layers=("layer3", "layer4"), layer_gammas=(0.25, 0.5)),
    dict(alpha=0.9, gamma=0.25, sample_views=False),
])
def test_every_mode_trains(tiny_cache, tmp_path, kw):
    s = fit(_cfg(tiny_cache, tmp_path / "run", **kw), progress=False)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert np.isfinite(line["train"]["loss"]) and s["status"] == "finished"
    if kw.get("weighting") == "aver":
        assert np.allclose(line["teacher_weights"], 1 / 3)
    if kw.get("alpha", 1) < 1:
        assert line["train"]["ce"] > 0


def test_resume_gives_the_same_run(tiny_cache, tmp_path, monkeypatch):
    import distill.train as train_mod

    full = fit(_cfg(tiny_cache, tmp_path / "full", epochs=3, gamma=0.5, keep_checkpoints="last"), progress=False)
    real = train_mod.train_one_epoch

    def dying(model, step, batches, epoch, *a, **kw):
        if epoch == 2:  # epoch index 2: killed after two finished epochs
            raise KeyboardInterrupt("simulated kill")
        return real(model, step, batches, epoch, *a, **kw)

    monkeypatch.setattr(train_mod, "train_one_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_cache, tmp_path / "part", epochs=3, gamma=0.5, keep_checkpoints="last"), progress=False)
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    with pytest.raises(DistillError, match="--resume"):
        fit(_cfg(tiny_cache, tmp_path / "part", epochs=3, gamma=0.5), progress=False)
    part = fit(_cfg(tiny_cache, tmp_path / "part", epochs=3, gamma=0.5, keep_checkpoints="last"), resume=True,
               progress=False)
    assert part["test_best"] == full["test_best"] and part["test_last"] == full["test_last"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]


@pytest.fixture(scope="module")
def logits_only_cache(tiny_data, tiny_teachers, tmp_path_factory):
    from precompute.run import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("c0") / "c0.h5"
    return run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(out), random_views=0,
                                           layers=("layer4",), device="cpu", progress=False))


def test_clear_errors(logits_only_cache, tiny_cache, tmp_path):
    from cli import cli
    from data.synth import SynthSpec, generate

    runner = CliRunner()
    base = ["distill", "--cache", str(logits_only_cache), "--epochs", "1", "--no-pretrained", "--device", "cpu"]
    cases = [
        (["--gamma", "0.5", "--layers", "layer3", "--sample-views", "off"], "holds features of layer4"),
        (["--sample-views", "on"], "only the eval view"),
        (["--alpha", "2"], "--alpha must lie in [0, 1]"),
        (["--cache", str(tmp_path / "none.h5")], "no cache at"),
    ]
    for i, (extra, msg) in enumerate(cases):
        res = runner.invoke(cli, base + extra + ["--out", str(tmp_path / f"r{i}")])
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output, res.output
    other = generate(tmp_path / "other", SynthSpec(scale=0.05, size=24, seed=3))
    res = runner.invoke(cli, base + ["--sample-views", "off", "--data-root", str(other), "--out", str(tmp_path / "r9")])
    assert res.exit_code != 0 and "another data set" in res.output


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    import distill.train as train_mod

    real = train_mod.DistillTask.step
    calls = {"n": 0}

    def poisoned(self, model, opt, batch):
        out = real(self, model, opt, batch)
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2 (4 steps per epoch)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod.DistillTask, "step", poisoned)
    with pytest.raises(DistillError, match=r"epoch 2, step 2.*epoch 1.*lower --lr"):
        fit(_cfg(tiny_cache, tmp_path / "run", epochs=3), progress=False)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_a_finished_run_is_its_result_and_other_settings_are_refused(tiny_cache, tmp_path, capsys):
    first = fit(_cfg(tiny_cache, tmp_path / "run", epochs=1), progress=False)
    again = fit(_cfg(tiny_cache, tmp_path / "run", epochs=1), progress=True)  # no --resume needed
    assert "already holds this run, finished" in capsys.readouterr().out
    assert again == json.loads(json.dumps(first))  # the summary as written to summary.json
    with pytest.raises(DistillError, match=r"other settings \(tau: was 4.0, now 2.0\)"):
        fit(_cfg(tiny_cache, tmp_path / "run", epochs=1, tau=2.0), progress=False)


def test_resume_refuses_other_settings_and_keeps_teacher_weights(tiny_cache, tmp_path):
    fit(_cfg(tiny_cache, tmp_path / "run", epochs=1), progress=False)
    w = np.load(tmp_path / "run" / "teacher_weights.npy")
    with pytest.raises(DistillError, match=r"other settings \(tau: was 4.0, now 2.0\)"):
        fit(_cfg(tiny_cache, tmp_path / "run", epochs=1, tau=2.0), resume=True, progress=False)
    # resuming a finished run re-evaluates it without touching what the last epoch recorded
    fit(_cfg(tiny_cache, tmp_path / "run", epochs=1), resume=True, progress=False)
    assert np.array_equal(np.load(tmp_path / "run" / "teacher_weights.npy"), w)


def test_shard_cache_is_refused(tiny_data, tiny_teachers, tmp_path):
    from precompute.run import PrecomputeConfig, run_precompute

    shard = run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(tmp_path / "c.shard0.h5"),
                                            random_views=0, layers=("layer4",), shard="0/2", device="cpu",
                                            progress=False))
    with pytest.raises(DistillError, match="merge the shards"):
        fit(_cfg(shard, tmp_path / "run", sample_views=False), progress=False)


def test_batch_bounds_never_leave_a_single_sample():
    from distill.data import batch_bounds

    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]
    assert batch_bounds(1, 4) == [(0, 1)]


@pytest.mark.parametrize("K, E", [(5, 5), (8, 5), (3, 7)])
def test_each_epoch_trains_on_one_slot(K, E):
    """Epoch e takes slot 1 + e mod K of every training row: with K >= E stored random views every
    row is seen through E distinct views over E epochs (a fresh crop each epoch, as the online
    loop has); with fewer it cycles through all K. Without random views, the eval view (slot 0)."""
    from distill.data import epoch_order, slot_of

    cfg = DistillConfig(seed=3, epochs=max(E, 2))
    slots = [slot_of(cfg.sample_views, K, e) for e in range(E)]
    assert slots == [1 + e % K for e in range(E)] and len(set(slots)) == min(K, E)
    assert all(slot_of(False, K, e) == 0 for e in range(E))
    assert slot_of(None, 0, 3) == 0
    order = epoch_order(50, cfg.seed, 1)
    assert sorted(order.tolist()) == list(range(50))
    assert torch.equal(order, epoch_order(50, cfg.seed, 1))  # replayable
    assert not torch.equal(order, epoch_order(50, cfg.seed, 2))


def test_slots_hold_at_most_two_and_give_the_cached_views(tiny_cache):
    """What the loop trains on in epoch e is the cache's slot of that epoch (boxes and teacher
    outputs), read once; the next epoch's slot is read ahead, never more than two held."""
    from cache.reader import open_cache
    from distill.data import Slots, slot_of

    cfg = DistillConfig(cache=str(tiny_cache), epochs=4, gamma=0.5)
    cache = open_cache(tiny_cache)
    K = cache.meta.random_views
    assert K >= 2
    slots = Slots(cache, cfg.needs, torch.device("cpu"), sample_views=cfg.sample_views, epochs=cfg.epochs)
    try:
        seen = []
        for e in range(cfg.epochs):
            view = slots.view(e)
            assert len(slots._held) <= 2
            want = cache.read_slot(slot_of(cfg.sample_views, K, e), layers=["layer4"])
            np.testing.assert_array_equal(view.box.numpy(), want["box"])
            np.testing.assert_array_equal(view.logits.numpy(), want["logits"])
            np.testing.assert_array_equal(view.feats["layer4"].numpy(), want["features"]["layer4"])
            assert view.cached is None  # what agre-batch does not need is not read
            seen.append(view.box.numpy())
        assert not np.array_equal(seen[0], seen[1])  # a new crop each epoch
    finally:
        slots.close()


@pytest.mark.parametrize("kw", [dict(gamma=0.5), dict(weighting="cached", agre_params="last")])
def test_streaming_gives_the_in_memory_run(tiny_cache, tmp_path, monkeypatch, kw):
    """Forcing streaming on a tiny set (one batch per read group, small evaluation chunks, so the
    background reads really run ahead): the same run, bit for bit."""
    import distill.stream as stream

    monkeypatch.setattr(stream, "GROUP_BATCHES", 1)
    monkeypatch.setattr(stream, "EVAL_CHUNK_ROWS", 100)
    runs = {}
    for mode in ("memory", "stream"):
        runs[mode] = fit(_cfg(tiny_cache, tmp_path / mode, epochs=2, data_mode=mode, keep_checkpoints="last", **kw),
                         progress=False)
    lines = {m: (tmp_path / m / "metrics.jsonl").read_text().splitlines() for m in runs}
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in ls]
    assert strip(lines["memory"]) == strip(lines["stream"])
    assert runs["memory"]["test_best"] == runs["stream"]["test_best"]
    np.testing.assert_array_equal(np.load(tmp_path / "memory" / "teacher_weights.npy"),
                                  np.load(tmp_path / "stream" / "teacher_weights.npy"))
    a, b = (torch.load(tmp_path / m / "last.pt", weights_only=True)["model"] for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
