"""``somad calibrate``: re-estimate a model's thresholds from good images, without refitting."""

from __future__ import annotations

from somad.cli.common import add_model_rewrite_args, keys, model_output


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="re-estimate the thresholds from good images, without refitting",
        description="Re-estimate a model's image and pixel thresholds from a folder of good images the model "
        "never trained on (the same estimate fit makes from its held-out images) and write a new model file. "
        "Images the fit or an update trained on are refused (their scores are biased low), and so are images "
        "that score far above the current threshold (defects?) unless --accept-outliers.",
    )
    add_model_rewrite_args(
        p,
        model_help="model file written by `somad fit`",
        images_metavar="GOOD_DIR",
        images_help="folder of good images the fit never saw (an MVTec category: its validation/good; never "
        "train/good, which the fit trained on)",
    )
    p.add_argument(
        "--threshold-quantile",
        type=float,
        default=None,
        help="image threshold quantile (default: the model's, normally 0.9)",
    )
    p.add_argument(
        "--pixel-threshold-quantile",
        type=float,
        default=None,
        help="pixel threshold quantile (default: the model's, normally 0.999)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from somad.methods import load

    out = model_output(args.output, args.overwrite)
    sign_key, verify_key = keys(args, model=args.model, output=args.output)
    model = load(args.model, device=args.device, verify_key=verify_key)
    model.batch_size = args.batch_size
    for name in ("threshold_quantile", "pixel_threshold_quantile"):
        if getattr(args, name) is not None:
            setattr(model, name, getattr(args, name))
    model.calibrate(args.good_dir, accept_outliers=args.accept_outliers)
    model.save(out, overwrite=args.overwrite, sign_key=sign_key)
    info = model.threshold_info_
    print(
        f"image threshold {model.image_threshold_:.4f} = {info['quantile']:g}-quantile of the scores of "
        f"{info['n_images']} good images: expected false-alarm rate {100 * info['expected_false_alarm_rate']:.1f}%"
        + (" (few images: the estimate is rough; 100 or more give a steadier one)" if info["n_images"] < 20 else "")
    )
    print(f"pixel threshold {model.pixel_threshold_:.4f} = {info['pixel_quantile']:g}-quantile of their map pixels")
    print(f"wrote {out}")
    return 0
