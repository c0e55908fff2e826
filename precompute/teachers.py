"""Teachers: ERM ResNet-50 backbones, DFR-debiased heads and the biased model (or bring your own).

Protocol (DFR reference code, Kirichenko et al. 2023): ERM with SGD (momentum 0.9, lr 1e-3,
wd 1e-3, batch 32), RandomResizedCrop(scale 0.7-1) + flip; then the last layer is re-trained on
the validation set (``precompute.dfr``). The biased model is the first ERM model with its own head.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.constants import DFR_ALIASES, DFR_VARIANTS
from core.errors import ConfigError, ToolError
from core.files import (OutputLock, atomic_write_json, atomic_write_text, ensure_dir, read_json_object,
                        save_checkpoint, sha256_file)
from core.models import FEATURE_DIMS, CheckpointError, build_model, check_layout, load_checkpoint
from core.provenance import settings_diff
from core.runtime import autocast, epoch_seed, memory_format_for, pick_device
from core.tables import format_table
from data.metrics import probe_accuracy, split_metrics
from data.store import RESIZE_MODES, ImageStore, Pixels, build_store, store_size_for
from data.views import ViewSpec, render, sample_views
from data.folders import SPLIT_CODES, Metadata, fingerprint, load_metadata
from precompute.dfr import dfr_variant, fit_dfr
from core.manifest import Manifest, load_model, make_entry


# float64 (ERM, its loss and the DFR embeddings): from-scratch SGD amplifies float rounding, so a
# small backbone is the same on any machine only in double; what was measured, and its cost and
# limits: docs/method.md#dfr ("Precision of the backbone").
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TeacherConfig:
    data_root: str
    out: str
    dataset: str = "waterbirds"         # layout of data_root (data.folders.DATASETS)
    dataset_options: dict = field(default_factory=dict)
    num_teachers: int = 5
    seed: int = 0
    epochs: int = 100
    image_size: int = 224
    resize: str = "keep-aspect"         # how images are resized first (data.store.RESIZE_MODES)
    pretrained: bool = True
    weights_file: str | None = None
    shared_backbone: bool = False
    arch: str = "resnet50"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 32
    dfr_retrains: int = 20
    dfr: str = "study"                  # DFR protocol (core.constants.DFR_VARIANTS): study | reference | tool
    dfr_bias: tuple[float, ...] = ()    # per teacher: how much of the training split's spurious
                                        # correlation its DFR data keeps (0: balanced; () all 0)
    precision: str = "float32"          # of ERM training and the DFR embeddings (PRECISIONS)
    overwrite: bool = False             # rebuild teachers that were made with other settings
    device: str = "auto"
    progress: bool = True

    # Fields that do not change what is built: outside the teachers' identity (the data folder's
    # content is in it through its fingerprint, wherever the folder lies).
    PLACEMENT = ("out", "overwrite", "device", "progress", "data_root")

    def __post_init__(self):
        """Every argument checked before any expensive work."""
        if self.num_teachers < 1 or self.epochs < 0 or self.dfr_retrains < 1 or self.batch_size < 1:
            raise ConfigError("--num-teachers, DFR retrains and the batch size must be "
                              f">= 1 and --epochs >= 0 (got {self.num_teachers}, {self.dfr_retrains}, "
                              f"{self.batch_size}, {self.epochs})")
        if self.epochs == 0 and not (self.pretrained or self.weights_file):
            raise ConfigError("--epochs 0 with --no-pretrained would make teachers from an untrained, random "
                              "backbone; train at least one epoch (--epochs 0 means DFR on ImageNet features)")
        for option, value in (("--lr", self.lr), ("weight decay", self.weight_decay),
                              ("momentum", self.momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{option} must be a finite number, got {value!r}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"--lr must be > 0, weight decay >= 0 and momentum in [0, 1) (got {self.lr}, "
                              f"{self.weight_decay}, {self.momentum})")
        if self.image_size < 8:
            raise ConfigError(f"--image-size must be at least 8 px, got {self.image_size}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file; the teachers need a folder")
        self.dfr_bias = tuple(float(b) for b in self.dfr_bias)
        try:
            self.dfr = dfr_variant(self.dfr)  # "report", the study's protocol's old name, is "study"
        except ConfigError:
            raise ConfigError(f"--dfr must be one of {', '.join(DFR_VARIANTS)}, got {self.dfr!r}") from None
        if self.dfr_bias and (len(self.dfr_bias) != self.num_teachers or not all(0 <= b <= 1 for b in self.dfr_bias)):
            raise ConfigError(f"--dfr-bias takes one value in [0, 1] per teacher ({self.num_teachers}), got "
                              f"{','.join(f'{b:g}' for b in self.dfr_bias)}")
        if any(self.dfr_bias) and self.dfr == "reference":
            raise ConfigError("--dfr-bias needs --dfr study or tool: the reference protocol "
                              "balances its data itself")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.arch not in FEATURE_DIMS:
            raise ConfigError(f"unknown architecture {self.arch!r}; known: {', '.join(FEATURE_DIMS)}")
        pick_device(self.device)

    def identity(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.PLACEMENT}
        if self.weights_file:  # the weights, not where the file lies
            d["weights_file"] = sha256_file(self.weights_file)
        return d


def recorded_identity(config):
    """A teachers' identity as a record holds it (``teachers_config.json``, the default's
    ``backbone_config.json``), in today's names: older versions recorded the study's DFR protocol
    as ``"report"``, so that their teachers are still the same teachers. Not a dict: as it is."""
    if isinstance(config, dict) and isinstance(config.get("dfr"), str) and config["dfr"] in DFR_ALIASES:
        return {**config, "dfr": DFR_ALIASES[config["dfr"]]}
    return config


@torch.inference_mode()
def embed(model, images: torch.Tensor, hw: torch.Tensor, box: np.ndarray, flip: np.ndarray, out_size: int,
          device: torch.device, batch_size: int = 256, progress: bool = False, desc: str = "embed",
          dtype: torch.dtype = torch.float32):
    """Eval-mode forward of ``model`` on one view per image (stored ``images``, data.store.Pixels,
    L, L] holding images of ``hw`` [N, 2] pixels).

    Returns (logits [N, C], penultimate [N, D]) on the CPU, in ``dtype``.
    """
    model.eval().to(device=device, dtype=dtype)
    logits, embs = [], []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = render(images[s:s + batch_size].to(device), torch.from_numpy(box[s:s + batch_size]),
                   torch.from_numpy(flip[s:s + batch_size]), out_size, hw[s:s + batch_size]).to(dtype)
        with autocast(device):
            z, f = model(x.contiguous(memory_format=memory_format_for(device)), layers=("layer4",))
        logits.append(z.to(dtype).cpu())
        embs.append(f["layer4"].to(dtype).cpu())
    return torch.cat(logits), torch.cat(embs)


def _epoch_views(rows: np.ndarray, hw: np.ndarray, seed: int, epoch: int):
    # A fresh RandomResizedCrop + flip per (seed, epoch, row): replayable, so resume is exact.
    box, flip = sample_views(rows, ViewSpec(random_views=1, seed=epoch_seed(seed, epoch)), hw)
    return box[:, 1], flip[:, 1]


# The TeacherConfig fields that shape an ERM run: a resume must use the values it started with.
ERM_FIELDS = ("arch", "image_size", "resize", "pretrained", "weights_file", "lr", "momentum", "weight_decay",
              "batch_size", "precision")


def train_erm(cfg: TeacherConfig, seed: int, images: torch.Tensor, hw: torch.Tensor, meta: Metadata,
              path: Path, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """ERM on the training split; resumes from ``path.ckpt`` after a kill. Returns the state dict."""
    if path.is_file():
        return load_checkpoint(path)
    run = {**{f: getattr(cfg, f) for f in ERM_FIELDS}, "seed": seed, "num_classes": num_classes}
    device = pick_device(cfg.device)
    resume = path.with_name(path.name + ".ckpt")
    ck = torch.load(resume, map_location="cpu", weights_only=True) if resume.is_file() else None
    if ck is not None:  # bounded like any checkpoint before a value is read (the folder may be received)
        if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
            raise CheckpointError(f"{resume}: not an ERM resume checkpoint; delete it to start over")
        check_layout(ck["model"], resume, resume.stat().st_size)
    # a checkpoint without a config predates this check; one without a precision, the float64 option
    started = {"precision": "float32", **(ck or {}).get("config", run)}
    changed = settings_diff(started, run)
    if changed:
        raise CheckpointError(f"{resume}: an ERM run started with other settings ({'; '.join(changed)}); "
                              "use those settings to resume it, or delete it to start over")
    torch.manual_seed(seed)
    model = build_model(cfg.arch, num_classes, cfg.pretrained, cfg.weights_file).to(device)
    dtype = PRECISIONS[cfg.precision]
    model = model.to(dtype=dtype, memory_format=memory_format_for(device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = 0
    if ck is not None:
        model.net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["epoch"])
    rows = meta.rows("train")
    y = torch.from_numpy(meta.y)
    for epoch in range(start, cfg.epochs):
        model.train()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        box, flip = _epoch_views(rows, hw[rows].numpy(), seed, epoch)
        box, flip = torch.from_numpy(box), torch.from_numpy(flip)
        total, correct, seen = 0.0, 0, 0
        bar = tqdm(range(0, len(rows), cfg.batch_size),
                   desc=f"ERM seed {seed} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for s in bar:
            idx = order[s:s + cfg.batch_size]
            r = torch.from_numpy(rows)[idx]
            x = render(images[r].to(device, non_blocking=True), box[idx], flip[idx], cfg.image_size,
                       hw[r]).to(dtype)
            target = y[r].to(device)
            with autocast(device):
                logits, _ = model(x.contiguous(memory_format=memory_format_for(device)), layers=())
                loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
        save_checkpoint({"model": model.net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                         "config": run}, resume)
    # float32 like any checkpoint (the teachers run in float32 from here on; embeddings for DFR in
    # cfg.precision)
    state = {k: v.cpu().float() if v.is_floating_point() else v.cpu() for k, v in model.net.state_dict().items()}
    save_checkpoint(state, path)
    resume.unlink(missing_ok=True)
    return state


def pretrain_backbone(cfg: TeacherConfig, path: str | Path) -> Path:
    """A backbone for ``cfg.weights_file``: ERM on ``cfg.data_root``'s training split with every group
    (class x attribute) its own class, so that its features carry both the object and the background,
    as ImageNet features carry birds and scenes. For a data set whose class and attribute are
    independent (``data.synth.SynthSpec(independent=True)``): the synthetic default's stand-in for
    ImageNet pretraining. Resumes after a kill, reuses a finished file; returns ``path``."""
    path = Path(path)
    meta = load_metadata(cfg.data_root, cfg.dataset, **cfg.dataset_options)
    groups = dataclasses.replace(meta, y=meta.group, class_names=tuple(meta.group_names))
    ensure_dir(path.parent, "pretrained backbone's folder")
    with OutputLock(path.parent, "the pretrained backbone's folder"):
        images, hw = _prepare_images(cfg, meta, path.parent, fingerprint(meta))
        train_erm(cfg, cfg.seed, images, hw, groups, path, num_classes=groups.num_classes)
    return path


def dfr_proportions(meta: Metadata, bias: float):
    """Group shares of a teacher's DFR data: balanced (None) at bias 0, the training split's
    (spurious) proportions at bias 1, linear in between."""
    if bias == 0:
        return None
    train = meta.group_counts("train").astype(float)
    present = train > 0
    uniform = present / present.sum()
    return (1 - bias) * uniform + bias * train / train.sum()


def evaluate_logits(logits: torch.Tensor, meta: Metadata) -> dict:
    """Per-split group metrics of eval-view logits for every row of ``meta`` (with group names)."""
    out = split_metrics(logits.argmax(1).numpy(), meta.y, meta.group, meta.split,
                        {s: SPLIT_CODES[s] for s in ("val", "test")}, meta.num_groups)
    return {split: {**m, "group_names": list(meta.group_names)} for split, m in out.items()}


def format_eval_table(man: Manifest) -> str:
    """Per model: val/test per-group accuracy, WGA and average accuracy, as Markdown."""
    rows = [[m.name, m.role, split, *("-" if a != a else f"{100 * a:.1f}" for a in r["group_acc"]),
             *("-" if r[k] is None else f"{100 * r[k]:.1f}" for k in ("wga", "avg_acc", "mean_acc"))]
            for m in man.models for split, r in m.metrics.items()]
    first = next((r for m in man.models for r in m.metrics.values()), {})
    groups = first.get("group_names") or [f"g{g}" for g in range(len(first.get("group_acc", [])))]
    return format_table(["model", "role", "split", *groups, "WGA", "avg acc", "mean acc"], rows)


ENSEMBLE = "ensemble.json"  # the ensemble's own numbers, beside the manifest


def ensemble_summary(teacher_logits: list[torch.Tensor], emb: torch.Tensor, meta: Metadata) -> dict:
    """What the ensemble holds before any student is trained, from the eval-view outputs of every
    row: the AVER ensemble (the plain mean of the teachers' logits, evaluated directly) per split,
    and how well a linear probe reads the spurious attribute from the backbone's pooled features
    ``emb`` (logistic regression fit on the validation rows, scored on the test rows: the
    background a feature loss could pass on)."""
    aver = evaluate_logits(torch.stack([z.double() for z in teacher_logits]).mean(0), meta)
    val, test = meta.rows("val"), meta.rows("test")
    probe = None
    if len(np.unique(meta.attr[val])) > 1 and len(test):
        chance = float(np.max(np.bincount(meta.attr[test])) / len(test))
        probe = {"test": probe_accuracy(emb[val].numpy(), meta.attr[val], emb[test].numpy(), meta.attr[test]),
                 "chance": chance, "attribute": "/".join(meta.attr_names)}
    return {"aver": aver, "attribute_probe": probe}


def format_ensemble(man: Manifest, summary: dict) -> str:
    """The ensemble's numbers in words: strong and weak teachers, the AVER ensemble, the probe."""
    test = [100 * m.metrics["test"]["wga"] for m in man.teachers if "test" in m.metrics]
    lines = []
    aver = summary.get("aver", {}).get("test")
    if aver and test:
        groups = ", ".join(f"{n} {100 * a:.1f}" for n, a in zip(aver["group_names"], aver["group_acc"]))
        lines.append("AVER ensemble (mean of the teachers' logits, no student): test WGA "
                     f"{100 * aver['wga']:.1f} ({groups}); the teachers' own test WGA "
                     f"{' / '.join(f'{w:.1f}' for w in test)}")
    probe = summary.get("attribute_probe")
    if probe:
        lines.append(f"linear probe for the attribute ({probe['attribute']}) on the "
                     f"backbone's pooled features: {100 * probe['test']:.1f}% on test rows (chance "
                     f"{100 * probe['chance']:.1f}%)")
    return "\n".join(lines)


def read_ensemble(man: Manifest) -> dict:
    """The ensemble's numbers ``build_teachers`` wrote beside the manifest ({} when there are none)."""
    return (read_json_object(man.root / ENSEMBLE) if (man.root / ENSEMBLE).is_file() else None) or {}


def describe(man: Manifest) -> str:
    """The teachers' table and, when ``build_teachers`` made them, the ensemble's numbers."""
    return "\n".join(filter(None, [format_eval_table(man), format_ensemble(man, read_ensemble(man))]))


def _prepare_images(cfg: TeacherConfig, meta: Metadata, out: Path, fp: str) -> tuple[Pixels, torch.Tensor]:
    """The data set through its image store: every image at its stored size, and the sizes [N, 2]."""
    size = store_size_for(cfg.image_size)
    path = build_store(meta, out / f"images_{size}px_{cfg.resize}.h5", size, fp, cfg.resize,
                       progress=cfg.progress)
    store = ImageStore(path, fp, size, cfg.resize)
    return store.load_all(), torch.from_numpy(store.hw)


BUILT = ("erm_seed*.pt", "erm_seed*.pt.ckpt", "teacher_*_dfr_head.pt", "manifest.json", "eval.md",
         "teachers_config.json", "ensemble.json")


def _claim_folder(cfg: TeacherConfig, out: Path, fp: str) -> None:
    """Reuse what ``out`` holds only when it was built with these settings from this data set;
    otherwise refuse, or with ``overwrite`` delete it, so no file claims a training that never
    happened."""
    identity = {"config": cfg.identity(), "dataset_fingerprint": fp}
    record = out / "teachers_config.json"
    if record.is_file() or any(out.glob("erm_seed*.pt*")):
        before = (read_json_object(record) if record.is_file() else None) or {}  # bounded: may be received
        diff = settings_diff(recorded_identity(before.get("config", {})), identity["config"])
        if before.get("dataset_fingerprint") != fp:
            diff.append("the data set differs (another folder, or its files changed)")
        if diff and not cfg.overwrite:
            raise ToolError(f"{out} holds teachers built with other settings or data ({'; '.join(diff)}); "
                            "pass --overwrite to rebuild them there, or choose another --out")
        if diff:
            for pattern in BUILT:
                for p in out.glob(pattern):
                    p.unlink()
    atomic_write_json(record, identity)


def build_teachers(cfg: TeacherConfig) -> Manifest:
    """Train ERM backbone(s), fit DFR heads, evaluate, and write ``cfg.out/manifest.json``.

    Rerun into the same folder with the same settings, it reuses the finished backbones and
    resumes a killed ERM run; with other settings it refuses (or rebuilds with ``overwrite``).
    """
    out = Path(cfg.out)
    meta = load_metadata(cfg.data_root, cfg.dataset, **cfg.dataset_options)
    num_classes = meta.num_classes
    ensure_dir(out, "teachers folder")
    with OutputLock(out, "the teachers folder"):
        fp = fingerprint(meta)
        _claim_folder(cfg, out, fp)
        return _build(cfg, meta, out, fp, num_classes)


def _build(cfg: TeacherConfig, meta: Metadata, out: Path, fp: str, num_classes: int) -> Manifest:
    n_backbones = 1 if cfg.shared_backbone else cfg.num_teachers
    if (cfg.pretrained or cfg.weights_file) and not all(
            (out / f"erm_seed{cfg.seed + b}.pt").is_file() for b in range(n_backbones)):
        # Resolve the ImageNet weights before the image store is built: a failed download or a
        # weights file that does not fit stops the command now, not after minutes of decoding.
        build_model(cfg.arch, num_classes, cfg.pretrained, cfg.weights_file)
    images, hw = _prepare_images(cfg, meta, out, fp)
    device = pick_device(cfg.device)
    eval_box, eval_flip = sample_views(np.arange(len(meta)), ViewSpec(out_size=cfg.image_size), hw.numpy())
    eval_box, eval_flip = eval_box[:, 0], eval_flip[:, 0]
    val = meta.rows("val")
    entries, teacher_logits, first_emb = [], [], None
    for b in range(n_backbones):
        seed = cfg.seed + b
        erm_path = out / f"erm_seed{seed}.pt"
        t0 = time.time()
        state = train_erm(cfg, seed, images, hw, meta, erm_path, num_classes)
        model = build_model(cfg.arch, num_classes)
        model.net.load_state_dict(state)
        logits, emb = embed(model, images, hw, eval_box, eval_flip, cfg.image_size, device,
                            progress=cfg.progress, desc=f"embeddings seed {seed}",
                            dtype=PRECISIONS[cfg.precision])
        if b == 0:
            first_emb = emb
            biased = make_entry("biased", "biased", erm_path, cfg.arch, num_classes, state=state, root=out)
            biased.metrics = evaluate_logits(logits, meta)
        heads = range(cfg.num_teachers) if cfg.shared_backbone else [b]
        for t in heads:
            head = fit_dfr(emb[val].numpy(), meta.y[val], meta.group[val], variant=cfg.dfr,
                           train_emb=emb[meta.rows("train")].numpy() if cfg.dfr == "reference" else None,
                           seed=seed + 1000 * t, num_retrains=cfg.dfr_retrains, num_classes=num_classes,
                           proportions=dfr_proportions(meta, cfg.dfr_bias[t] if cfg.dfr_bias else 0.0))
            if not head.converged and cfg.progress:
                tqdm.write(f"teacher {t + 1}: lbfgs stopped at its iteration limit (as "
                           "the study's dfr.py does)")
            head_path = out / f"teacher_{t + 1}_dfr_head.pt"
            save_checkpoint({"fc.weight": torch.from_numpy(head.weight),
                             "fc.bias": torch.from_numpy(head.bias)}, head_path)
            entry = make_entry(f"teacher_{t + 1}", "teacher", erm_path, cfg.arch, num_classes,
                               head_file=head_path, state=state, root=out)
            dfr_logits = emb @ torch.from_numpy(head.weight).to(emb.dtype).T + torch.from_numpy(head.bias).to(emb.dtype)
            entry.metrics = evaluate_logits(dfr_logits, meta)
            entries.append(entry)
            teacher_logits.append(dfr_logits)
        if cfg.progress:
            tqdm.write(f"backbone seed {seed}: ERM + DFR done in {time.time() - t0:.0f}s")
    man = Manifest(entries + [biased], num_classes, cfg.image_size, cfg.pretrained or bool(cfg.weights_file),
                   out, cfg.resize)
    atomic_write_json(out / ENSEMBLE, ensemble_summary(teacher_logits, first_emb, meta))
    man.save(out / "manifest.json")
    atomic_write_text(out / "eval.md", describe(man) + "\n")
    return man


def _bring_in(out: Path, file: str | Path, sha256: str) -> str:
    """The manifest path (relative to ``out``) of checked checkpoint ``file``: as it is when it lies
    in the teachers folder, else hard-linked (or, across file systems, copied) to
    ``checkpoints/<sha256 prefix>-<name>``, so that the manifest names files in its own folder only
    (core.manifest refuses others: a received manifest could name any file on the machine) and the
    folder can be sent as it is."""
    file, root = Path(file).resolve(), out.resolve()
    if file.is_relative_to(root):
        return str(file.relative_to(root))
    dest = ensure_dir(out / "checkpoints", "teachers folder") / f"{sha256[:12]}-{file.name}"
    if not dest.is_file():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(file, tmp)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copyfile(file, tmp)
        tmp.replace(dest)
    return str(dest.relative_to(out))


def import_teachers(out: str | Path, teacher_files: list[str], biased_file: str, arch: str = "resnet50",
                    num_classes: int = 2, image_size: int = 224, pretrained: bool = True,
                    data_root: str | None = None, resize: str = "keep-aspect", device: str = "auto",
                    progress: bool = True, dataset: str = "waterbirds",
                    dataset_options: dict | None = None) -> Manifest:
    """Declare existing checkpoints as the ensemble (optionally evaluating them on a data folder)."""
    out = ensure_dir(out, "teachers folder")
    with OutputLock(out, "the teachers folder"):
        meta = load_metadata(data_root, dataset, **(dataset_options or {})) if data_root is not None else None
        if meta is not None and meta.num_classes != num_classes:
            raise ConfigError(f"--num-classes {num_classes} but the data set {meta.root} "
                              f"has {meta.num_classes} classes ({', '.join(meta.class_names)}): a teacher's "
                              "head needs one output per class of the data it is evaluated and "
                              f"distilled on; import heads with {meta.num_classes} "
                              "outputs (nothing was written)")
        named = [(f"teacher_{i + 1}", "teacher", f) for i, f in enumerate(teacher_files)] + [("biased", "biased", biased_file)]
        # all checked first
        entries = [make_entry(name, role, f, arch, num_classes, root=out) for name, role, f in named]
        entries = [dataclasses.replace(e, file=_bring_in(out, f, e.sha256)) for e, (_, _, f) in zip(entries, named)]
        man = Manifest(entries, num_classes, image_size, pretrained, out, resize)
        if data_root is not None:
            cfg = TeacherConfig(data_root, str(out), image_size=image_size, resize=resize, progress=progress)
            images, hw = _prepare_images(cfg, meta, out, fingerprint(meta))
            box, flip = sample_views(np.arange(len(meta)), ViewSpec(out_size=image_size), hw.numpy())
            for e in entries:
                logits, _ = embed(load_model(man, e), images, hw, box[:, 0], flip[:, 0], image_size,
                                  pick_device(device), progress=progress, desc=f"evaluating {e.name}")
                e.metrics = evaluate_logits(logits, meta)
        man.save(out / "manifest.json")
        if data_root is not None:
            atomic_write_text(out / "eval.md", format_eval_table(man) + "\n")
    return man
