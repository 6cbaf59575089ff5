"""Weakly supervised training of registration models on random inter-subject pairs.

Reproducible: the model is built after ``torch.manual_seed(seed)``; the pairs, crops and
augmentations of slot ``j`` of the global batch (``j = rank * batch + i`` for pair ``i`` of a
process) come from their own ``torch.Generator`` seeded with ``seed + j``. The generators'
states are checkpointed with the model, the optimiser and the step, so ``resume=True``
continues exactly as an uninterrupted run would (the checkpoint is written to a temporary file
and renamed: a run killed at any moment resumes from its last checkpoint).

Under ``torchrun`` (``WORLD_SIZE`` set) the model is wrapped in ``DistributedDataParallel``
(gloo on CPU, nccl on CUDA); rank 0 logs and writes checkpoints. Since each slot has its own
generator and the label losses' class weights are computed over the global batch
(:func:`pddreg.losses.batch_reduction`), N processes with ``batch`` pairs each train the same
weights as one process with ``N * batch`` pairs and the same seed, to float rounding (models
with batch normalisation excepted: its statistics stay per process).

A non-finite loss or gradient stops training before the optimiser step with
:class:`pddreg.errors.TrainingError`; the checkpoint on disk is the last good state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pddreg.errors import InputError, TrainingError

__all__ = ["TrainConfig", "augment_pair", "build_model", "train", "validate"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        model: "pdd" or "voxelmorph" (used when no model is given to :func:`train`).
        features: feature net of a new PDD-Net ("lecture", "obelisk", "mind").
        model_config: extra fields of the new model's config dataclass.
        steps: optimiser steps in total (a resumed run continues up to this number).
        lr: Adam learning rate (of the network weights).
        alpha_lr: learning rate of the scalar regularisation weights (parameters named
            ``alpha*``); they need larger steps than the network weights to move within a
            few hundred steps.
        batch: pairs per step (per process under DDP).
        seed: seeds the model initialisation, the pairs and the augmentation.
        crop: random crop size (same window in both images) or None for whole images.
        augment: light random affine + intensity augmentation of every image.
        checkpoint: checkpoint file (None: no checkpoints, no resume).
        checkpoint_every: write the checkpoint every this many steps (and at the end).
        resume: continue from ``checkpoint`` when it exists.
        val_every: validation Dice every this many steps (0: only at the end).
        val_pairs: at most this many validation pairs.
        device: "cpu", "cuda", "cuda:1"... (None: CUDA when available).
        progress: show a progress bar.
        fields: ask the dataset for the true field of every pair (``sample_pair(gen,
            with_field=True)``, synthetic data) and pass it to the model's ``training_loss``
            (its end-point error term); needs ``augment`` off (the field would not follow).
    """

    model: str = "pdd"
    features: str = "lecture"
    model_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    lr: float = 1e-3
    alpha_lr: float = 2e-2
    batch: int = 4
    seed: int = 0
    crop: list[int] | None = None
    augment: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    val_every: int = 100
    val_pairs: int = 16
    device: str | None = None
    progress: bool = True
    fields: bool = False

    def __post_init__(self) -> None:
        if self.fields and self.augment:
            raise InputError("training: 'fields' needs 'augment' off (the field would not follow)")
        if self.model not in ("pdd", "voxelmorph"):
            raise InputError(f"--model: must be 'pdd' or 'voxelmorph', got {self.model!r}")
        for name in ("steps", "batch", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr: must be a positive number, got {self.lr}")


def build_model(config: TrainConfig, ndim: int) -> nn.Module:
    """A new model for ``ndim``-D images as ``config`` describes it."""
    if config.model == "pdd":
        from pddreg.models import PDDNet, PDDNetConfig

        return PDDNet(PDDNetConfig(ndim=ndim, features=config.features, **config.model_config))
    from pddreg.models.voxelmorph import VoxelMorph, VoxelMorphConfig

    return VoxelMorph(VoxelMorphConfig(ndim=ndim, **config.model_config))


# ---------------------------------------------------------------------- data
def _load_subjects(dataset: Any, indices: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """``{index: (image (1, *S) float32, labels (1, *S) int64)}`` for the subjects used."""
    out = {}
    for i in indices:
        s = dataset.subject(i)
        if s.labels is None:
            raise InputError(
                f"dataset subject {s.name!r}: has no label map (training needs labels)"
            )
        image = torch.as_tensor(np.asarray(s.image, dtype=np.float32))[None]
        labels = torch.as_tensor(np.asarray(s.labels)).long()[None]
        if image.shape != labels.shape:
            raise InputError(
                f"dataset subject {s.name!r}: image {tuple(image.shape[1:])} and labels "
                f"{tuple(labels.shape[1:])} differ in shape"
            )
        out[i] = (image, labels)
    shapes = {tuple(v[0].shape) for v in out.values()}
    if len(shapes) > 1:
        raise InputError(
            f"dataset: training subjects differ in shape ({sorted(shapes)[:3]}...); "
            "resample them to one grid (as Learn2Reg data are)"
        )
    return out


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=gen)


def augment_pair(
    image: Tensor, labels: Tensor, gen: torch.Generator, strength: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Light random augmentation of one subject: affine (rotation up to 5 degrees about each
    axis pair, scaling 0.95-1.05, shift up to 3% of the size) and intensity (gamma 0.8-1.25,
    contrast 0.9-1.1). ``image`` ``(1, *S)`` float in ``[0, 1]``, ``labels`` ``(1, *S)`` int64.
    Random numbers come from ``gen`` only (CPU generator)."""
    ndim = image.dim() - 1
    a = torch.eye(ndim, dtype=torch.float64)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            ang = math.radians(5.0 * strength) * (2 * float(_rand(gen, 1)) - 1)
            r = torch.eye(ndim, dtype=torch.float64)
            r[i, i] = r[j, j] = math.cos(ang)
            r[i, j], r[j, i] = -math.sin(ang), math.sin(ang)
            a = r @ a
    scale = 1 + 0.05 * strength * (2 * _rand(gen, ndim).double() - 1)
    a = a * scale[None, :]
    shift = 0.06 * strength * (2 * _rand(gen, ndim).double() - 1)  # normalised units (2 = size)
    theta = torch.cat([a, shift[:, None]], 1)[None].to(image)
    # affine_grid works in the reversed (x, y[, z]) order of grid_sample: flip rows/cols once
    theta = torch.cat([theta[:, :, :ndim].flip(1, 2), theta[:, :, ndim:].flip(1)], 2)
    size = (1, 1, *image.shape[1:])
    grid = F.affine_grid(theta, size, align_corners=False)
    img = F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    lab = F.grid_sample(
        labels[None].to(image.dtype),
        grid,
        mode="nearest",
        padding_mode="border",
        align_corners=False,
    )
    gamma = math.exp(math.log(1.25) * strength * (2 * float(_rand(gen, 1)) - 1))
    contrast = 1 + 0.1 * strength * (2 * float(_rand(gen, 1)) - 1)
    img = (img.clamp(0, 1) ** gamma * contrast).clamp(0, 1)
    return img[0], lab[0].round().long()


def _crop(tensors: list[Tensor], size: list[int] | None, gen: torch.Generator) -> list[Tensor]:
    if size is None:
        return tensors
    shape = tensors[0].shape[1:]
    if len(size) != len(shape):
        raise InputError(f"crop: needs {len(shape)} sizes, got {list(size)}")
    sl = [slice(None)]
    for c, s in zip(size, shape, strict=True):
        c = min(int(c), s)
        start = int(torch.randint(0, s - c + 1, (1,), generator=gen))
        sl.append(slice(start, start + c))
    return [t[tuple(sl)] for t in tensors]


def _batch(
    dataset: Any,
    subjects: dict[int, tuple[Tensor, Tensor]],
    train_ids: list[int],
    config: TrainConfig,
    gens: list[torch.Generator],
) -> list[Tensor]:
    """``[fixed, moving, fixed_seg, moving_seg]``, each ``(batch, 1, *S)``: random pairs of
    different training subjects, or ``dataset.sample_pair(gen)`` when the dataset makes pairs;
    pair ``i`` from generator ``gens[i]``; with ``config.fields`` also the true fields
    ``(batch, ndim, *S)``."""
    fixed, moving, fseg, mseg, fields = [], [], [], [], []
    n = len(train_ids)
    for gen in gens:
        if config.fields:
            fi, mi, fl, ml, fd = dataset.sample_pair(gen, with_field=True)
            fi, mi, fl, ml, fd = _crop([fi, mi, fl, ml, fd], config.crop, gen)
            fixed.append(fi)
            moving.append(mi)
            fseg.append(fl)
            mseg.append(ml)
            fields.append(fd)
            continue
        if hasattr(dataset, "sample_pair"):
            fi, mi, fl, ml = dataset.sample_pair(gen)
        else:
            i = int(torch.randint(0, n, (1,), generator=gen))
            j = int(torch.randint(0, n - 1, (1,), generator=gen))
            j = j + (j >= i)  # a different subject
            fi, fl = subjects[train_ids[i]]
            mi, ml = subjects[train_ids[j]]
        if config.augment:
            fi, fl = augment_pair(fi, fl, gen)
            mi, ml = augment_pair(mi, ml, gen)
        fi, mi, fl, ml = _crop([fi, mi, fl, ml], config.crop, gen)
        fixed.append(fi)
        moving.append(mi)
        fseg.append(fl)
        mseg.append(ml)
    groups = (fixed, moving, fseg, mseg, fields) if fields else (fixed, moving, fseg, mseg)
    return [torch.stack(x) for x in groups]


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    alpha = [p for n, p in model.named_parameters() if n.split(".")[-1].startswith("alpha")]
    ids = {id(p) for p in alpha}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": config.lr}]
    if alpha:
        groups.append({"params": alpha, "lr": config.alpha_lr})
    return groups


# ---------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, dataset: Any, pairs: list[tuple[int, int]], device: Any) -> float:
    """Mean Dice (labels > 0, nanmean over labels and pairs) of ``model.register`` on ``pairs``."""
    from pddreg.metrics import mean_dice
    from pddreg.spatial import warp_labels

    scores = []
    for fi, mi in pairs:
        f, m = dataset.subject(fi), dataset.subject(mi)
        fixed = torch.as_tensor(np.asarray(f.image, dtype=np.float32))[None, None].to(device)
        moving = torch.as_tensor(np.asarray(m.image, dtype=np.float32))[None, None].to(device)
        mseg = torch.as_tensor(np.asarray(m.labels)).long()[None, None].to(device)
        disp = model.register(fixed, moving, instance_opt=False)  # the network alone
        warped = warp_labels(mseg, disp)[0, 0].cpu().numpy()
        scores.append(mean_dice(np.asarray(f.labels), warped))
    return float(np.nanmean(scores)) if scores else float("nan")


# ---------------------------------------------------------------------- checkpoints
class _LossModule(nn.Module):
    """Calls ``model.training_loss`` through ``forward`` so that DDP sees it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[Tensor, dict[str, float]]:
        return self.model.training_loss(*args)


def _save_checkpoint(
    path: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    gen_states: list[Tensor],
    world: int = 1,
) -> None:
    from pddreg.models.io import atomic_save

    atomic_save(
        {
            "model": type(model).__name__,
            "config": dataclasses.asdict(model.config),
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "generator_states": gen_states,  # one per slot of the global batch
            "world_size": world,
            "torch_rng_state": torch.get_rng_state(),
        },
        path,
    )


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def _resolve_device(name: str | None, local_rank: int) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device: CUDA requested but not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def _global_mean(world: int) -> Callable[[Tensor], Tensor]:
    """The mean of a tensor over the processes (for statistics of the global batch)."""

    def mean(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    return mean


def _bad_gradient(model: nn.Module) -> str | None:
    """``"the gradient of <name> is not finite"`` for the first such parameter, else None."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(g).all() for _, g in named])
    if bool(flags.all()):  # one device sync per step
        return None
    name = next(n for (n, _), ok in zip(named, flags.tolist(), strict=True) if not ok)
    return f"the gradient of {name} is not finite"


# ---------------------------------------------------------------------- train
def train(
    dataset: Any,
    config: TrainConfig | None = None,
    model: nn.Module | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> nn.Module:
    """Train ``model`` (default: a new one from ``config``) on random pairs of
    ``dataset.indices("train")`` with the model's weakly supervised ``training_loss``.

    ``callback(step, logs)`` is called on rank 0 after every step (``logs`` holds "loss", the
    loss terms and "val_dice" when validation ran). Returns the trained model (unwrapped, eval
    mode, on the training device) with its last validation Dice in ``model.val_dice``.
    """
    config = config if config is not None else TrainConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = int(os.environ.get("RANK", "0"))
    device = _resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    train_ids = list(dataset.indices("train"))
    if len(train_ids) < 2:
        raise InputError(
            f"dataset: training needs at least 2 training subjects, got {len(train_ids)}"
        )
    val = list(dataset.pairs("val"))[: config.val_pairs]
    subjects = {} if hasattr(dataset, "sample_pair") else _load_subjects(dataset, train_ids)
    num_labels = int(dataset.num_labels)

    torch.manual_seed(config.seed)
    if model is None:
        model = build_model(config, dataset.ndim)
    model.to(device).train()
    opt = torch.optim.Adam(_param_groups(model, config), lr=config.lr)
    slots = [rank * config.batch + i for i in range(config.batch)]  # of the global batch
    gens = [torch.Generator().manual_seed(config.seed + j) for j in slots]
    step = 0
    last_saved: int | None = None

    if config.resume and config.checkpoint and Path(config.checkpoint).is_file():
        ck = _load_checkpoint(config.checkpoint)
        if ck.get("model") != type(model).__name__:
            raise InputError(
                f"{config.checkpoint}: holds a {ck.get('model')}, not a {type(model).__name__}"
            )
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        last_saved = step
        states = ck["generator_states"]
        if len(states) == world * config.batch:
            for gen, j in zip(gens, slots, strict=True):
                gen.set_state(states[j])
        else:  # another global batch (or an older checkpoint): fresh pairs from here
            if rank == 0:
                log.warning(
                    "%s: holds %d sampler states for a global batch of %d; resuming with fresh "
                    "random pairs (not exactly the uninterrupted run)",
                    config.checkpoint,
                    len(states),
                    world * config.batch,
                )
            for gen, j in zip(gens, slots, strict=True):
                gen.manual_seed(config.seed + j + 1_000_003 * step)
        torch.set_rng_state(ck["torch_rng_state"])
        if rank == 0:
            log.info("resumed from %s at step %d", config.checkpoint, step)

    loss_module: nn.Module = _LossModule(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint(at: int) -> None:
        nonlocal last_saved
        states = [gen.get_state() for gen in gens]
        if distributed:
            per_rank: list[Any] = [None] * world
            dist.all_gather_object(per_rank, states)
            states = [s for part in per_rank for s in part]  # global slot order
        if rank == 0 and config.checkpoint:
            _save_checkpoint(config.checkpoint, model, opt, at, states, world)
        last_saved = at

    def stop(at: int, what: str) -> None:
        kept = (
            f"the checkpoint {config.checkpoint} (step {last_saved}) is the last good state "
            "and is kept"
            if config.checkpoint and last_saved is not None
            else "no checkpoint was written before it"
        )
        raise TrainingError(
            f"training stopped at step {at + 1} of {config.steps}: {what}; {kept}. Lower --lr, "
            "check the training data for NaN/Inf or empty label maps, then rerun with --resume"
        )

    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=True if (not config.progress or rank != 0) else None,  # None: on a terminal
        desc="train",
        dynamic_ncols=True,
    )
    dice = float("nan")
    from pddreg.losses import batch_reduction

    reduce_fn = _global_mean(world) if distributed else None
    while step < config.steps:
        fixed, moving, fseg, mseg, *field = (
            t.to(device) for t in _batch(dataset, subjects, train_ids, config, gens)
        )
        with batch_reduction(reduce_fn):
            loss, logs = loss_module(fixed, moving, fseg, mseg, num_labels, *field)
        # before backward (whose kernels may crash on NaN coordinates), on every process at once
        finite = torch.isfinite(loss.detach()).reshape(1).float()
        if distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            bar.close()
            value = float(loss.detach())
            own = not math.isfinite(value)
            stop(
                step,
                f"the loss is {value} (not finite)"
                if own
                else "another process's loss is not finite",
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        bad = _bad_gradient(model)  # gradients are averaged: every process sees the same
        if bad is not None:
            bar.close()
            stop(step, bad)
        opt.step()
        step += 1
        if rank == 0 and val and config.val_every and step % config.val_every == 0:
            dice = validate(model, dataset, val, device)
            model.train()
            logs["val_dice"] = dice
            log.info("step %d loss %.4f val dice %.4f", step, logs["loss"], dice)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step)
        if callback is not None and rank == 0:
            callback(step, logs)
        shown = {"loss": f"{logs['loss']:.4f}"}
        if not math.isnan(dice):  # validation Dice once it has run
            shown["val_dice"] = f"{dice:.3f}"
        bar.set_postfix(shown)
        bar.update(1)
    bar.close()
    if rank == 0 and val and not (config.val_every and step % config.val_every == 0):
        dice = validate(model, dataset, val, device)
        log.info("final val dice %.4f", dice)
    model.eval()
    model.val_dice = dice  # type: ignore[attr-defined]
    return model
