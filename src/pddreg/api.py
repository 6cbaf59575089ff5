"""One call from Python: :func:`register` two images with ``none``, ``mind`` or ``pdd``.

Convention: the returned field ``disp`` has shape ``(ndim, *spatial)`` in voxel units, component
``i`` along array axis ``i``, and maps the fixed grid into the moving image:
``warped(x) = moving(x + disp(x))`` (see :mod:`pddreg.spatial`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._heap import reuse_freed_memory
from .errors import InputError, RegistrationError
from .methods import DEFAULT_METHOD, METHODS

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "RegistrationResult",
    "apply_registration",
    "compute_metrics",
    "deformation_metrics",
    "default_device",
    "make_register_fn",
    "map_points",
    "register",
]

#: Most distinct non-zero labels a label map may hold: whole-body and brain parcellations
#: stay below it (TotalSegmentator 117, FreeSurfer aparc+aseg ~110, Schaefer 1000 parcels);
#: more is an intensity image given as labels (and the per-label metrics would take minutes).
MAX_LABELS = 1000


@dataclass
class RegistrationResult:
    """What :func:`register` returns (all arrays on the CPU, NumPy).

    Attributes:
        disp: displacement field ``(ndim, *S)`` float32 in voxels of the fixed grid,
            ``warped(x) = moving_world(x + u(x))`` where ``moving_world`` is the moving image
            in the fixed image's index frame (the identity for images on one grid; see
            :mod:`pddreg.spatial.world`). The global stage is composed in.
        warped: the moving image warped onto the fixed grid ``(*S)``, in the moving image's own
            intensity units (linear interpolation; outside the moving image its minimum, e.g.
            air in CT).
        warped_seg: the moving label map warped onto the fixed grid ``(*S)`` int64 (nearest), or
            None without ``moving_seg``.
        metrics: with both label maps: Dice per label and mean (before and after), HD95 in mm,
            SDlogJ and the fraction of folding voxels; otherwise None.
        runtime_s: wall time of the registration itself (no I/O, no metrics).
        method: the method that ran.
        spacing: voxel spacing used for the metrics in mm.
        fixed_world, moving_world: index-to-world matrices ``(ndim + 1, ndim + 1)`` of the two
            images (world coordinates, mm).
        grid_map: ``M``, fixed voxel -> moving voxel by the headers (identity: one grid).
        affine: the global stage as a world map ``(ndim + 1, ndim + 1)`` (fixed world point ->
            moving world point, mm, RAS), or None when it did not run.
        affine_mode: ``"off"`` or what the global stage used (``"identity"`` when ``auto`` kept
            the headers' alignment, ``"translation"``, ``"rigid"``, ``"affine"``).
        details: global-stage similarities and parameters, working grid, times per stage.
        uncertainty: with ``uncertainty=True`` (``mind``, ``pdd``): ``(*S)`` float32, per fixed
            voxel the expected spread of the displacement in mm (the fixed image's spacing;
            voxels for arrays without one), from the displacement probabilities
            (:mod:`pddreg.optim.uncertainty`); else None.
        warped_prob: with ``uncertainty=True`` and ``moving_seg``: ``(K, *S)`` float32
            per-label probabilities of the moving labels on the fixed grid (soft label
            transfer, channel ``k`` = label ``k``); else None.
    """

    disp: np.ndarray
    warped: np.ndarray
    warped_seg: np.ndarray | None
    metrics: dict[str, Any] | None
    runtime_s: float
    method: str
    spacing: tuple[float, ...] = field(default=())
    fixed_world: np.ndarray | None = None
    moving_world: np.ndarray | None = None
    grid_map: np.ndarray | None = None
    affine: np.ndarray | None = None
    affine_mode: str = "off"
    details: dict[str, Any] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    warped_prob: np.ndarray | None = None

    @property
    def disp_mm(self) -> np.ndarray:
        """The field as world displacements in mm ``(ndim, *S)`` (component ``i`` along world
        axis ``i``): the moving world point of fixed voxel ``x`` is ``A_f x + disp_mm(x)``."""
        from .spatial import field_to_world

        world = self.fixed_world if self.fixed_world is not None else np.eye(self.disp.shape[0] + 1)
        d = torch.from_numpy(np.ascontiguousarray(self.disp))[None]
        return field_to_world(d.double(), world)[0].float().numpy()


def default_device() -> torch.device:
    """CUDA when available, else the CPU (the command line's ``--device`` default)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unpack(x: Any, name: str) -> tuple[np.ndarray | torch.Tensor, str, Any]:
    """(array, name used in messages, Image or None) from an array, tensor, Image or path."""
    from .data.io import Image, read_image

    if isinstance(x, (str, os.PathLike)):
        x = read_image(os.fspath(x))
    if isinstance(x, Image):
        return x.array, (x.path or name), x
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x, name, None
    raise InputError(
        f"{name}: expected a NumPy array, a torch tensor, a pddreg.data.Image or a path, "
        f"got {type(x).__name__}"
    )


def _image_array(x: Any, name: str) -> tuple[np.ndarray, str, Any]:
    from .data.io import check_image

    arr, label, img = _unpack(x, name)
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InputError(f"{label}: expected a numeric image, got dtype {arr.dtype}")
    check_image(arr, label)
    return arr.astype(np.float32, copy=False), label, img


def _same_grid_check(img: Any, world: np.ndarray | None, label: str, image_label: str) -> None:
    """A label map or mask read with a header must lie on its image's grid (same affine)."""
    if img is None or world is None or getattr(img, "affine", None) is None:
        return
    other = img.world
    if other.shape != world.shape:
        return
    tol = 1e-3 * max(1.0, float(np.abs(world[:-1, :-1]).max()))
    if not np.allclose(other, world, atol=tol, rtol=0.0):
        raise InputError(
            f"{label}: lies on another grid than {image_label} (the voxel-to-world affines in "
            "their headers differ); resample it onto that image's grid"
        )


def _unpack_map(
    x: Any, name: str, what: str, read: Callable[[str], Any]
) -> tuple[np.ndarray, str, Any]:
    """(array, name for messages, Image or None) of a label map or mask given as a path, an
    Image, a tensor or an array; ``read`` reads a path."""
    from .data.io import Image

    if isinstance(x, (str, os.PathLike)):
        x = read(os.fspath(x))
    img = x if isinstance(x, Image) else None
    label = (img.path if img is not None else None) or name
    if img is not None:
        x = img.array
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(
            f"{name}: expected {what} (array, tensor, Image or path), got {type(x).__name__}"
        )
    return x, label, img


def _label_array(
    x: Any,
    name: str,
    shape: tuple[int, ...],
    fixed_label: str,
    world: np.ndarray | None = None,
) -> np.ndarray:
    """Integer label map ``(*S)`` int64, checked against its image's shape (and grid)."""
    from .data.io import read_labels

    x, label, img = _unpack_map(x, name, "a label map", read_labels)
    if x.size == 0:
        raise InputError(f"{label}: label map is empty")
    if x.dtype == bool:
        x = x.astype(np.int64)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise InputError(f"{label}: label map contains NaN or Inf values")
        if not np.all(x == np.round(x)):
            raise InputError(f"{label}: label map has non-integer values (not a segmentation?)")
    elif not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"{label}: expected an integer label map, got dtype {x.dtype}")
    x = x.astype(np.int64)
    if x.min() < 0:
        raise InputError(f"{label}: label map has negative labels")
    count = len(np.unique(x))
    if count > MAX_LABELS + 1:
        raise InputError(
            f"{label}: label map has {count - 1} distinct labels (at most {MAX_LABELS} are "
            "supported; is this an intensity image?)"
        )
    if tuple(x.shape) != tuple(shape):
        raise InputError(
            f"{label}: label map shape {tuple(x.shape)} differs from the image shape "
            f"{tuple(shape)} of {fixed_label}"
        )
    _same_grid_check(img, world, label, fixed_label)
    return x


def _mask_array(
    x: Any, name: str, shape: tuple[int, ...], image_label: str, world: np.ndarray | None
) -> np.ndarray:
    """A mask ``(*S)`` float32 in {0, 1} (non-zero = inside) on its image's grid."""
    from .data.io import _load

    x, label, img = _unpack_map(x, name, "a mask", lambda path: _load(path, labels=True))
    if x.size == 0:
        raise InputError(f"{label}: mask is empty (shape {tuple(x.shape)})")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise InputError(f"{label}: mask contains NaN or Inf values")
    if tuple(x.shape) != tuple(shape):
        raise InputError(
            f"{label}: mask shape {tuple(x.shape)} differs from the shape {tuple(shape)} of its "
            f"image {image_label} (a mask lies on its own image's grid)"
        )
    _same_grid_check(img, world, label, image_label)
    mask = (x != 0).astype(np.float32)
    if not mask.any():
        raise InputError(f"{label}: mask is empty (no voxel is inside)")
    return mask


def _resolve_device(device: Any, *inputs: Any) -> torch.device:
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"--device: not a device: {device!r}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device: {device} requested but CUDA is not available")
        return dev
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return default_device()


def _load_pdd(model: Any, ndim: int, device: torch.device) -> torch.nn.Module:
    from . import models

    if model is None:
        net = models.pretrained(ndim)
    elif isinstance(model, (str, os.PathLike)):
        net = models.load_model(os.fspath(model), map_location="cpu")
    elif isinstance(model, torch.nn.Module):
        net = model
    else:
        raise InputError(f"--model: expected a path or a model, got {type(model).__name__}")
    cfg_ndim = getattr(getattr(net, "config", None), "ndim", None)
    if cfg_ndim is not None and int(cfg_ndim) != ndim:
        where = model if isinstance(model, (str, os.PathLike)) else "--model"
        raise InputError(f"{where}: the model is {cfg_ndim}D but the images are {ndim}D")
    return net.to(device).eval()


def _to_batch(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(*S)`` array -> ``(1, 1, *S)`` float32 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None].to(device)


RegisterFn = Callable[..., torch.Tensor]


def make_register_fn(
    method: str,
    ndim: int,
    model: Any = None,
    device: Any = None,
    instance_opt: bool | None = None,
    capture: bool | None = None,
) -> RegisterFn:
    """A function ``(fixed (1,1,*S), moving (1,1,*S), fixed_mask=None, moving_mask=None) ->
    disp (1, ndim, *S)`` for ``method``, on one grid (no world coordinates, no global stage).

    Inputs are float32 tensors in [0, 1] on ``device``; masks ``(1, 1, *S)`` in [0, 1] (only
    voxels inside count in the similarity; the moving mask lies on the moving image). A keyword
    ``posterior`` (a :class:`pddreg.optim.uncertainty.Posterior`) records the displacement
    probabilities (``mind``, ``pdd``; ``none`` records nothing). The model
    (``pdd``) is loaded once here, so the function is cheap to call for many pairs (sequences,
    evaluation).

    Args:
        method: ``"pdd"``, ``"mind"`` or ``"none"``.
        ndim: 2 or 3 (selects the shipped ``pdd`` weights).
        model: for ``pdd``: a path to a saved model or a model object (default: shipped).
        device: where the model runs (default: CUDA when available).
        instance_opt: ``pdd`` only: instance optimisation on/off (None: the model's default).
        capture: ``mind`` and ``pdd`` (multi-level models): the large-motion search
            (:class:`pddreg.optim.MindConfig`, :meth:`pddreg.models.PDDNet.register`; None:
            where the image size needs it).
    """
    if method not in METHODS:
        raise InputError(f"--method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    dev = _resolve_device(device)
    if method == "none":

        def none_fn(
            fixed: torch.Tensor,
            moving: torch.Tensor,
            fixed_mask: Any = None,
            moving_mask: Any = None,
            posterior: Any = None,
        ) -> torch.Tensor:
            return torch.zeros((fixed.shape[0], ndim, *fixed.shape[2:]), device=fixed.device)

        return none_fn
    if method == "mind":
        from .optim import MindConfig, register_mind

        mind_config = MindConfig(capture=capture)

        def mind_fn(
            fixed: torch.Tensor,
            moving: torch.Tensor,
            fixed_mask: torch.Tensor | None = None,
            moving_mask: torch.Tensor | None = None,
            posterior: Any = None,
        ) -> torch.Tensor:
            with torch.no_grad():
                return register_mind(
                    fixed,
                    moving,
                    mind_config,
                    fixed_mask=fixed_mask,
                    moving_mask=moving_mask,
                    posterior=posterior,
                )

        return mind_fn
    net = _load_pdd(model, ndim, dev)
    # every model's register takes these (the VoxelMorph baseline ignores them)
    kwargs: dict[str, Any] = {"capture": capture}
    if instance_opt is not None:
        kwargs["instance_opt"] = bool(instance_opt)

    def pdd_fn(
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
        posterior: Any = None,
    ) -> torch.Tensor:
        masks = {}
        if fixed_mask is not None or moving_mask is not None:
            masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
        if posterior is None:
            return net.register(fixed, moving, **kwargs, **masks).detach()
        from .optim.uncertainty import record_forward

        with record_forward(net, posterior, tuple(fixed.shape[2:])):
            # the network's levels through the hook, then the refinement's own levels
            return net.register(fixed, moving, **kwargs, **masks, posterior=posterior).detach()

    return pdd_fn


def _finite(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def compute_metrics(
    fixed_seg: np.ndarray,
    moving_seg: np.ndarray,
    warped_seg: np.ndarray,
    disp: np.ndarray,
    spacing: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Learn2Reg-style metrics of one registration, JSON-ready (NaN -> None).

    Args:
        fixed_seg, moving_seg, warped_seg: label maps ``(*S)`` (background 0 excluded).
        disp: field ``(ndim, *S)``.
        spacing: voxel size in mm for HD95 (1 per axis when None).

    Returns:
        dict with ``dice`` (label -> value), ``mean_dice``, ``mean_dice_before``, ``hd95``,
        ``mean_hd95`` (mm), ``sdlogj``, ``folding_fraction``.
    """
    from . import metrics as M

    labels = sorted(int(v) for v in np.union1d(np.unique(fixed_seg), np.unique(moving_seg)) if v)
    dice_after = M.dice(fixed_seg, warped_seg, labels=labels, reference=moving_seg)
    dice_before = M.dice(fixed_seg, moving_seg, labels=labels)
    hd = M.hd95(fixed_seg, warped_seg, spacing=spacing, labels=labels)

    def nanmean(values: dict[int, float]) -> float | None:
        vals = [v for v in values.values() if not math.isnan(float(v))]
        return _finite(np.mean(vals)) if vals else None

    return {
        "dice": {str(k): _finite(v) for k, v in dice_after.items()},
        "mean_dice": nanmean(dice_after),
        "mean_dice_before": nanmean(dice_before),
        "hd95": {str(k): _finite(v) for k, v in hd.items()},
        "mean_hd95": nanmean(hd),
        **deformation_metrics(disp),
    }


def deformation_metrics(disp: np.ndarray) -> dict[str, float | None]:
    """``sdlogj`` and ``folding_fraction`` of a field ``(ndim, *S)`` (JSON-ready)."""
    from . import metrics as M

    d = torch.from_numpy(np.ascontiguousarray(disp))[None]
    return {k: _finite(v) for k, v in M.jacobian_metrics(d).items()}


def _world_of(img: Any, arr: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    """Index-to-world matrix of an input: its header's, else the diagonal of ``spacing``."""
    if img is not None and (img.affine is not None or spacing is None):
        return img.world
    sp = spacing if spacing is not None else (1.0,) * arr.ndim
    return np.diag([*(float(v) for v in sp), 1.0])


@reuse_freed_memory()
def register(
    fixed: Any,
    moving: Any,
    method: str = DEFAULT_METHOD,
    model: Any = None,
    fixed_seg: Any = None,
    moving_seg: Any = None,
    device: Any = None,
    spacing: tuple[float, ...] | None = None,
    instance_opt: bool | None = None,
    *,
    affine: str = "auto",
    fixed_mask: Any = None,
    moving_mask: Any = None,
    same_grid: bool = False,
    max_memory: int | str | None = None,
    uncertainty: bool = False,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (2D or 3D) and return the field and the warped images.

    The images may lie on different grids: their index-to-world matrices (NIfTI affine, ITK
    origin/spacing/direction; the spacing alone for arrays) place the moving image in the fixed
    image's world frame, a global stage (translation/rigid/affine on MIND-SSC features) aligns
    it, and the deformable method runs on an isotropic working grid over the fixed image
    (:mod:`pddreg.pipeline`). Every output lies on the fixed grid.

    Args:
        fixed, moving: images ``(*S_f)`` and ``(*S_m)`` (2D or 3D): NumPy arrays, torch tensors,
            :class:`pddreg.data.Image` or file paths. Intensities are normalised to [0, 1]
            (:func:`pddreg.data.io.normalise_intensity`) before registration.
        method: ``"pdd"`` (default: the learned PDD-Net, the shipped weights for the input's
            dimension unless ``model`` is given, its field refined on MIND-SSC), ``"mind"``
            (training-free MIND-SSC discrete registration) or ``"none"`` (no deformable stage
            and no global stage: the images as their headers place them).
        model: for ``pdd``: a path to a saved model or a model object.
        fixed_seg, moving_seg: optional integer label maps on their image's grid; with
            ``moving_seg`` the warped label map is returned, with both the metrics are computed.
        device: ``"cpu"``, ``"cuda"``, ...; default: the device of tensor inputs, else CUDA when
            available, else the CPU.
        spacing: voxel size in mm per axis of array inputs (files and Images carry their own);
            also the spacing of the metrics (default: the fixed image's).
        instance_opt: run instance optimisation after the network (``pdd``); None keeps the
            model's default (on for the shipped weights: ``False`` gives the network alone,
            several times faster and less precise).
        affine: the global stage: ``"auto"`` (default: affine, kept only where it improves the
            similarity), ``"rigid"``, ``"affine"``, ``"translation"`` or ``"off"``.
        fixed_mask, moving_mask: optional masks on their image's grid (non-zero = inside): only
            voxels inside count in the similarity of the global and the deformable stage.
        same_grid: treat both arrays as one index grid and ignore the headers' geometry (data
            already resampled, e.g. Learn2Reg); the shapes must then agree.
        max_memory: memory budget (bytes, or a size such as ``"4G"``): a registration whose
            estimated peak (:func:`pddreg.memory.estimate_registration`) exceeds it is refused
            before it allocates; None: the memory available on the device.
        uncertainty: also return the registration uncertainty (``result.uncertainty``) and,
            with ``moving_seg``, the soft label transfer (``result.warped_prob``), made from the
            displacement probabilities of ``mind`` or ``pdd`` (:mod:`pddreg.optim.uncertainty`).

    Returns:
        :class:`RegistrationResult` (NumPy arrays on the CPU).

    Raises:
        InputError: bad input (different ndim, NaN/Inf, empty, non-integer labels, masks or
            labels on another grid, images that do not overlap, an unknown method), naming the
            argument or file.
    """
    from . import pipeline
    from .data.io import normalise_intensity
    from .spatial import grid_map, map_coords, sample, sample_labels, spacing_of

    if method not in METHODS:
        raise InputError(f"--method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    if affine not in pipeline.AFFINE_MODES:
        raise InputError(
            f"--affine: expected one of {', '.join(pipeline.AFFINE_MODES)}, got {affine!r}"
        )
    f_arr, f_name, f_img = _image_array(fixed, "fixed")
    m_arr, m_name, m_img = _image_array(moving, "moving")
    if f_arr.ndim != m_arr.ndim:
        raise InputError(
            f"{m_name}: the moving image is {m_arr.ndim}D but the fixed image {f_name} is "
            f"{f_arr.ndim}D"
        )
    ndim = f_arr.ndim
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InputError(f"spacing: expected {ndim} positive values, got {spacing}")
    shape_f, shape_m = tuple(f_arr.shape), tuple(m_arr.shape)
    if same_grid and shape_f != shape_m:
        raise InputError(
            f"{m_name}: shape {shape_m} differs from the fixed image {f_name} shape {shape_f} "
            "(--same-grid needs both arrays on one index grid)"
        )
    world_f = _world_of(f_img, f_arr, spacing)
    world_m = world_f if same_grid else _world_of(m_img, m_arr, spacing)
    try:
        m_map = np.eye(ndim + 1) if same_grid else grid_map(world_f, world_m)
    except ValueError as err:
        raise InputError(f"{m_name}: {err}") from None
    fseg = (
        None
        if fixed_seg is None
        else _label_array(fixed_seg, "fixed_seg", shape_f, f_name, world_f)
    )
    mseg = (
        None
        if moving_seg is None
        else _label_array(moving_seg, "moving_seg", shape_m, m_name, None if same_grid else world_m)
    )
    fmask = (
        None
        if fixed_mask is None
        else _mask_array(fixed_mask, "fixed_mask", shape_f, f_name, world_f)
    )
    mmask = (
        None
        if moving_mask is None
        else _mask_array(
            moving_mask, "moving_mask", shape_m, m_name, None if same_grid else world_m
        )
    )
    metric_spacing = spacing if spacing is not None else spacing_of(world_f)
    dev = _resolve_device(device, fixed, moving)
    from .memory import check_registration

    check_registration(
        method,
        shape_f,
        spacing_of(world_f),
        shape_m,
        budget=max_memory,
        device=dev,
        model=model,
        masks=fmask is not None or mmask is not None,
        names=(f_name, m_name),
    )

    f_t = _to_batch(normalise_intensity(f_arr), dev)
    m_t = _to_batch(normalise_intensity(m_arr), dev)
    deformable = None
    posterior = None
    if uncertainty and method != "none":
        from .optim.uncertainty import Posterior

        posterior = Posterior(keep_prob=mseg is not None)
    if method != "none":
        # In 3D the global stage takes the large motion: the capture search (a second run of
        # the levels) is kept for 2D and for registrations without a global stage.
        capture = None if ndim == 2 or affine == "off" else False
        fn = make_register_fn(
            method, ndim, model=model, device=dev, instance_opt=instance_opt, capture=capture
        )

        def deformable(fw, mw, fmw, mmw):  # noqa: ANN001, ANN202 - pipeline.DeformableFn
            extra = {} if posterior is None else {"posterior": posterior}
            if fmw is None and mmw is None:
                return fn(fw, mw, **extra)
            return fn(fw, mw, fixed_mask=fmw, moving_mask=mmw, **extra)

    start = time.perf_counter()
    res = pipeline.run(
        f_t,
        m_t,
        m_map,
        spacing_of(world_f),
        spacing_of(world_m),
        deformable,
        affine=affine if method != "none" else "off",
        fixed_mask=None if fmask is None else _to_batch(fmask, dev),
        moving_mask=None if mmask is None else _to_batch(mmask, dev),
        names=(f_name, m_name),
    )
    disp = res.disp
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    runtime = time.perf_counter() - start
    logger.info("%s registration of %s to %s: %.3f s", method, m_name, f_name, runtime)
    if tuple(disp.shape) != (1, ndim, *shape_f):
        raise ValueError(
            f"register(): method {method!r} returned a field of shape {tuple(disp.shape)}, "
            f"expected {(1, ndim, *shape_f)}"
        )
    if not bool(torch.isfinite(disp).all()):
        bad = int((~torch.isfinite(disp)).sum())
        raise RegistrationError(
            f"{m_name}: the {method} registration to {f_name} produced a field with {bad} "
            "NaN/Inf values; nothing is returned (check the model file, or try --method mind)"
        )
    with torch.no_grad():
        coords = map_coords(m_map, shape_f, disp)
        warped_t = sample(_to_batch(m_arr, dev), coords, padding="border")
        warped = pipeline.outside_value(warped_t, coords, shape_m, float(m_arr.min()))
        warped = warped[0, 0].cpu().numpy()
        warped_seg = mseg_before = None
        if mseg is not None:
            labels = torch.from_numpy(mseg)[None, None].to(dev)
            warped_seg = sample_labels(labels, coords, "zeros")[0, 0].cpu().numpy()
            before = map_coords(m_map, shape_f, device=dev)
            mseg_before = sample_labels(labels, before, "zeros")[0, 0].cpu().numpy()
    disp_np = disp[0].detach().float().cpu().numpy()
    metrics = None
    if fseg is not None and mseg_before is not None and warped_seg is not None:
        metrics = compute_metrics(fseg, mseg_before, warped_seg, disp_np, metric_spacing)
    world_affine = None
    if res.affine is not None:
        world_affine = world_f @ res.affine @ np.linalg.inv(world_f)
    details: dict[str, Any] = {
        "work_shape": list(res.work_shape),
        "work_spacing": [float(s) for s in res.work_spacing],
        "timings": {k: float(v) for k, v in res.timings.items()},
    }
    if res.align is not None:
        details["global"] = {
            "mode": res.align.mode,
            "similarity_before": float(res.align.similarity_before),
            "similarity_after": float(res.align.similarity_after),
            "parameters": _jsonable(res.align.parameters),
            "matrix_voxels": res.affine.tolist() if res.affine is not None else None,
        }
    spacing_mm = tuple(float(v) for v in metric_spacing)
    unc = wprob = None
    if posterior is not None and posterior.variance is not None:
        from .optim.uncertainty import posterior_outputs

        unc, wprob = posterior_outputs(
            posterior,
            disp,
            None if mseg is None else torch.from_numpy(mseg)[None, None].to(dev),
            m_map,
            res.affine,
            spacing_mm,
        )
    return RegistrationResult(
        disp=disp_np,
        warped=warped,
        warped_seg=warped_seg,
        metrics=metrics,
        runtime_s=runtime,
        method=method,
        spacing=spacing_mm,
        fixed_world=world_f,
        moving_world=world_m,
        grid_map=m_map,
        affine=world_affine,
        affine_mode=res.align.mode if res.align is not None else "off",
        details=details,
        uncertainty=unc,
        warped_prob=wprob,
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _saved(reg: Any) -> Any:
    from .data.transforms import SavedRegistration, read_registration

    return reg if isinstance(reg, SavedRegistration) else read_registration(os.fspath(reg))


def _image_map(saved: Any, img: Any, shape: tuple[int, ...], label: str) -> np.ndarray:
    """Fixed voxel -> voxel of ``img`` for a saved registration (its own header where it has
    one, else the registered moving image's grid)."""
    from .spatial import grid_map

    if len(shape) != saved.ndim:
        raise InputError(
            f"{label}: is {len(shape)}D but the registration in {saved.folder} is {saved.ndim}D"
        )
    has_geometry = img is not None and img.kind not in ("array", "numpy")
    if saved.space == "index" or not has_geometry:
        if tuple(shape) != tuple(saved.moving_shape):
            raise InputError(
                f"{label}: shape {tuple(shape)} differs from the registered moving image's "
                f"{tuple(saved.moving_shape)} (and the file carries no geometry to place it)"
            )
        if saved.space == "index":
            return np.eye(saved.ndim + 1)
        return grid_map(saved.fixed_world, saved.moving_world)
    try:
        return grid_map(saved.fixed_world, img.world)
    except ValueError as err:
        raise InputError(f"{label}: {err}") from None


def apply_registration(
    registration: Any, image: Any, labels: bool = False, device: Any = None
) -> np.ndarray:
    """Warp an image or label map of the moving space with a saved registration.

    Args:
        registration: a folder written by ``pddreg register`` (or a
            :class:`pddreg.data.transforms.SavedRegistration`).
        image: an image (or, with ``labels``, a label map) in the moving image's space: a path
            or an :class:`pddreg.data.Image` (placed by its own header, so another scan of the
            moving subject on another grid works), or an array on the registered moving grid.
        labels: nearest-neighbour warping of an integer label map (values copied; 0 outside).
        device: where to resample (default: CPU, or CUDA when available).

    Returns:
        ``(*S_f)`` on the fixed grid: float32 (images, linear, the image's minimum outside it)
        or int64 (0 outside).
        For the moving image itself this is exactly ``register``'s ``warped`` (labels: its
        ``warped_seg``).
    """
    from . import pipeline
    from .data.io import Image, read_image, read_labels
    from .spatial import map_coords, sample, sample_labels

    saved = _saved(registration)
    if isinstance(image, (str, os.PathLike)):
        image = read_labels(os.fspath(image)) if labels else read_image(os.fspath(image))
    img = image if isinstance(image, Image) else None
    name = (img.path if img is not None else None) or "image"
    if labels:
        shape = tuple(np.asarray(img.array if img is not None else image).shape)
        arr = _label_array(image, "image", shape, name)
    else:
        arr, name, img = _image_array(image, "image")
    m_map = _image_map(saved, img, tuple(arr.shape), name)
    dev = _resolve_device(device)
    disp = torch.from_numpy(saved.disp)[None].to(dev)
    with torch.no_grad():
        coords = map_coords(m_map, saved.fixed_shape, disp)
        if labels:
            lab = torch.from_numpy(arr)[None, None].to(dev)
            return sample_labels(lab, coords, "zeros")[0, 0].cpu().numpy()
        out = sample(_to_batch(arr, dev), coords, padding="border")
        out = pipeline.outside_value(out, coords, arr.shape, float(arr.min()))
        return out[0, 0].cpu().numpy()


def map_points(registration: Any, points: Any, space: str = "voxel") -> np.ndarray:
    """Map points of the fixed image into the moving image with a saved registration.

    Args:
        registration: a registration folder (or :class:`SavedRegistration`).
        points: ``(N, ndim)`` fixed points: voxel indices of the fixed grid (``space="voxel"``,
            array axis order) or world coordinates in mm (``"mm"``, NIfTI RAS).
        space: ``"voxel"`` or ``"mm"``; the result is in the same units: voxel indices of the
            registered moving image, or moving world points in mm.

    Returns:
        ``(N, ndim)`` float64.

    Raises:
        InputError: a point outside the fixed image, or points of the wrong dimension.
    """
    from .spatial import grid_map, sample

    saved = _saved(registration)
    n = saved.ndim
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != n or not np.all(np.isfinite(pts)):
        raise InputError(f"points: expected finite (N, {n}) coordinates, got shape {pts.shape}")
    if space not in ("voxel", "mm"):
        raise InputError(f"points: space must be 'voxel' or 'mm', got {space!r}")
    vox = pts
    if space == "mm":
        vox = (pts - saved.fixed_world[:n, n]) @ np.linalg.inv(saved.fixed_world[:n, :n]).T
    shape = np.asarray(saved.fixed_shape, dtype=np.float64)
    outside = np.any((vox < -0.5) | (vox > shape - 0.5), axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"points: point {i + 1} {tuple(float(v) for v in pts[i])} lies outside the fixed "
            f"image (shape {tuple(saved.fixed_shape)})"
        )
    disp = torch.from_numpy(saved.disp).double()[None]
    coords = torch.from_numpy(vox.T.copy()).view(1, n, -1, *([1] * (n - 1)))
    d = sample(disp, coords, mode="linear", padding="border").reshape(n, -1).T.numpy()
    moved = vox + d  # in the fixed index frame of moving_world
    if space == "mm":
        return moved @ saved.fixed_world[:n, :n].T + saved.fixed_world[:n, n]
    m_map = (
        np.eye(n + 1) if saved.space == "index" else grid_map(saved.fixed_world, saved.moving_world)
    )
    return moved @ m_map[:n, :n].T + m_map[:n, n]
