"""``somad update``: merge more good images into a SOMAD model's node statistics, without refitting the SOM."""

from __future__ import annotations

import sys

from somad.cli.common import add_model_rewrite_args, keys, model_output
from somad.errors import SomadError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "update",
        help="add good images to a model's node statistics, without refitting",
        description="Merge the patches of more good images into a SOMAD model's per-node Gaussians, with its SOM "
        "held fixed (the model must be fitted with --updatable), and write a new model file. The thresholds are "
        "kept unless --calibrate names held-out good images to re-estimate them from.",
    )
    add_model_rewrite_args(
        p,
        model_help="model file written by `somad fit --updatable`",
        images_metavar="GOOD_IMAGES",
        images_help="folder of good images to merge (or an MVTec category: its train/good)",
    )
    p.add_argument(
        "--calibrate",
        metavar="GOOD_DIR",
        default=None,
        help="after the merge, re-estimate the thresholds from these held-out good images (not the merged "
        "ones, nor the fit's: they score optimistically low, and are refused); default: keep the model's thresholds",
    )
    p.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="unreadable images: stop, or skip and list them (default fail)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from somad.methods import load

    out = model_output(args.output, args.overwrite)
    sign_key, verify_key = keys(args, model=args.model, output=args.output)
    model = load(args.model, device=args.device, verify_key=verify_key)
    if model.method != "somad":
        raise SomadError(
            f"{args.model}: is a {model.method} model; update merges node statistics of SOMAD models only, "
            f"refit {model.method} on all the good images with `somad fit --method {model.method}`"
        )
    model.check_updatable(args.model)  # refuse a model without scatter matrices before extracting any feature
    model.batch_size = args.batch_size
    model.on_error = args.on_error
    if args.calibrate is not None:  # refuse trained or about-to-be-merged images before any feature is extracted
        model.check_held_out(args.calibrate, also=args.good_dir)
    before = int(model.n_train_images_)
    model.update(args.good_dir, accept_outliers=args.accept_outliers)
    if args.calibrate is not None:
        model.calibrate(args.calibrate, accept_outliers=args.accept_outliers)
    model.save(out, overwrite=args.overwrite, sign_key=sign_key)
    added = model.updates_[-1]
    print(
        f"merged {added['n_images']} images ({added['n_patches']} patches) into {before} training images' "
        f"node statistics; {int((model.gaussians_.counts == 0).sum())} empty nodes left"
    )
    if args.calibrate is not None:
        info = model.threshold_info_
        print(
            f"image threshold {model.image_threshold_:.4f} from {info['n_images']} good images "
            f"(expected false-alarm rate {100 * info['expected_false_alarm_rate']:.1f}%)"
        )
    elif model.image_threshold_ is not None:
        print(f"threshold kept at {model.image_threshold_:.4f} (re-estimate it with --calibrate GOOD_DIR)")
    if model.skipped_:
        print(f"skipped {len(model.skipped_)} unreadable image(s):", file=sys.stderr)
        for line in model.skipped_:
            print(f"  {line}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
