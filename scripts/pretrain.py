"""Make the shipped PDD-Net weights ``src/pddreg/weights/pdd2d.pt`` and ``pdd3d.pt``.

The feature nets are trained only on synthetic pairs (random smooth label maps, random
intensity per label, blur, bias field, noise, random smooth deformations; see
:mod:`pddreg.train.synth`), so they never see real anatomy and cannot overfit to it.
Deterministic for a given seed and thread count; runs on CPU:

    nice -n 10 python scripts/pretrain.py --dim 2     # a few minutes
    nice -n 10 python scripts/pretrain.py --dim 3     # about ten minutes (64^3 crops)

After training, the 2D model is checked on phantom pairs (never seen): Dice before/after,
image dissimilarity before/after and the folding fraction are logged.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from pddreg.models import PDDNet, default_config, load_model, save_model
from pddreg.models.pdd import SHIPPED_SMOOTH_2D
from pddreg.train import TrainConfig, train
from pddreg.train.synth import SynthConfig, SynthDataset

log = logging.getLogger("pretrain")

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "pddreg" / "weights"

#: Synthetic data per dimension (image size and deformation scales in voxels).
SYNTH = {
    2: SynthConfig(
        shape=(128, 128),
        num_labels=12,
        label_scale=24,
        max_disp=10,
        disp_scale=40,
        same_contrast=0.7,
        noise=0.04,
    ),
    3: SynthConfig(
        shape=(64, 64, 64),
        num_labels=10,
        label_scale=16,
        max_disp=6,
        disp_scale=28,
        same_contrast=0.7,
        blur=1.0,
    ),
}
STEPS = {2: 350, 3: 120}
BATCH = {2: 4, 3: 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, choices=(2, 3), required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=None)
    p.add_argument(
        "--label-loss",
        choices=("nonlocal", "warped", "both"),
        default=None,
        help="label loss (default: the --init file's own, else the model default)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue training a saved model (use another --seed for fresh pairs)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    ndim = args.dim
    out = args.output or WEIGHTS / f"pdd{ndim}d.pt"
    dataset = SynthDataset(SYNTH[ndim], val_pairs=4, seed=args.seed)
    steps = args.steps or STEPS[ndim]
    config = TrainConfig(
        steps=steps,
        lr=2e-3,
        alpha_lr=2e-2,
        batch=BATCH[ndim],
        seed=args.seed,
        augment=False,  # the generator is random enough
        checkpoint=str(out) + ".ckpt",
        checkpoint_every=25,
        resume=True,
        val_every=max(1, steps // 5),
        val_pairs=4,
    )
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_model(args.init)
        model.config.smooth = default_config(ndim).smooth  # train with the training smoothing
    else:
        model = PDDNet(default_config(ndim))
    if args.label_loss is not None:
        model.config.label_loss = args.label_loss
    t0 = time.perf_counter()
    model = train(dataset, config, model=model.train())
    log.info(
        "trained %d steps in %.0f s; synthetic val Dice %.3f",
        steps,
        time.perf_counter() - t0,
        model.val_dice,
    )
    if ndim == 2:  # inference smoothing of the shipped 2D file (see SHIPPED_SMOOTH_2D)
        model.config.smooth = SHIPPED_SMOOTH_2D
    save_model(model, out)
    Path(str(out) + ".ckpt").unlink(missing_ok=True)
    log.info("wrote %s (%.1f kB)", out, out.stat().st_size / 1024)
    if ndim == 2:
        check_on_phantoms(model)
    return 0


def check_on_phantoms(model: PDDNet, pairs: int = 6) -> None:
    """Log Dice, image SSD and folding of ``model`` on phantom pairs it never saw."""

    from pddreg.data import make_phantom
    from pddreg.metrics import folding_fraction, mean_dice
    from pddreg.spatial import warp, warp_labels

    for k in range(pairs):
        fi, fl = make_phantom(1000 + 2 * k, ndim=2)
        mi, ml = make_phantom(1001 + 2 * k, ndim=2)
        f = torch.as_tensor(fi)[None, None]
        m = torch.as_tensor(mi)[None, None]
        disp = model.register(f, m)
        warped = warp(m, disp)
        wl = warp_labels(torch.as_tensor(ml)[None, None], disp)[0, 0].numpy()
        log.info(
            "phantom pair %d: dice %.3f -> %.3f, ssd %.4f -> %.4f, folding %.4f",
            k,
            mean_dice(fl, ml),
            mean_dice(fl, wl),
            float(((f - m) ** 2).mean()),
            float(((f - warped) ** 2).mean()),
            folding_fraction(disp[0]),
        )


if __name__ == "__main__":
    raise SystemExit(main())
