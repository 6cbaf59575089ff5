"""Synthetic registration pairs with ground-truth fields (SynthMorph / SynthSeg generative model).

One pair, all in torch on the engine's device (CPU or CUDA), one code path for 2D and 3D:

1. **Label map** ``L`` on a canvas: either random smooth noise labels (argmax of ``K`` smooth
   fields, each a random mix of up to three octaves, so large and small structures coexist),
   or an anatomy-like map of an abdominal phantom subject (organs plus tissue classes; 3D
   volumes, their slices in any orientation for 2D, and 2D phantoms), optionally with noise
   labels inside some structures. Random number of labels.
2. **Deformations**: ``fixed = L o phi_F`` and ``moving = L o phi_F o psi`` with
   ``phi_F = C o B_F o exp(v_F)`` (``C`` places the output grid on the canvas: zoom, axis
   permutation and flips, shift; ``B_F`` a random affine for anatomy maps) and the relative
   transform ``psi = A o exp(v)`` (random affine ``A``: rotation, scaling, shear, translation;
   stationary velocity field ``v`` integrated by scaling and squaring, random smoothness and
   amplitude up to ``svf_max_disp`` of the image extent). The ground-truth displacement in the
   pddreg convention (fixed grid, voxels, ``warped(x) = moving(x + u(x))``) is then exactly
   ``u = psi^-1 - id = exp(-v) o A^-1 - id``: no numerical inversion is needed. All maps are
   computed on a coarse node grid (``field_stride`` voxels) and upsampled linearly.
3. **Images**, each of the pair on its own: a random mean per label (uniform, or clustered
   like tissue classes in a random Gaussian mixture), per-label texture noise and sometimes a
   smooth texture inside labels; the moving image shares the fixed contrast, maps it through
   a random monotonic (increasing or inverted) or non-monotonic curve, or draws its own.
   Then speckle (ultrasound-like), blur, thick slices / low resolution (downsample along an
   axis with the slice profile, interpolate back), a smooth multiplicative bias field, gamma,
   Gaussian or Rician noise, percentile normalisation to ``[0, 1]`` and a limited field of view
   (box crop, ultrasound sector / cone, or ellipse; zero outside), independently per image.

Reproducible: a pair is a function of its integer seed (and the device and thread count);
:meth:`SynthEngine.sample` draws that seed from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pddreg.errors import InputError

from .synth_labels import AnatomyPool, noise_labels, slice_of, subdivide
from .synth_ops import (
    apply_affine,
    apply_separable,
    blur_matrix,
    gather_nearest,
    hat_matrix,
    integrate_svf,
    node_axes,
    random_affine,
    resolution_matrix,
    sample_nodes,
    smooth_field,
)

__all__ = ["SynthEngine", "SynthEngineConfig", "SynthPair", "draw_seed"]

_SEED_RANGE = 2**62
#: Voxels (about) on which the normalisation percentiles are taken, per image.
_QUANTILE_SAMPLES = 16384


def draw_seed(gen: torch.Generator) -> int:
    """One pair seed from ``gen`` (advances it by exactly one draw)."""
    return int(torch.randint(0, _SEED_RANGE, (1,), generator=gen))


def _pair_range(name: str, value: Any, lo: float = 0.0) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"SynthEngineConfig.{name}: expected (low, high), got {value!r}") from None
    if not (lo <= a <= b):
        raise InputError(f"SynthEngineConfig.{name}: need {lo} <= low <= high, got {value!r}")
    return a, b


@dataclass
class SynthEngineConfig:
    """Settings of :class:`SynthEngine`. Lengths given as fractions are of the largest image
    extent (``max(shape) - 1`` voxels); probabilities are per pair or per image as stated.

    Attributes:
        shape: output image size (2 or 3 axes).
        num_labels: training label values ``[0, num_labels)`` of the returned label maps.
        min_labels: fewest labels of a map (a random number in ``[min_labels, num_labels]``).
        p_anatomy: probability of a phantom anatomy map (else a noise label map).
        label_scale: (low, high) base cell size of the noise labels (log-uniform, fraction).
        label_octaves: up to this many octaves of noise per map (each 2-3.5 times finer).
        min_label_cell: finest noise cell in voxels.
        canvas_margin: the noise canvas reaches this fraction beyond each image border.
        canvas_res: noise canvas voxels per output voxel (< 1: faster, coarser boundaries).
        anatomy_pool: number of phantom subjects (built on first use, cached).
        anatomy_seed: seed of the first phantom subject.
        anatomy_res: phantom voxels per output voxel along the longest axis.
        anatomy_zoom: (low, high) fraction of the phantom's longest side that the image spans.
        anatomy_slices: 2D only: probability of a slice of a 3D phantom (any orientation)
            rather than the 2D (axial) phantom.
        anatomy_slice_res: 2D only: resolution of those 3D phantoms relative to
            ``anatomy_res`` (a 3D subject for 160-pixel slices took 4.6 s to build at 1.0,
            0.9 s at 0.75, on a loaded 2-core machine).
        p_anatomy_mix: probability of noise labels inside 1-3 structures of an anatomy map.
        p_flip: per axis, probability of flipping an anatomy map; p_permute: of permuting axes.
        field_stride: node spacing (voxels) of the coarse grid of the deformations.
        svf_scale: (low, high) smoothness (cell size, fraction) of the velocity fields.
        svf_fine: largest weight of a second, 3 times finer velocity component.
        svf_max_disp: largest displacement of the relative SVF (fraction; ~0.12 = 12 %).
        base_svf_max_disp: same for the fixed image's own deformation ``v_F``.
        svf_steps: scaling-and-squaring steps.
        rotation, scaling, shear, translation: ranges of the relative affine (degrees,
            fraction of scale, shear term, fraction of the extent).
        base_rotation, base_scaling, base_shear: ranges of ``B_F`` (anatomy maps only).
        p_same_contrast, p_monotonic, p_nonmonotonic: probabilities that the moving image
            shares the fixed image's label intensities, maps them through a random monotonic
            (increasing or decreasing) curve, or a non-monotonic one (else: independent).
        p_clustered_means: probability that label means cluster around 2-5 tissue values.
        p_merge_render: probability that labels merged into one training label look alike.
        p_dark_background: anatomy maps, per image: probability that air is black.
        texture_std: largest per-label noise std (image range ~1).
        p_smooth_texture, smooth_texture_amp, texture_scale: per image probability, largest
            per-label amplitude and (low, high) cell size in voxels of a smooth texture.
        p_speckle, speckle: per image probability and largest std of multiplicative speckle.
        blur: largest Gaussian blur sigma (voxels).
        p_thick, thick_factor: per image probability and (low, high) spacing factor of thick
            slices along one random axis.
        p_lowres, lowres_factor: per image probability and (low, high) factor of a lower
            resolution along every axis.
        bias, bias_scale: largest amplitude (log) and (low, high) cell size (fraction) of the
            multiplicative bias field.
        gamma: std of the log gamma exponent.
        noise, p_rician: largest std of the additive noise (after scaling to [0, 1]) and per
            image probability that it is Rician (magnitude MR).
        percentiles: (low, high) percentiles of the final normalisation to ``[0, 1]``.
        p_box, box_crop: per image probability of a box field of view, largest fraction cut
            per side; p_sector: of an ultrasound sector (2D) / cone (3D); p_ellipse: of an
            elliptic field of view.
    """

    shape: tuple[int, ...] = (128, 160)
    num_labels: int = 16
    min_labels: int = 4
    # label maps
    p_anatomy: float = 0.35
    label_scale: tuple[float, float] = (0.08, 0.35)
    label_octaves: int = 3
    min_label_cell: float = 3.0
    canvas_margin: float = 0.15
    canvas_res: float = 0.85
    anatomy_pool: int = 16
    anatomy_seed: int = 70_000
    anatomy_res: float = 1.0
    anatomy_zoom: tuple[float, float] = (0.45, 1.1)
    anatomy_slices: float = 0.6
    anatomy_slice_res: float = 0.75
    p_anatomy_mix: float = 0.4
    p_flip: float = 0.3
    p_permute: float = 0.3
    # deformations
    field_stride: int = 4
    svf_scale: tuple[float, float] = (0.15, 0.5)
    svf_fine: float = 0.35
    svf_max_disp: float = 0.12
    base_svf_max_disp: float = 0.08
    svf_steps: int = 7
    rotation: float = 10.0
    scaling: float = 0.08
    shear: float = 0.04
    translation: float = 0.04
    base_rotation: float = 25.0
    base_scaling: float = 0.15
    base_shear: float = 0.08
    # contrast
    p_same_contrast: float = 0.25
    p_monotonic: float = 0.2
    p_nonmonotonic: float = 0.15
    p_clustered_means: float = 0.5
    p_merge_render: float = 0.5
    p_dark_background: float = 0.6
    texture_std: float = 0.08
    p_smooth_texture: float = 0.3
    smooth_texture_amp: float = 0.1
    texture_scale: tuple[float, float] = (2.0, 12.0)
    p_speckle: float = 0.1
    speckle: float = 0.6
    # acquisition
    blur: float = 1.2
    p_thick: float = 0.25
    thick_factor: tuple[float, float] = (1.5, 5.0)
    p_lowres: float = 0.15
    lowres_factor: tuple[float, float] = (1.2, 2.5)
    bias: float = 0.5
    bias_scale: tuple[float, float] = (0.3, 1.0)
    gamma: float = 0.25
    noise: float = 0.06
    p_rician: float = 0.3
    percentiles: tuple[float, float] = (0.5, 99.5)
    p_box: float = 0.2
    box_crop: float = 0.25
    p_sector: float = 0.08
    p_ellipse: float = 0.08

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) not in (2, 3) or min(self.shape) < 8:
            raise InputError(
                f"SynthEngineConfig.shape: expected 2 or 3 sizes >= 8, got {self.shape}"
            )
        if not 2 <= int(self.min_labels) <= int(self.num_labels):
            raise InputError(
                "SynthEngineConfig: need 2 <= min_labels <= num_labels, got "
                f"{self.min_labels}, {self.num_labels}"
            )
        for name in ("label_scale", "svf_scale", "anatomy_zoom", "texture_scale", "bias_scale"):
            a, _ = _pair_range(name, getattr(self, name))
            if a <= 0:
                raise InputError(f"SynthEngineConfig.{name}: must be positive, got {a}")
        for name in ("thick_factor", "lowres_factor"):
            _pair_range(name, getattr(self, name), lo=1.0)
        lo, hi = _pair_range("percentiles", self.percentiles)
        if hi > 100 or lo >= hi:
            raise InputError(
                f"SynthEngineConfig.percentiles: need 0 <= lo < hi <= 100, got {lo}, {hi}"
            )
        if self.p_same_contrast + self.p_monotonic + self.p_nonmonotonic > 1 + 1e-9:
            raise InputError("SynthEngineConfig: contrast probabilities add up to more than 1")
        if self.p_box + self.p_sector + self.p_ellipse > 1 + 1e-9:
            raise InputError("SynthEngineConfig: field-of-view probabilities add up to more than 1")
        if self.field_stride < 1 or self.svf_steps < 0 or self.anatomy_pool < 1:
            raise InputError("SynthEngineConfig: field_stride, anatomy_pool >= 1, svf_steps >= 0")


@dataclass
class SynthPair:
    """One synthetic pair (tensors on the engine's device).

    Attributes:
        fixed, moving: ``(1, *S)`` float32 images in ``[0, 1]``.
        fixed_seg, moving_seg: ``(1, *S)`` int64 label maps in ``[0, num_labels)``
            (the whole anatomy, also outside the field of view).
        field: ``(ndim, *S)`` float32 ground-truth displacement on the fixed grid in voxels,
            ``warped(x) = moving(x + field(x))`` (None when not asked for).
        fixed_mask, moving_mask: ``(1, *S)`` bool fields of view (False: zeroed).
        kind: ``"noise"`` or ``"anatomy"``.
    """

    fixed: Tensor
    moving: Tensor
    fixed_seg: Tensor
    moving_seg: Tensor
    field: Tensor | None
    fixed_mask: Tensor
    moving_mask: Tensor
    kind: str

    def as_tuple(self, with_field: bool = False) -> tuple[Tensor, ...]:
        """``(fixed, moving, fixed_seg, moving_seg)`` (``+ (field,)`` with ``with_field``)."""
        out = (self.fixed, self.moving, self.fixed_seg, self.moving_seg)
        if with_field:
            if self.field is None:
                raise InputError("SynthPair: made without its field (pair(with_field=False))")
            out = out + (self.field,)
        return out

    def to(self, device: torch.device | str) -> SynthPair:
        """The pair on another device."""
        moved = {
            k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()
        }
        return SynthPair(**moved)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _homogeneous(m: np.ndarray) -> np.ndarray:
    nd = m.shape[0]
    out = np.eye(nd + 1)
    out[:nd] = m
    return out


class SynthEngine:
    """Generator of synthetic pairs with ground truth (see the module docstring).

    Args:
        config: the settings (default :class:`SynthEngineConfig`).
        device: where the tensors are made (default CPU); a CUDA device makes everything on
            the GPU (the random streams then differ from the CPU ones).
    """

    def __init__(
        self, config: SynthEngineConfig | None = None, device: torch.device | str | None = None
    ) -> None:
        self.config = config if config is not None else SynthEngineConfig()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ndim = len(self.config.shape)
        side = max(8, int(round(max(self.config.shape) * self.config.anatomy_res)))
        side3 = side if self.ndim == 3 else max(8, int(round(side * self.config.anatomy_slice_res)))
        self.anatomy = AnatomyPool(self.config.anatomy_pool, self.config.anatomy_seed, side, side3)
        self._grids: dict[str, Any] = {}

    # ------------------------------------------------------------------ public
    def sample(self, gen: torch.Generator, with_field: bool = True) -> SynthPair:
        """The pair of the next seed drawn from ``gen`` (one draw)."""
        return self.pair(draw_seed(gen), with_field=with_field)

    def warm_up(self) -> None:
        """Build the anatomy subjects now (otherwise each is built on first use, ~0.02-1 s)."""
        if self.config.p_anatomy <= 0:
            return
        dims = []
        if self.ndim == 3 or self.config.anatomy_slices > 0:
            dims.append(3)
        if self.ndim == 2 and self.config.anatomy_slices < 1:
            dims.append(2)
        self.anatomy.warm_up(dims)

    @torch.no_grad()
    def pair(self, seed: int, with_field: bool = True) -> SynthPair:
        """The pair of ``seed`` (a non-negative int): same seed, same pair."""
        cfg = self.config
        dev = self.device
        shape = cfg.shape
        nd = self.ndim
        ss_params, ss_tensors = np.random.SeedSequence(int(seed)).spawn(2)
        rng = np.random.default_rng(ss_params)
        tg = torch.Generator(device=dev)
        tg.manual_seed(int(ss_tensors.generate_state(1, np.uint64)[0] >> np.uint64(2)))
        extent = float(max(shape) - 1)
        centre = np.array([(s - 1) / 2.0 for s in shape])

        # ---- label map on its canvas, and the map from the output grid onto the canvas
        kind = "anatomy" if rng.random() < cfg.p_anatomy else "noise"
        if kind == "noise":
            canvas, n_gen, to_canvas = self._noise_canvas(rng, tg, extent)
            outside = None
            base = np.concatenate([np.eye(nd), np.zeros((nd, 1))], 1)
        else:
            canvas, n_gen, to_canvas = self._anatomy_canvas(rng, tg, extent)
            outside = 0
            base = random_affine(
                rng, nd, centre, cfg.base_rotation, cfg.base_scaling, cfg.base_shear
            )
        lut = self._label_table(rng, kind, n_gen)
        fixed_map = (_homogeneous(to_canvas) @ _homogeneous(base))[:nd]
        rel = random_affine(
            rng, nd, centre, cfg.rotation, cfg.scaling, cfg.shear, cfg.translation * extent
        )
        rel_inv = np.linalg.inv(_homogeneous(rel))[:nd]

        # ---- deformations on the node grid
        axes = self._node_axes()
        nodes = self._nodes()
        v_f = self._svf(rng, tg, axes, cfg.base_svf_max_disp * extent)
        v_r = self._svf(rng, tg, axes, cfg.svf_max_disp * extent)
        d_f, d_r, d_ri = integrate_svf(torch.stack([v_f, v_r, -v_r]), nodes, shape, cfg.svf_steps)
        d_f, d_r, d_ri = d_f[None], d_r[None], d_ri[None]
        x = nodes[None]
        mf = torch.as_tensor(fixed_map, dtype=torch.float32, device=dev)
        ar = torch.as_tensor(rel, dtype=torch.float32, device=dev)
        ar_inv = torch.as_tensor(rel_inv, dtype=torch.float32, device=dev)
        p_fixed = apply_affine(mf, x + d_f)
        y = apply_affine(ar, x + d_r)  # psi(x)
        p_moving = apply_affine(mf, y + sample_nodes(d_f, y, shape))
        hats = self._hats()
        coords = apply_separable(torch.cat([p_fixed, p_moving]), hats)  # (2, nd, *S)
        disp = None
        if with_field:
            w = apply_affine(ar_inv, x)  # A^-1 x
            u = w + sample_nodes(d_ri, w, shape) - x
            disp = apply_separable(u, hats)[0].contiguous()

        # ---- labels of both images, then images
        gen_labels = gather_nearest(canvas, coords, outside)  # (2, *S)
        images, masks = self._render(rng, tg, gen_labels, n_gen, lut, kind)
        segs = torch.as_tensor(lut, dtype=torch.long, device=dev)[gen_labels]
        return SynthPair(
            fixed=images[0:1],
            moving=images[1:2],
            fixed_seg=segs[0:1],
            moving_seg=segs[1:2],
            field=disp,
            fixed_mask=masks[0:1],
            moving_mask=masks[1:2],
            kind=kind,
        )

    # ------------------------------------------------------------------ grids (cached)
    def _node_axes(self) -> list[Tensor]:
        if "axes" not in self._grids:
            self._grids["axes"] = node_axes(
                self.config.shape, self.config.field_stride, self.device
            )
        return self._grids["axes"]

    def _nodes(self) -> Tensor:
        if "nodes" not in self._grids:
            axes = self._node_axes()
            self._grids["nodes"] = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return self._grids["nodes"]

    def _hats(self) -> list[Tensor]:
        if "hats" not in self._grids:
            self._grids["hats"] = [
                hat_matrix(s, len(a), self.device)
                for s, a in zip(self.config.shape, self._node_axes(), strict=True)
            ]
        return self._grids["hats"]

    def _out_axes(self) -> list[Tensor]:
        if "out" not in self._grids:
            self._grids["out"] = [
                torch.arange(s, device=self.device, dtype=torch.float32) for s in self.config.shape
            ]
        return self._grids["out"]

    # ------------------------------------------------------------------ label maps
    def _noise_canvas(
        self, rng: np.random.Generator, tg: torch.Generator, extent: float
    ) -> tuple[Tensor, int, np.ndarray]:
        cfg = self.config
        shape = cfg.shape
        nd = self.ndim
        m = cfg.canvas_margin
        cshape = [max(8, int(math.ceil(s * (1 + 2 * m) * cfg.canvas_res))) for s in shape]
        scale = np.array(
            [(c - 1) / ((1 + 2 * m) * (s - 1)) for c, s in zip(cshape, shape, strict=True)]
        )
        to_canvas = np.zeros((nd, nd + 1))
        to_canvas[:, :nd] = np.diag(scale)
        to_canvas[:, nd] = (np.array(cshape) - 1) / 2 - scale * (np.array(shape) - 1) / 2
        k = int(rng.integers(cfg.min_labels, cfg.num_labels + 1))
        n_oct = int(rng.integers(1, cfg.label_octaves + 1))
        c0 = _loguniform(rng, *cfg.label_scale) * extent
        ratio = rng.uniform(2.0, 3.5)
        cells = [c0 / ratio**o for o in range(n_oct)]
        cells = [c for c in cells if c >= cfg.min_label_cell] or [max(c0, cfg.min_label_cell)]
        weights = np.ones((k, len(cells)))
        for o in range(1, len(cells)):
            weights[:, o] = rng.uniform(0, 1, k) * (rng.random(k) < 0.7)
        s = float(scale.mean())
        axes = [torch.arange(c, device=self.device, dtype=torch.float32) for c in cshape]
        canvas = noise_labels(tg, k, axes, [c * s for c in cells], weights)
        return canvas, k, to_canvas

    def _anatomy_canvas(
        self, rng: np.random.Generator, tg: torch.Generator, extent: float
    ) -> tuple[Tensor, int, np.ndarray]:
        cfg = self.config
        nd = self.ndim
        index = int(rng.integers(self.anatomy.size))
        if nd == 3 or rng.random() < cfg.anatomy_slices:
            vol = torch.as_tensor(self.anatomy.labels(index, 3), device=self.device)
            if nd == 2:
                vol = slice_of(vol, int(rng.integers(3)), rng.uniform(0.25, 0.75))
        else:
            vol = torch.as_tensor(self.anatomy.labels(index, 2), device=self.device)
        canvas = vol.long()
        n_gen = AnatomyPool.num_labels
        cshape = np.array(canvas.shape)
        zoom = rng.uniform(*cfg.anatomy_zoom)
        s = zoom * (cshape.max() - 1) / extent  # canvas voxels per output voxel
        if rng.random() < cfg.p_anatomy_mix:
            n_sub = int(rng.integers(1, 4))
            chosen = [int(c) for c in rng.choice(np.arange(1, n_gen), n_sub, replace=False)]
            parts = int(rng.integers(2, 5))
            cell = rng.uniform(0.04, 0.12) * extent * s
            canvas, n_gen = subdivide(canvas, chosen, n_gen, parts, tg, max(cell, 2.0))
        perm = rng.permutation(nd) if rng.random() < cfg.p_permute else np.arange(nd)
        signs = np.where(rng.random(nd) < cfg.p_flip, -1.0, 1.0)
        pm = np.zeros((nd, nd))
        pm[perm, np.arange(nd)] = signs
        shift = rng.uniform(-1, 1, nd) * 0.5 * max(1.0 - zoom, 0.15) * (cshape - 1)
        centre_out = np.array([(q - 1) / 2.0 for q in cfg.shape])
        to_canvas = np.zeros((nd, nd + 1))
        to_canvas[:, :nd] = s * pm
        to_canvas[:, nd] = (cshape - 1) / 2 + shift - s * pm @ centre_out
        return canvas, n_gen, to_canvas

    def _label_table(self, rng: np.random.Generator, kind: str, n_gen: int) -> np.ndarray:
        """Generation label -> training label (a random injective or surjective map)."""
        cfg = self.config
        ids = rng.permutation(cfg.num_labels)
        if kind == "noise":
            return ids[:n_gen]
        k = int(rng.integers(cfg.min_labels, cfg.num_labels + 1))
        if n_gen <= k:
            return ids[:n_gen]
        lut = ids[rng.integers(0, k, n_gen)]
        lut[rng.permutation(n_gen)[:k]] = ids[:k]  # every one of the k labels is used
        return lut

    # ------------------------------------------------------------------ deformations
    def _svf(
        self, rng: np.random.Generator, tg: torch.Generator, axes: list[Tensor], max_disp: float
    ) -> Tensor:
        cfg = self.config
        nd = self.ndim
        amp = rng.uniform(0.0, 1.0) * max_disp
        extent = float(max(cfg.shape) - 1)
        cell = _loguniform(rng, *cfg.svf_scale) * extent
        fine_w = rng.uniform(0.0, cfg.svf_fine)
        v = smooth_field(tg, nd, axes, cell)
        if fine_w > 0:
            fine = max(cell / 3.0, 2.0 * cfg.field_stride)
            v = v + fine_w * smooth_field(tg, nd, axes, fine)
        if amp <= 1e-3:
            return torch.zeros_like(v)
        return v * (amp / v.norm(dim=0).amax().clamp_min(1e-6))

    # ------------------------------------------------------------------ images
    def _means(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if rng.random() < self.config.p_clustered_means:
            nc = int(rng.integers(2, 6))
            centres = rng.uniform(0, 1, nc)
            spread = rng.uniform(0.01, 0.08)
            m = centres[rng.integers(0, nc, n)] + spread * rng.standard_normal(n)
        else:
            m = rng.uniform(0, 1, n)
        return np.clip(m, 0.0, 1.0)

    def _contrasts(
        self, rng: np.random.Generator, n_gen: int, lut: np.ndarray, kind: str
    ) -> np.ndarray:
        """``(2, n_gen)`` mean intensity per generation label of the fixed and moving image."""
        cfg = self.config
        merged = rng.random() < cfg.p_merge_render

        def draw() -> np.ndarray:
            if merged:  # labels merged into one training label look alike
                return self._means(rng, cfg.num_labels)[lut]
            return self._means(rng, n_gen)

        m0 = draw()
        u = rng.random()
        if u < cfg.p_same_contrast:
            m1 = m0.copy()
        elif u < cfg.p_same_contrast + cfg.p_monotonic + cfg.p_nonmonotonic:
            knots_x = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 3)), [1.0]])
            knots_y = rng.uniform(0, 1, 5)
            if u < cfg.p_same_contrast + cfg.p_monotonic:
                knots_y = np.sort(knots_y)
                if rng.random() < 0.5:  # inverted (T1 <-> T2 like)
                    knots_y = knots_y[::-1]
            m1 = np.interp(m0, knots_x, knots_y)
        else:
            m1 = draw()
        means = np.stack([m0, m1])
        if kind == "anatomy":
            dark = rng.random(2) < cfg.p_dark_background
            means[dark, 0] = 0.0
        return means

    def _render(
        self,
        rng: np.random.Generator,
        tg: torch.Generator,
        gen_labels: Tensor,
        n_gen: int,
        lut: np.ndarray,
        kind: str,
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        dev = self.device
        shape = cfg.shape
        extent = float(max(shape) - 1)
        flat = gen_labels.reshape(2, -1)
        n = flat.shape[1]

        means = self._contrasts(rng, n_gen, lut, kind)
        stds = rng.uniform(0, cfg.texture_std, (2, 1)) * rng.uniform(0, 1, (2, n_gen))
        use_tex = rng.random(2) < cfg.p_smooth_texture
        tex_amp = use_tex[:, None] * rng.uniform(0, cfg.smooth_texture_amp, (2, n_gen))
        tables = torch.as_tensor(
            np.stack([means, stds, tex_amp]), dtype=torch.float32, device=dev
        )  # (3, 2, n_gen)
        img = tables[0].gather(1, flat)
        img = img + tables[1].gather(1, flat) * torch.randn(2, n, generator=tg, device=dev)
        if use_tex.any():
            cell = _loguniform(rng, *cfg.texture_scale)
            tex = smooth_field(tg, 2, self._out_axes(), cell).reshape(2, n)
            img = img + tables[2].gather(1, flat) * tex

        # speckle (multiplicative, before the point spread function correlates it)
        speckle = (rng.random(2) < cfg.p_speckle) * rng.uniform(0.2, 1.0, 2) * cfg.speckle
        if speckle.any():
            s = torch.as_tensor(speckle, dtype=torch.float32, device=dev)[:, None]
            img = img * (1.0 + s * torch.randn(2, n, generator=tg, device=dev)).abs()

        # blur, thick slices, low resolution: one (S_i, S_i) matrix per axis and image
        img = img.reshape(2, *shape)
        mats = self._acquisition_matrices(rng)
        if any(m is not None for m in mats):
            img = apply_separable(img, mats)
        img = img.reshape(2, n)

        # bias field, gamma, noise
        bias = rng.uniform(0, cfg.bias, 2)
        if bias.max() > 1e-3:
            cell = _loguniform(rng, *cfg.bias_scale) * extent
            field_ = smooth_field(tg, 2, self._out_axes(), cell).reshape(2, n)
            b = torch.as_tensor(bias, dtype=torch.float32, device=dev)[:, None]
            img = img * torch.exp(b * field_)
        lo = img.amin(1, keepdim=True)
        hi = img.amax(1, keepdim=True)
        img = ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp_min(0.0)
        gamma = np.exp(rng.normal(0.0, cfg.gamma, 2))
        img = img ** torch.as_tensor(gamma, dtype=torch.float32, device=dev)[:, None]
        sigma = rng.uniform(0, cfg.noise, 2)
        rician = rng.random(2) < cfg.p_rician
        sg = torch.as_tensor(sigma, dtype=torch.float32, device=dev)[:, None]
        img = img + sg * torch.randn(2, n, generator=tg, device=dev)
        if rician.any():
            mag = torch.sqrt(img**2 + (sg * torch.randn(2, n, generator=tg, device=dev)) ** 2)
            r = torch.as_tensor(rician, device=dev)[:, None]
            img = torch.where(r, mag, img)

        # percentile normalisation (on a regular subsample: exact enough, fast)
        step = max(1, n // _QUANTILE_SAMPLES) | 1
        sub = img[:, ::step]
        m = sub.shape[1]
        k_lo = min(m, 1 + int(round(cfg.percentiles[0] / 100.0 * (m - 1))))
        k_hi = min(m, 1 + int(round((1.0 - cfg.percentiles[1] / 100.0) * (m - 1))))
        lo = sub.topk(k_lo, dim=1, largest=False).values[:, -1]
        hi = sub.topk(k_hi, dim=1, largest=True).values[:, -1]
        img = ((img - lo[:, None]) / (hi - lo).clamp_min(1e-6)[:, None]).clamp(0.0, 1.0)

        img = img.reshape(2, *shape)
        masks = torch.stack([self._fov(rng) for _ in range(2)])
        img = img * masks
        return img.contiguous(), masks

    def _acquisition_matrices(self, rng: np.random.Generator) -> list[Tensor | None]:
        cfg = self.config
        dev = self.device
        shape = cfg.shape
        nd = self.ndim
        per_image: list[list[Tensor | None]] = []
        for _ in range(2):
            sigma = rng.uniform(0.0, cfg.blur) * rng.uniform(0.7, 1.3, nd)
            factors = np.ones(nd)
            thick = np.ones(nd)
            if rng.random() < cfg.p_lowres:
                factors = rng.uniform(*cfg.lowres_factor, nd)
                thick = factors.copy()
            if rng.random() < cfg.p_thick:
                a = int(rng.integers(nd))
                factors[a] = rng.uniform(*cfg.thick_factor)
                thick[a] = factors[a] * rng.uniform(0.8, 1.3)
            offsets = rng.uniform(0, 1, nd) * factors
            row: list[Tensor | None] = []
            for i in range(nd):
                m = None
                if sigma[i] >= 0.3:
                    m = blur_matrix(shape[i], float(sigma[i]), dev)
                if factors[i] > 1.05:
                    r = resolution_matrix(
                        shape[i], float(factors[i]), float(thick[i]), float(offsets[i]), dev
                    )
                    m = r if m is None else r @ m
                row.append(m)
            per_image.append(row)
        out: list[Tensor | None] = []
        for i in range(nd):
            ms = [per_image[b][i] for b in range(2)]
            if all(m is None for m in ms):
                out.append(None)
                continue
            eye = torch.eye(shape[i], device=dev)
            out.append(torch.stack([eye if m is None else m for m in ms]))
        return out

    def _fov(self, rng: np.random.Generator) -> Tensor:
        """``(*S)`` bool field of view of one image."""
        cfg = self.config
        shape = cfg.shape
        nd = self.ndim
        dev = self.device
        u = rng.random()
        axes = [
            torch.arange(s, device=dev, dtype=torch.float32).view(
                *[s if j == i else 1 for j in range(nd)]
            )
            for i, s in enumerate(shape)
        ]
        if u < cfg.p_box:
            mask = torch.ones(shape, dtype=torch.bool, device=dev)
            for i, s in enumerate(shape):
                lo = rng.uniform(0, cfg.box_crop) * s
                hi = s - rng.uniform(0, cfg.box_crop) * s
                mask = mask & (axes[i] >= lo) & (axes[i] < hi)
            return mask
        if u < cfg.p_box + cfg.p_sector:
            a = int(rng.integers(nd))
            flip = rng.random() < 0.5
            apex = np.array([(s - 1) / 2.0 + rng.uniform(-0.15, 0.15) * s for s in shape])
            apex[a] = -rng.uniform(0.0, 0.2) * shape[a]
            if flip:
                apex[a] = shape[a] - 1 - apex[a]
            half = math.radians(rng.uniform(25.0, 50.0))
            r_max = rng.uniform(0.85, 1.15) * shape[a]
            r_min = rng.uniform(0.0, 0.1) * shape[a]
            d = [axes[i] - float(apex[i]) for i in range(nd)]
            along = -d[a] if flip else d[a]
            r2 = sum(di * di for di in d)
            mask = (along > 0) & (along * along >= math.cos(half) ** 2 * r2)
            return mask & (r2 <= r_max**2) & (r2 >= r_min**2)
        if u < cfg.p_box + cfg.p_sector + cfg.p_ellipse:
            c = [(s - 1) / 2.0 + rng.uniform(-0.1, 0.1) * s for s in shape]
            r = [rng.uniform(0.38, 0.6) * s for s in shape]
            e = sum(((axes[i] - c[i]) / r[i]) ** 2 for i in range(nd))
            return e <= 1.0
        return torch.ones(shape, dtype=torch.bool, device=dev)


# ----------------------------------------------------------------------------- worker processes
_WORKER_ENGINE: SynthEngine | None = None


def _init_worker(config: SynthEngineConfig, threads: int = 1) -> None:
    """Initialiser of a prefetch worker process: one CPU engine per process."""
    global _WORKER_ENGINE
    torch.set_num_threads(threads)
    _WORKER_ENGINE = SynthEngine(config)


def _worker_pair(seed: int) -> SynthPair:
    """The pair of ``seed`` made by this worker process's engine (with its field)."""
    if _WORKER_ENGINE is None:
        raise RuntimeError("_worker_pair(): the worker was not initialised")
    return _WORKER_ENGINE.pair(seed, with_field=True)
