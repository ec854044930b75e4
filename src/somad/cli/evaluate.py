"""``somad evaluate``: metrics by the MVTec AD protocol and the HTML report."""

from __future__ import annotations

from pathlib import Path

from somad.cli.common import add_key_args, add_run_args, keys, override_thresholds
from somad.errors import SomadError
from somad.evaluation.protocol import (
    EVAL_RESOLUTIONS,
    evaluate_model,
    format_metrics_table,
    load_test_samples,
    write_metrics_json,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics and an HTML report on a labelled test set",
        description="Evaluate a model on an MVTec-style category (or plain folders): "
        "OUT/metrics.json, OUT/report.html, heatmaps, masks and scores, and for the report OUT/explanations/ "
        "(SOMAD and PatchCore: each flagged region beside its normal reference).",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by `somad fit`")
    p.add_argument("category", metavar="CATEGORY_DIR", nargs="?", help="MVTec category (test/, ground_truth/)")
    p.add_argument("--good-dir", help="plain layout: folder of good test images")
    p.add_argument(
        "--defect-dir", action="append", default=[], help="plain layout: folder of defective images (repeatable)"
    )
    p.add_argument("--mask-dir", help="plain layout: masks matched by file stem (<stem>_mask.png or <stem>.png)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--save-maps", action="store_true", help="also write float32 maps at original resolution (.npy)")
    p.add_argument(
        "--eval-resolution",
        default="original",
        choices=EVAL_RESOLUTIONS,
        help="compare at the masks' own resolution (default, as the MVTec reference) or at the model input",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip report.html (and OUT/explanations/: each flagged region beside its normal reference, from a "
        "SOMAD or PatchCore model; the training images must still be readable where fit read them)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_run_args(p, "skip", scoring=True)
    add_key_args(p, verify=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from somad.io.outputs import staged_output_dir
    from somad.methods import load

    if args.category and (args.good_dir or args.defect_dir or args.mask_dir):
        raise SomadError("give either CATEGORY_DIR or --good-dir/--defect-dir/--mask-dir, not both")
    if not args.category and not (args.good_dir or args.defect_dir):
        raise SomadError("no test data: give an MVTec CATEGORY_DIR or --good-dir/--defect-dir")
    _, verify_key = keys(args, model=args.model)
    model = load(args.model, device=args.device, search=args.search, verify_key=verify_key)
    model.batch_size = args.batch_size
    override_thresholds(model, args)
    samples = load_test_samples(
        Path(args.category) if args.category else None,
        good_dir=args.good_dir,
        defect_dirs=args.defect_dir,
        mask_dir=args.mask_dir,
    )
    inputs = [p for p in (args.category, args.good_dir, args.mask_dir, *args.defect_dir, args.model) if p]
    with staged_output_dir(args.output, overwrite=args.overwrite, inputs=inputs) as tmp:
        result = evaluate_model(
            model,
            samples,
            out=tmp,
            save_maps=args.save_maps,
            eval_resolution=args.eval_resolution,
            on_error=args.on_error,
            explain=not args.no_report,  # the report shows each flagged image's normal references
        )
        write_metrics_json(tmp / "metrics.json", result)
        if not args.no_report:
            from somad.evaluation.report import write_report

            write_report(tmp, result, model=model)
    print(format_metrics_table(result))
    print(f"wrote {args.output}/metrics.json" + ("" if args.no_report else f" and {args.output}/report.html"))
    return 0
