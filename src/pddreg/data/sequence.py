"""A 2D+t sequence phantom with ground-truth masks: a beating, breathing heart and a fast tool.

The lecture's two tracking cases in one sequence: a heart-like shape (a textured elliptic wall
around a dark blood pool) that contracts and relaxes (the wall thickens as the cavity shrinks,
keeping its area) and moves with breathing, over textured background tissue that moves with the
breathing too; and a textured instrument (a striped rod) that moves fast across the frames and
turns slightly, over everything (the surgical-tool case). Labels: 0 background, 1 heart wall,
2 instrument (:data:`SEQUENCE_LABELS`).

Every textured object is drawn from its own material coordinates, so its texture moves with it
(it can be tracked); the blood pool gets new speckle in every frame (it cannot), and every frame
gets independent noise. Frames ``(T, H, W)`` float32 in [0, 1], masks ``(T, H, W)`` int64.
Everything is deterministic per seed (``numpy.random.default_rng``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["SEQUENCE_LABELS", "SequenceConfig", "SequenceDataset", "make_sequence"]

#: Label names of :func:`make_sequence`, indexed by value.
SEQUENCE_LABELS: tuple[str, ...] = ("background", "heart", "instrument")


@dataclass(frozen=True)
class SequenceConfig:
    """Motion and appearance of :func:`make_sequence` (sizes relative to the frame).

    Attributes:
        beat_period: frames per heart beat.
        contraction: relative shrinking of the blood pool's radii at end-systole.
        breath_period: frames per breath.
        breath_amplitude: breathing excursion as a fraction of the frame height.
        tool_speed: instrument speed in pixels per frame (per 100 pixels of frame width).
        tool_turn: instrument rotation in degrees per frame.
        noise: standard deviation of the per-frame noise.
    """

    beat_period: float = 10.0
    contraction: float = 0.25
    breath_period: float = 32.0
    breath_amplitude: float = 0.06
    tool_speed: float = 4.0
    tool_turn: float = 1.0
    noise: float = 0.03


def _texture(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy import ndimage

    t = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    t -= t.min()
    return (t / max(float(t.max()), 1e-12)).astype(np.float32)


def _sample(texture: np.ndarray, rows: np.ndarray, cols: np.ndarray, offset: float) -> np.ndarray:
    """``texture`` at (rows + offset, cols + offset), linear, reflected at its borders."""
    from scipy import ndimage

    coords = np.stack([rows + offset, cols + offset])
    return ndimage.map_coordinates(texture, coords, order=1, mode="mirror")


def make_sequence(
    frames: int = 12,
    shape: Sequence[int] = (96, 112),
    seed: int = 0,
    config: SequenceConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A sequence of ``frames`` images of ``shape`` with their masks (see the module).

    Returns:
        ``(images (T, H, W) float32 in [0, 1], labels (T, H, W) int64)``; labels 1 = heart wall,
        2 = instrument (drawn over the heart).
    """
    cfg = config or SequenceConfig()
    if len(tuple(shape)) != 2 or min(int(s) for s in shape) < 32:
        raise InputError(f"make_sequence(): shape must be 2 sizes of at least 32, got {shape}")
    if int(frames) < 2:
        raise InputError(f"make_sequence(): need at least 2 frames, got {frames}")
    h, w = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    pad = max(h, w)
    canvas = (h + 2 * pad, w + 2 * pad)
    tissue = 0.25 + 0.3 * _texture(canvas, rng, 2.0)
    wall = 0.45 + 0.4 * _texture(canvas, rng, 1.5)
    stripes = 0.8 * _texture(canvas, rng, 1.0)

    # the heart: centre, reference radii (outer boundary at rho = 1), a random tilt
    centre0 = np.array([h * rng.uniform(0.42, 0.55), w * rng.uniform(0.4, 0.55)])
    axes = np.array([0.26 * h, 0.2 * w]) * rng.uniform(0.9, 1.1, 2)
    tilt = rng.uniform(-0.5, 0.5)
    r_in0 = 0.62
    # the instrument: a rod across the frame, moving mostly along axis 1
    length, width = 0.55 * w, max(4.0, 0.09 * h)
    tool0 = np.array([h * rng.uniform(0.3, 0.7), w * rng.uniform(0.2, 0.3)])
    heading = math.radians(rng.uniform(-20, 20))
    speed = cfg.tool_speed * w / 100.0
    velocity = speed * np.array([math.sin(heading), math.cos(heading)])
    angle0 = math.radians(rng.uniform(50, 70)) * rng.choice([-1, 1])
    phase_beat, phase_breath = rng.uniform(0, 2 * math.pi, 2)

    rows, cols = np.indices((h, w), dtype=np.float64)
    images = np.empty((int(frames), h, w), np.float32)
    labels = np.zeros((int(frames), h, w), np.int64)
    ct, st = math.cos(tilt), math.sin(tilt)
    for t in range(int(frames)):
        breath = (
            cfg.breath_amplitude * h * math.sin(2 * math.pi * t / cfg.breath_period + phase_breath)
        )
        shift = np.array([breath, 0.3 * breath])
        beat = 0.5 - 0.5 * math.cos(2 * math.pi * t / cfg.beat_period + phase_beat)
        r_in = r_in0 * (1.0 - cfg.contraction * beat)
        r_out = math.sqrt(1.0 - r_in0**2 + r_in**2)  # the wall keeps its area
        # background tissue: rigidly with the breathing
        image = _sample(tissue, rows - shift[0], cols - shift[1], pad)
        # heart wall in elliptic coordinates about the moving centre
        c = centre0 + shift
        q0, q1 = rows - c[0], cols - c[1]
        e0, e1 = (ct * q0 + st * q1) / axes[0], (-st * q0 + ct * q1) / axes[1]
        rho = np.sqrt(e0**2 + e1**2)
        in_wall = (rho >= r_in) & (rho < r_out)
        rho0 = np.sqrt(np.clip(rho**2 - r_in**2 + r_in0**2, 0, None))
        scale = np.where(rho > 1e-9, rho0 / np.maximum(rho, 1e-9), 1.0)
        ref0, ref1 = centre0[0] + q0 * scale, centre0[1] + q1 * scale
        heart = _sample(wall, ref0, ref1, pad)
        image = np.where(in_wall, heart, image)
        pool = rho < r_in
        speckle = 0.08 + 0.1 * rng.random((h, w))
        image = np.where(pool, speckle, image)
        lab = np.where(in_wall, 1, 0)
        # the instrument: a rotated rectangle with stripes in its own coordinates
        p = tool0 + velocity * t
        ang = angle0 + math.radians(cfg.tool_turn) * t
        ca, sa = math.cos(ang), math.sin(ang)
        d0, d1 = rows - p[0], cols - p[1]
        along, across = ca * d1 + sa * d0, -sa * d1 + ca * d0
        on_tool = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        band = 0.5 + 0.5 * np.sin(2 * math.pi * along / 6.0)
        tool = 0.55 + 0.25 * band + 0.2 * _sample(stripes, across, along, pad)
        image = np.where(on_tool, tool, image)
        lab = np.where(on_tool, 2, lab)
        image = image + cfg.noise * rng.standard_normal((h, w))
        images[t] = np.clip(image, 0.0, 1.0)
        labels[t] = lab
    return images, labels


class SequenceDataset:
    """The frames of several sequence phantoms as subjects of one dataset (for training a joint
    segmentation and motion model, :func:`pddreg.train.joint.train_joint`): subject ``k`` is
    frame ``k % frames`` of the sequence of seed ``seeds[k // frames]``; every subject is in
    the ``train`` split (pairs: all ordered pairs of frames of one sequence).

    A minimal :class:`pddreg.data.RegistrationDataset`-like object: ``ndim``, ``num_labels``,
    ``label_names``, ``indices``, ``pairs``, ``subject``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        frames: int = 12,
        shape: Sequence[int] = (96, 112),
        config: SequenceConfig | None = None,
    ) -> None:
        self.ndim = 2
        self.label_names = SEQUENCE_LABELS
        self.num_labels = len(SEQUENCE_LABELS)
        self._frames = int(frames)
        self._data = [make_sequence(frames, shape, int(s), config) for s in seeds]
        self._seeds = [int(s) for s in seeds]

    def __len__(self) -> int:
        return len(self._data) * self._frames

    def indices(self, split: str = "all") -> list[int]:
        """Every frame (``train``, ``all``): the first frame of every sequence first, so that
        "the first N subjects" (the labelled ones of :func:`pddreg.train.joint.train_joint`)
        are spread over the sequences."""
        if split not in ("train", "all"):
            return []
        firsts = [s * self._frames for s in range(len(self._data))]
        return firsts + [i for i in range(len(self)) if i % self._frames]

    def pairs(self, split: str = "all") -> list[tuple[int, int]]:
        out = []
        for s in range(len(self._data)) if split in ("train", "all") else []:
            ids = range(s * self._frames, (s + 1) * self._frames)
            out += [(i, j) for i in ids for j in ids if i != j]
        return out

    def subject(self, i: int) -> Any:
        from .datasets import Subject

        s, t = divmod(int(i), self._frames)
        images, labels = self._data[s]
        return Subject(images[t], labels[t], (1.0, 1.0), f"sequence{self._seeds[s]}_{t:03d}")
