"""Training of the joint segmentation and motion model (:class:`pddreg.models.joint.JointNet`)
on few labelled and many unlabelled subjects, and of its baselines.

- :func:`train_joint`: random pairs of all training subjects; only the first ``labelled``
  training subjects keep their labels (the others count as unlabelled); half of the pairs are
  drawn among the labelled subjects so that the label loss sees enough of them;
- :func:`train_segnet`: the segmentation-only baseline (:class:`pddreg.models.joint.SegNet`,
  the same feature net and head) on the labelled subjects alone;
- :class:`LabelledView`: a dataset whose ``train`` split is cut to its first ``labelled``
  subjects, for the registration-only baseline (:func:`pddreg.train.train` on the same labels).

Reproducible: the model is built after ``torch.manual_seed(seed)``, pairs and augmentations
come from one ``torch.Generator`` seeded with ``seed``. No DDP and no resume here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pddreg.errors import InputError

__all__ = [
    "JointTrainConfig",
    "LabelledView",
    "build_joint",
    "segmentation_dice",
    "train_joint",
    "train_segnet",
]

log = logging.getLogger(__name__)


@dataclass
class JointTrainConfig:
    """Settings of :func:`train_joint` / :func:`train_segnet`.

    Attributes:
        labelled: how many training subjects keep their labels (the first ones of the
            ``train`` split); None: all.
        steps, lr, alpha_lr, batch, seed, augment: as :class:`pddreg.train.TrainConfig`.
        labelled_pairs: fraction of the pairs drawn among the labelled subjects.
        seg_weight, label_weight, similarity_weight, consistency_weight: loss weights (None:
            the model's config).
        init: ``"shipped"`` (the PDD-Net starts from the shipped weights of its dimension),
            a saved PDD-Net or JointNet file, or None (random).
        device: "cpu", "cuda", ... (None: CUDA when available).
        progress: show a progress bar.
    """

    labelled: int | None = None
    steps: int = 300
    lr: float = 1e-3
    alpha_lr: float = 2e-2
    batch: int = 4
    seed: int = 0
    augment: bool = True
    labelled_pairs: float = 0.5
    seg_weight: float | None = None
    label_weight: float | None = None
    similarity_weight: float | None = None
    consistency_weight: float | None = None
    init: str | None = "shipped"
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.labelled is not None and int(self.labelled) < 1:
            raise InputError(f"--labelled: must be >= 1, got {self.labelled}")
        for name in ("steps", "batch"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr: must be a positive number, got {self.lr}")


class LabelledView:
    """``dataset`` with its ``train`` split cut to its first ``labelled`` subjects (all ordered
    pairs among them); every other split and attribute is the dataset's."""

    def __init__(self, dataset: Any, labelled: int) -> None:
        self._dataset = dataset
        ids = list(dataset.indices("train"))
        if len(ids) < 2 or int(labelled) < 2:
            raise InputError(f"--labelled: need at least 2 labelled subjects, got {labelled}")
        self._train = ids[: int(labelled)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)

    def indices(self, split: str = "all") -> list[int]:
        return list(self._train) if split == "train" else self._dataset.indices(split)

    def pairs(self, split: str = "all") -> list[tuple[int, int]]:
        if split != "train":
            return self._dataset.pairs(split)
        return [(i, j) for i in self._train for j in self._train if i != j]

    def sample_pair(self, gen: torch.Generator, split: str = "train") -> tuple[Tensor, ...]:
        pairs = self.pairs(split)
        k = int(torch.randint(0, len(pairs), (1,), generator=gen))
        out = []
        for i in pairs[k]:
            s = self._dataset.subject(i)
            out.append(
                (
                    torch.from_numpy(np.array(s.image, np.float32))[None],
                    torch.from_numpy(np.array(s.labels, np.int64))[None],
                )
            )
        return out[0][0], out[1][0], out[0][1], out[1][1]


def _device(name: str | None) -> torch.device:
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: CUDA requested but not available")
    return dev


def _subjects(dataset: Any, ids: list[int], labelled: set[int]) -> dict[int, tuple[Tensor, Tensor]]:
    out = {}
    for i in ids:
        s = dataset.subject(i)
        image = torch.as_tensor(np.asarray(s.image, dtype=np.float32))[None]
        if i in labelled:
            if s.labels is None:
                raise InputError(f"dataset subject {s.name!r}: has no label map")
            labels = torch.as_tensor(np.asarray(s.labels)).long()[None]
        else:
            labels = torch.zeros_like(image, dtype=torch.int64)
        out[i] = (image, labels)
    if len({tuple(v[0].shape) for v in out.values()}) > 1:
        raise InputError("dataset: training subjects differ in shape; resample them to one grid")
    return out


def build_joint(dataset: Any, config: JointTrainConfig) -> torch.nn.Module:
    """A new :class:`JointNet` for ``dataset`` (the shipped PDD-Net configuration of its
    dimension; its weights with ``init="shipped"``, or those of a saved model)."""
    from pddreg.models import default_config, load_model, pretrained
    from pddreg.models.joint import JointNet, JointNetConfig

    ndim = int(dataset.ndim)
    k = max(2, int(dataset.num_labels))
    weights = {
        name: getattr(config, name)
        for name in ("seg_weight", "label_weight", "similarity_weight", "consistency_weight")
        if getattr(config, name) is not None
    }
    base = None
    if config.init == "shipped":
        base = pretrained(ndim)
    elif config.init is not None:
        base = load_model(config.init, map_location="cpu")
        if type(base).__name__ == "JointNet":
            return base
    pdd_cfg = dataclasses.asdict(default_config(ndim))
    if base is not None:
        pdd_cfg = {**dataclasses.asdict(base.config), "smooth": default_config(ndim).smooth}
    model = JointNet(JointNetConfig(ndim=ndim, num_labels=k, pdd=pdd_cfg, **weights))
    if base is not None:
        model.pdd.load_state_dict(base.state_dict())
    return model


def _param_groups(model: torch.nn.Module, config: JointTrainConfig) -> list[dict[str, Any]]:
    alpha = [p for n, p in model.named_parameters() if n.split(".")[-1].startswith("alpha")]
    ids = {id(p) for p in alpha}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": config.lr}]
    if alpha:
        groups.append({"params": alpha, "lr": config.alpha_lr})
    return groups


def train_joint(
    dataset: Any,
    config: JointTrainConfig | None = None,
    model: torch.nn.Module | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.nn.Module:
    """Train a :class:`JointNet` (see the module); returns it in eval mode."""
    from .loop import augment_pair

    config = config or JointTrainConfig()
    dev = _device(config.device)
    ids = list(dataset.indices("train"))
    if len(ids) < 2:
        raise InputError(f"dataset: training needs at least 2 subjects, got {len(ids)}")
    n_lab = len(ids) if config.labelled is None else min(int(config.labelled), len(ids))
    labelled = ids[:n_lab]
    subjects = _subjects(dataset, ids, set(labelled))
    torch.manual_seed(config.seed)
    if model is None:
        model = build_joint(dataset, config)
    model.to(dev).train()
    opt = torch.optim.Adam(_param_groups(model, config), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    num_labels = max(2, int(dataset.num_labels))

    def draw(pool: list[int]) -> tuple[int, int]:
        i = int(torch.randint(0, len(pool), (1,), generator=gen))
        j = int(torch.randint(0, len(pool) - 1, (1,), generator=gen))
        return pool[i], pool[j + (j >= i)]

    bar = tqdm(range(config.steps), disable=not config.progress, desc="train joint")
    for step in bar:
        batch: list[list[Tensor]] = [[], [], [], [], [], []]
        for _ in range(config.batch):
            use_lab = n_lab >= 2 and float(torch.rand(1, generator=gen)) < config.labelled_pairs
            fi, mi = draw(labelled if use_lab else ids)
            (f, fs), (m, ms) = subjects[fi], subjects[mi]
            if config.augment:
                f, fs = augment_pair(f, fs, gen)
                m, ms = augment_pair(m, ms, gen)
            for lst, v in zip(batch, (f, m, fs, ms), strict=False):
                lst.append(v)
            batch[4].append(torch.tensor(fi in labelled[:n_lab]))
            batch[5].append(torch.tensor(mi in labelled[:n_lab]))
        f, m, fs, ms, fl, ml = (torch.stack(v).to(dev) for v in batch)
        loss, logs = model.training_loss(f, m, fs, ms, num_labels, fl, ml)
        if not torch.isfinite(loss):
            raise RuntimeError(f"train_joint(): loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if callback is not None:
            callback(step + 1, logs)
    return model.eval()


def train_segnet(
    dataset: Any,
    config: JointTrainConfig | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.nn.Module:
    """The segmentation-only baseline: a :class:`SegNet` with the feature net and head sizes
    of the joint model, on the ``labelled`` training subjects only (same steps and batch;
    the feature net starts from the shipped PDD-Net's with ``init="shipped"``)."""
    from pddreg.models import default_config, pretrained
    from pddreg.models.joint import SegNet, SegNetConfig

    from .loop import augment_pair

    config = config or JointTrainConfig()
    dev = _device(config.device)
    ids = list(dataset.indices("train"))
    n_lab = len(ids) if config.labelled is None else min(int(config.labelled), len(ids))
    labelled = ids[:n_lab]
    subjects = _subjects(dataset, labelled, set(labelled))
    torch.manual_seed(config.seed)
    ndim = int(dataset.ndim)
    pdd = default_config(ndim)
    model = SegNet(
        SegNetConfig(
            ndim=ndim,
            num_labels=max(2, int(dataset.num_labels)),
            features=pdd.features,
            feature_kwargs=dict(pdd.feature_kwargs),
        )
    )
    if config.init == "shipped":
        model.features.load_state_dict(pretrained(ndim).features.state_dict())
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), disable=not config.progress, desc="train seg")
    for step in bar:
        images, segs = [], []
        for _ in range(config.batch):
            i = labelled[int(torch.randint(0, len(labelled), (1,), generator=gen))]
            img, seg = subjects[i]
            if config.augment:
                img, seg = augment_pair(img, seg, gen)
            images.append(img)
            segs.append(seg)
        loss, logs = model.training_loss(torch.stack(images).to(dev), torch.stack(segs).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if callback is not None:
            callback(step + 1, logs)
    return model.eval()


@torch.no_grad()
def segmentation_dice(model: Any, dataset: Any, indices: list[int], device: Any = None) -> float:
    """Mean Dice (labels > 0, nanmean over labels and images) of ``model.segment`` on the
    subjects ``indices``."""
    from pddreg.metrics import mean_dice

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    scores = []
    for i in indices:
        s = dataset.subject(i)
        image = torch.as_tensor(np.asarray(s.image, dtype=np.float32))[None, None].to(dev)
        seg = model.segment(image).argmax(1)[0].cpu().numpy()
        scores.append(mean_dice(np.asarray(s.labels), seg))
    return float(np.nanmean(scores)) if scores else float("nan")
