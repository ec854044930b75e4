"""``somad demo``: the offline default job on a generated inspection set."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fit and score a generated synthetic inspection set (offline)",
        description="Generate a synthetic inspection set, fit SOMAD on its good images, "
        "score its test images and print image and pixel AUROC.",
    )
    p.add_argument("-o", "--output", default="somad-demo", metavar="DIR", help="working folder (default somad-demo)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="default efficientnet_lite0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from somad.demo import run_demo

    result = run_demo(Path(args.output), backbone=args.backbone, device=args.device, overwrite=args.overwrite)
    print(
        f"synthetic set: {result['n_train']} good training images, {result['n_test']} test images "
        f"({result['n_defect']} defective) in {result['data']}"
    )
    print(f"fit {result['fit_seconds']:.1f} s, predict {result['predict_ms']:.0f} ms/image")
    print(f"image AUROC {result['image_auroc']:.4f}   pixel AUROC {result['pixel_auroc']:.4f}")
    print(f"model: {result['model']}   heatmaps: {result['predictions']}/heatmaps")
    return 0
