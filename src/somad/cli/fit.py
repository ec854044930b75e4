"""``somad fit``: train a detector on good images and write its model file."""

from __future__ import annotations

import sys

from somad.cli.common import (
    add_key_args,
    add_model_args,
    add_ray_args,
    add_run_args,
    keys,
    model_from_args,
    model_output,
)
from somad.verdicts import FALSE_ALARM_LEVEL


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="train on defect-free images", description="Train a detector on defect-free images.")
    p.add_argument("train_dir", metavar="DIR", help="folder of good images, or an MVTec category (uses train/good)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    add_model_args(p)
    p.add_argument(
        "--updatable",
        action="store_const",
        const="float32",
        dest="scatter_dtype",
        help="SOMAD: keep per-node scatter matrices (float32) so that `somad update` can add good images later "
        "(= --scatter-dtype float32; a larger file, see docs/scaling.md)",
    )
    add_run_args(p, "fail")
    add_ray_args(p, "SOMAD: shard feature extraction, SOM epochs and node statistics over Ray workers")
    add_key_args(p, sign=True)
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    out = model_output(args.output, args.overwrite)
    sign_key, _ = keys(args, output=args.output)
    if getattr(args, "ray", None) is not None:  # sharded over Ray workers (somad.distributed.ray)
        from somad.distributed.ray import ray_fit, require_ray

        require_ray()
        model = ray_fit(model_from_args(args), args.train_dir, address=args.ray, workers=args.ray_workers)
    else:
        model = model_from_args(args).fit(args.train_dir)
    model.save(out, overwrite=args.overwrite, sign_key=sign_key)
    info = [f"fitted {model.method} on {model.n_train_images_} images in {model.fit_seconds_:.1f} s"]
    if getattr(model, "som_", None) is not None:
        info.append(
            f"quantization error {model.som_.quantization_error_:.4f}, "
            f"topographic error {model.som_.topographic_error_:.4f}"
        )
    if model.image_threshold_ is not None:
        t = model.threshold_info_ or {}
        if t.get("rule") == "cross_fit":
            what = f"the out-of-fold scores of {model.n_val_images_} images ({t['folds']}-fold cross-fitting)"
        else:
            what = f"{model.n_val_images_} held-out images"
        line = f"threshold {model.image_threshold_:.4f} from {what}"
        if t.get("false_alarm_rate_interval"):
            low, high = t["false_alarm_rate_interval"]
            line += (
                f" (expected false alarms {100 * t['expected_false_alarm_rate']:.0f}%, "
                f"{100 * FALSE_ALARM_LEVEL:.0f}% interval {100 * low:.0f}-{100 * high:.0f}%)"
            )
        info.append(line)
    elif not model.val_fraction:
        info.append("no threshold (--val-fraction 0): predict writes scores, no decisions or masks")
    print("; ".join(info))
    if model.image_threshold_ is None and model.val_fraction:
        print(
            f"warning: no threshold was set: --val-fraction {model.val_fraction} held out no usable image "
            f"({model.n_train_images_} training image(s)); predict writes scores, no decisions or masks "
            "(use more images or a larger --val-fraction)",
            file=sys.stderr,
        )
    if model.skipped_:
        print(
            f"left out {len(model.skipped_)} training image(s), unreadable or refused by the input gate:",
            file=sys.stderr,
        )
        for line in model.skipped_:
            print(f"  {line}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
