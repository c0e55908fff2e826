"""The study's online loop (teachers run live every step) against the cache, on the same pixels."""
from __future__ import annotations

import copy
import json

import numpy as np
import torch

from distill.config import DistillConfig
from distill.data import load_split, make_batch, open_inputs, view_of
from distill.student import Student
from distill.teachers import teacher_source
from distill.task import DistillTask
from distill.train import fit

CPU = torch.device("cpu")


def test_online_step_equals_the_cached_step_on_the_same_crop(tiny_cache, tiny_teachers, monkeypatch):
    """Same teachers, same pixels: the live outputs, the weights and the loss are the cached ones,
    up to the float16 the cache stores features in."""
    base = dict(cache=str(tiny_cache), gamma=0.5, weighting="agre-batch", agre_params="all", device="cpu",
                pretrained=False, batch_size=16)
    cached_cfg, online_cfg = DistillConfig(**base), DistillConfig(**base, teachers_online=str(tiny_teachers))
    cache, store = open_inputs(cached_cfg)
    slot = view_of(cache.read_slot(1, layers=["layer4"]), CPU)  # a stored random view of the training rows
    data = load_split(cache, store, "train", CPU).seen_through(slot)
    size = cache.meta.out_size
    cached, online = (teacher_source(cache.meta, c, size, CPU) for c in (cached_cfg, online_cfg))
    idx = torch.arange(16)
    monkeypatch.setattr(online, "crops", lambda rows, hw, epoch: (data.view.box[idx], data.view.flip[idx]))
    a, b = (make_batch(data, idx, 0, source, size, CPU) for source in (cached, online))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)                                      # the same pixels
    torch.testing.assert_close(a.teacher_logits, b.teacher_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.biased_logits, b.biased_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.teacher_feats["layer4"].float(), b.teacher_feats["layer4"], rtol=2e-3, atol=2e-3)  # float16 cached
    torch.manual_seed(0)
    model = Student(cache.meta.num_classes, {"layer4": cache.meta.feature_dims["layer4"]})
    twin = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    out_a = DistillTask(cached_cfg, cached, CPU).step(model, opts[0], a)
    out_b = DistillTask(online_cfg, online, CPU).step(twin, opts[1], b)
    torch.testing.assert_close(out_a["weights"], out_b["weights"], rtol=1e-3, atol=1e-4)
    for k in ("loss", "kd", "feat"):
        torch.testing.assert_close(out_a[k].detach(), out_b[k].detach(), rtol=2e-3, atol=1e-5, msg=k)


def test_online_crops_are_fresh_every_epoch_and_replayable(tiny_cache, tiny_teachers):
    cfg = DistillConfig(cache=str(tiny_cache), device="cpu", pretrained=False, teachers_online=str(tiny_teachers))
    cache, _ = open_inputs(cfg)
    online = teacher_source(cache.meta, cfg, cache.meta.out_size, CPU)
    rows, hw = np.arange(20), np.full((20, 2), cache.meta.store_size)
    e0, e1 = online.crops(rows, hw, 0), online.crops(rows, hw, 1)
    assert not torch.equal(e0[0], e1[0])                       # a new crop each epoch
    torch.testing.assert_close(online.crops(rows, hw, 0)[0], e0[0], rtol=0, atol=0)  # replayable
    area = e0[0][:, 2] * e0[0][:, 3]
    assert (area >= 0.7 - 1e-6).all() and (area <= 1 + 1e-6).all()


def test_online_run_trains_and_says_so(tiny_cache, tiny_teachers, tmp_path):
    cfg = DistillConfig(cache=str(tiny_cache), out=str(tmp_path / "run"), epochs=1, batch_size=64, lr=1e-2,
                        gamma=0.5, device="cpu", pretrained=False, teachers_online=str(tiny_teachers))
    s = fit(cfg, progress=False)
    assert s["status"] == "finished" and s["config"]["teachers_online"] == str(tiny_teachers)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert np.isfinite(line["train"]["loss"]) and abs(sum(line["teacher_weights"]) - 1) < 1e-4
    assert "online" in (tmp_path / "run" / "config.json").read_text()
