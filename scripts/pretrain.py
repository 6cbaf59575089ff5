"""Make the shipped PDD-Net weights ``src/pddreg/weights/pdd2d.pt`` and ``pdd3d.pt``.

The networks (:func:`pddreg.models.default_config`: MIND-SSC channels beside learned ones, the
multi-level discrete search of ``mind`` with learned regularisation weights) are trained only on
synthetic pairs of :mod:`pddreg.train.synth_engine` (random label maps and anatomy-like maps,
an independent random contrast per image, bias, blur, noise, thick slices, cropped fields of
view, random affine maps and large smooth diffeomorphic deformations), against the pairs' true
fields (end-point error) and labels. They never see real anatomy. Validation runs on
known-answer cases made from the real images of ``--val-data`` (a real slice or volume warped
by a known smooth field, with and without a non-monotonic intensity remap): the mean
end-point error against the steps is the training log, written as CSV and as a plot next to
the weights (``pdd2d_log.csv``, ``pdd2d_log.png``).

Long runs are resumable: the checkpoint (model, optimiser, generator state) is written every
``--checkpoint-every`` steps to ``scripts/checkpoints/pretrain{2,3}d.ckpt`` (kept in the
repository), and ``--resume`` continues it, also towards a larger ``--steps``:

    nice -n 10 python scripts/pretrain.py --dim 2 --steps 6000 --resume
    nice -n 10 python scripts/pretrain.py --dim 3 --steps 2000 --resume
    python scripts/pretrain.py --dim 2 --steps 200 --device cuda   # on a GPU where one is at hand
    python scripts/pretrain.py --dim 2 --refresh-config   # the refinement settings only

A second phase starts from weights already made, with a fresh optimiser (typically a lower
``--lr``): ``--init`` names them, and the log keeps their own log's rows up to the step they were
saved at (their best validation), the new steps counting on from there. The phase's start is
recorded next to the checkpoint (``pretrain{2,3}d.json``), so ``--resume`` continues it:

    python scripts/pretrain.py --dim 2 --init src/pddreg/weights/pdd2d.pt --lr 1e-4 --steps 1000
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pddreg.data.cases import make_case, random_field
from pddreg.models import PDDNet, default_config, load_model, save_model
from pddreg.train import TrainConfig, train
from pddreg.train.realwarp import MixedDataset, RealWarpConfig
from pddreg.train.synth import SynthDataset
from pddreg.train.synth_engine import SynthEngineConfig

log = logging.getLogger("pretrain")

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "pddreg" / "weights"
CHECKPOINTS = ROOT / "scripts" / "checkpoints"
REAL = ROOT.parent / "shared" / "data" / "real"

#: Synthetic pairs per dimension. The global stage of ``pddreg register`` removes most of the
#: affine misalignment before the network runs, so the pairs differ by a mild affine map and
#: a large smooth deformation (up to 8 % of the extent).
SYNTH = {
    2: SynthEngineConfig(
        shape=(160, 192),
        rotation=4.0,
        scaling=0.04,
        shear=0.02,
        translation=0.02,
        svf_max_disp=0.08,
    ),
    3: SynthEngineConfig(
        shape=(64, 64, 64),
        rotation=4.0,
        scaling=0.04,
        shear=0.02,
        translation=0.02,
        svf_max_disp=0.08,
        anatomy_pool=8,
    ),
}
STEPS = {2: 6000, 3: 2000}
BATCH = {2: 4, 3: 1}
#: Half of the pairs are real images of the training split deformed by known fields.
P_REAL = 0.5
REALWARP = {
    2: RealWarpConfig(shape=(160, 192)),
    3: RealWarpConfig(shape=(64, 64, 64), zoom=(0.8, 1.25)),
}


def training_images(ndim: int, data: Path) -> list[np.ndarray]:
    """The real training split (never used for validation): the second brain MR and chest
    CT, the five flip angles of the abdominal MR, echo frames 40-119, Middlebury frames other
    than RubberWhale; 2D: their slices, 3D: the volumes at about 2 mm."""
    import nibabel as nib
    from PIL import Image as PILImage
    from scipy.ndimage import zoom

    vols: list[tuple[np.ndarray, tuple[float, ...]]] = []
    for rel in ("mr_brain_2subjects/brain2_image.nii.gz", "ct_chest_2subjects/lung2_image.nii.gz"):
        if (data / rel).is_file():
            img = nib.load(data / rel)
            vols.append((np.asarray(img.dataobj, np.float32), img.header.get_zooms()[:3]))
    if (data / "mr_abdomen_vfa_4d" / "vfa_4d.nii.gz").is_file():
        img = nib.load(data / "mr_abdomen_vfa_4d" / "vfa_4d.nii.gz")
        v = np.asarray(img.dataobj, np.float32)
        vols += [(v[..., k], img.header.get_zooms()[:3]) for k in range(v.shape[-1])]
    out: list[np.ndarray] = []
    if ndim == 3:
        for v, sp in vols:
            out.append(zoom(v, [float(s) / 2.0 for s in sp], order=1))
        return out
    for v, _ in vols:
        step = max(1, v.shape[2] // 12)
        out += [v[:, :, k] for k in range(2, v.shape[2] - 2, step)]
    echo = sorted((data / "echo_a4c_cine").glob("frame_*.png"))[40::5]
    out += [np.asarray(PILImage.open(f), np.float32) for f in echo]
    for scene in sorted((data / "middlebury_frames").glob("*")):
        if scene.name != "RubberWhale" and (scene / "frame10.png").is_file():
            out.append(np.asarray(PILImage.open(scene / "frame10.png"), np.float32))
    return out


def _real_sources(ndim: int, data: Path) -> list[tuple[str, np.ndarray]]:
    """Real slices (2D) or volumes (3D, about 3 mm) to make validation cases from."""
    import nibabel as nib
    from PIL import Image as PILImage
    from scipy.ndimage import zoom

    out: list[tuple[str, np.ndarray]] = []
    brain = data / "mr_brain_2subjects" / "brain1_image.nii.gz"
    ct = data / "ct_chest_2subjects" / "lung1_image.nii.gz"
    if ndim == 2:
        if brain.is_file():
            out.append(("brain MR", np.asarray(nib.load(brain).dataobj, np.float32)[:, :, 12]))
        if ct.is_file():
            out.append(("chest CT", np.asarray(nib.load(ct).dataobj, np.float32)[::2, ::2, 24]))
        echo = data / "echo_a4c_cine" / "frame_000.png"
        if echo.is_file():
            out.append(("echo", np.asarray(PILImage.open(echo), np.float32)[::2, ::2]))
        photo = data / "middlebury_frames" / "RubberWhale" / "frame10.png"
        if photo.is_file():
            out.append(("photo", np.asarray(PILImage.open(photo), np.float32)[::2, ::2]))
        return out
    if brain.is_file():
        v = np.asarray(nib.load(brain).dataobj, np.float32)
        out.append(("brain MR", zoom(v, (0.78 / 3, 0.78 / 3, 6.5 / 3), order=1)))
    if ct.is_file():  # (the abdominal MR is in the 3D training split)
        v = np.asarray(nib.load(ct).dataobj, np.float32)
        out.append(("chest CT", zoom(v, (0.57 / 3, 0.57 / 3, 5.0 / 3), order=1)))
    return out


def validation_cases(ndim: int, data: Path, seed: int = 7) -> list:
    """Known-answer cases from real images: a smooth field of up to 6 % of the extent, the
    same contrast and a non-monotonic remap."""
    cases = []
    for k, (name, image) in enumerate(_real_sources(ndim, data)):
        amp = 0.06 * max(image.shape)
        disp = random_field(image.shape, amp, scale=max(image.shape) / 4, seed=seed + k)
        for remap in (False, True):
            label = f"{name}{' remapped' if remap else ''}"
            cases.append(make_case(image, disp, remap=remap, seed=seed + k, name=label))
    return cases


@torch.no_grad()
def evaluate_cases(model: PDDNet, cases: list) -> dict[str, float]:
    """Mean end-point error (voxels, inside the object) of ``model.register`` per case."""
    from pddreg.data.io import normalise_intensity

    was = model.training
    model.eval()
    out = {}
    dev = next(model.parameters()).device
    for case in cases:
        f = torch.from_numpy(normalise_intensity(case.fixed))[None, None].to(dev)
        m = torch.from_numpy(normalise_intensity(case.moving))[None, None].to(dev)
        d = model.register(f, m, instance_opt=False)[0].cpu().numpy()  # the network alone
        err = np.sqrt(((d - case.disp) ** 2).sum(0))[case.mask]
        out[case.name] = float(err.mean())
    model.train(was)
    return out


def _read_log(path: Path) -> list[dict[str, float]]:
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _plot(
    rows: list[dict[str, float]],
    names: list[str],
    path: Path,
    baseline: dict,
    phase: tuple[int, float] | None = None,
) -> None:
    """Loss and validation against the steps; ``phase``: ``(step, lr)`` of a second phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["loss"] for r in rows], lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss", title="loss (synthetic pairs)")
    ax[0].set_yscale("log")
    val = [r for r in rows if not math.isnan(r.get("val_epe", float("nan")))]
    for name in names:
        ax[1].plot([r["step"] for r in val], [r[name] for r in val], marker="o", ms=3, label=name)
    for name in names:
        ax[1].axhline(baseline[name], lw=0.5, ls=":", color="grey")
    if phase is not None:
        for a in ax:
            a.axvline(phase[0], lw=0.8, ls="--", color="k")
        ax[1].annotate(f" lr {phase[1]:g} from here", (phase[0], ax[1].get_ylim()[1]), va="top")
    ax[1].set(xlabel="step", ylabel="end-point error (voxels)", title="validation: real images")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def refresh_config(ndim: int, path: Path) -> int:
    """Set :data:`pddreg.models.pdd.INFERENCE_FIELDS` of the weights in ``path`` to those of
    ``default_config(ndim)`` (the weights themselves unchanged)."""
    from pddreg.models import load_model
    from pddreg.models.pdd import INFERENCE_FIELDS

    model = load_model(path)
    ref = default_config(ndim)
    for name in INFERENCE_FIELDS:
        setattr(model.config, name, getattr(ref, name))
    save_model(model, path)
    log.info("%s: inference settings %s", path, {k: getattr(ref, k) for k in INFERENCE_FIELDS})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, choices=(2, 3), required=True)
    p.add_argument("--steps", type=int, default=None, help="total steps (default 6000 / 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start a second phase from these weights (fresh optimiser; --steps counts its steps)",
    )
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-data", type=Path, default=REAL, help="real images for validation")
    p.add_argument("-o", "--output", type=Path, default=None, help="weights file to write")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from the CSV log")
    p.add_argument(
        "--refresh-config",
        action="store_true",
        help="only write default_config()'s inference settings (refinement) into the weights file",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    ndim = args.dim
    out = args.output or WEIGHTS / f"pdd{ndim}d.pt"
    if args.refresh_config:
        return refresh_config(ndim, out)
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    ckpt = CHECKPOINTS / f"pretrain{ndim}d.ckpt"
    log_csv = out.with_name(out.stem + "_log.csv")
    steps = args.steps or STEPS[ndim]
    dataset = SynthDataset(SYNTH[ndim], val_pairs=2, seed=args.seed)
    if args.val_data.is_dir() and P_REAL > 0:
        images = training_images(ndim, args.val_data)
        log.info("real training images: %d", len(images))
        dataset = MixedDataset(dataset, images, REALWARP[ndim], p_real=P_REAL)
    cases = validation_cases(ndim, args.val_data) if args.val_data.is_dir() else []
    names = [c.name for c in cases]
    baseline = {c.name: float(np.sqrt((c.disp**2).sum(0))[c.mask].mean()) for c in cases}
    log.info("validation cases: %s", ", ".join(f"{k} ({v:.2f})" for k, v in baseline.items()))

    rows: list[dict[str, float]] = []
    phase = ckpt.with_suffix(".json")
    start = None  # a second phase: {"init": weights, "step": where it starts, "lr": ...}
    if args.plot_only or (args.resume and ckpt.is_file()):
        if phase.is_file():
            start = json.loads(phase.read_text())
    elif args.init is not None:
        history = _read_log(args.init.with_name(args.init.stem + "_log.csv"))
        best_row = min(
            (r for r in history if r.get("val_epe") == r.get("val_epe")),
            key=lambda r: r["val_epe"],
            default=None,
        )
        start = {"init": str(args.init), "step": int(best_row["step"]) if best_row else 0}
        start["lr"] = args.lr
        rows = [r for r in history if r["step"] <= start["step"]]
        phase.write_text(json.dumps(start) + "\n")
    else:  # a run from scratch
        phase.unlink(missing_ok=True)
    base = 0 if start is None else int(start["step"])
    init = None if start is None else Path(start["init"])
    marker = None if start is None else (base, float(start["lr"]))
    if args.plot_only:
        rows = _read_log(log_csv)
        _plot(rows, names, out.with_name(out.stem + "_log.png"), baseline, marker)
        return 0
    if args.resume and ckpt.is_file() and log_csv.is_file():
        rows = _read_log(log_csv)
    torch.manual_seed(args.seed)
    if init is not None:
        model = load_model(init)
        if type(model) is not PDDNet or model.config.ndim != ndim:
            raise SystemExit(f"{init}: not {ndim}D PDD-Net weights")
    else:
        model = PDDNet(default_config(ndim))
    config = TrainConfig(
        steps=steps,
        lr=args.lr,
        alpha_lr=4 * args.lr,  # 2e-3 at the default --lr
        batch=BATCH[ndim],
        seed=args.seed,
        augment=False,  # the generator is random enough (and the field would not follow)
        fields=True,
        checkpoint=str(ckpt),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        val_every=0,
        val_pairs=0,
        device=args.device,
    )
    t0 = time.perf_counter()
    elapsed = rows[-1]["time_s"] if rows else 0.0  # a resumed run or a phase counts on

    def write_log() -> None:
        keys = ["step", "loss", "time_s", "val_epe", *names]
        tmp = log_csv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, float("nan")) for k in keys})
        tmp.replace(log_csv)

    best = {
        "epe": min(
            (r["val_epe"] for r in rows if r.get("val_epe") == r.get("val_epe")),
            default=float("inf"),
        )
    }

    def callback(step: int, logs: dict[str, float]) -> None:
        at = step  # the phase's own step (its checkpoint's)
        step = base + step
        row = {"step": step, "loss": logs["loss"], "time_s": elapsed + time.perf_counter() - t0}
        row["val_epe"] = float("nan")
        if cases and (at % args.val_every == 0 or at == steps):
            errs = evaluate_cases(model, cases)
            row.update(errs)
            row["val_epe"] = float(np.mean(list(errs.values())))
            if row["val_epe"] < best["epe"]:  # the shipped weights: the best validation
                best["epe"] = row["val_epe"]
                save_model(model, out)
                log.info(
                    "new best validation EPE %.3f at step %d: wrote %s", best["epe"], step, out
                )
            log.info(
                "step %d loss %.4f val EPE %.3f (%s)",
                step,
                logs["loss"],
                row["val_epe"],
                ", ".join(f"{k} {v:.2f}" for k, v in errs.items()),
            )
        rows.append(row)
        if at % config.checkpoint_every == 0 or at == steps:
            write_log()

    if not rows and cases and init is None:  # the untrained network: MIND channels, mind's levels
        errs = evaluate_cases(model, cases)
        rows.append(
            {
                "step": 0,
                "loss": float("nan"),
                "time_s": 0.0,
                **errs,
                "val_epe": float(np.mean(list(errs.values()))),
            }
        )
        log.info("untrained: val EPE %.3f", rows[-1]["val_epe"])
    if init is not None and not args.resume and cases:
        # the phase's start measured again with today's inference code: the bar to beat
        errs = evaluate_cases(model, cases)
        val = float(np.mean(list(errs.values())))
        log.info("%s: val EPE %.3f (at step %d of its log: %.3f)", init, val, base, best["epe"])
        if rows:
            rows[-1].update(errs, val_epe=val)
        best["epe"] = val
        write_log()
    model = train(dataset, config, model=model.train(), callback=callback)
    write_log()
    log.info("trained to step %d in %.0f s", base + steps, time.perf_counter() - t0)
    if not cases:
        save_model(model, out)
    log.info("%s: the weights of the best validation EPE %.3f", out, best["epe"])
    if cases:
        _plot(rows, names, out.with_name(out.stem + "_log.png"), baseline, marker)
    dataset.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
