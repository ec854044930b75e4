"""``somad predict``: score images with a model file, or an export folder (without torch), and write the result
files."""

from __future__ import annotations

import sys
from pathlib import Path

from somad.cli.common import (
    add_backend_arg,
    add_key_args,
    add_ray_args,
    add_run_args,
    is_export,
    keys,
    load_export,
    override_thresholds,
    refuse_backend,
)
from somad.errors import SomadError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description="Score images: OUT/scores.csv, OUT/regions.csv, OUT/heatmaps/, OUT/masks/, (--save-maps) "
        "OUT/maps/ and (--explain) OUT/explanations/.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model file written by `somad fit`, or folder written by `somad export` (scored without torch)",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--save-maps", action="store_true", help="also write float32 maps at original resolution (.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also write OUT/explanations/: each predicted region beside its normal reference, a training patch: "
        "the one its nearest SOM node keeps (SOMAD) or the nearest memory-bank patch (PatchCore); PaDiM keeps none "
        "(its Gaussians are per image position). The training images must still be readable where fit read them",
    )
    add_run_args(p, "skip", scoring=True)
    add_ray_args(p, "score on a Ray actor pool")
    add_backend_arg(p)
    add_key_args(p, verify=True)
    p.set_defaults(func=run)


def _input_items(inputs: list[str], output: str):
    """Image items of the predict inputs; every input must exist and every output name must be unique. Files inside
    the output folder (an earlier run's heatmaps and masks, when ``-o`` lies inside an input folder) are never
    inputs: they are left out, and said so."""
    from somad.io.inputs import as_items
    from somad.io.outputs import inside

    for entry in inputs:
        if not Path(entry).exists():
            raise SomadError(f"{entry}: no such file or folder; check the path")
    items = as_items(inputs)
    if any(inside(entry, output) for entry in inputs):
        return items  # the output would replace an input: refused whole by staged_output_dir
    kept = [it for it in items if it.path is None or not inside(it.path, output)]
    if len(kept) < len(items):
        if not kept:
            raise SomadError(f"{output}: holds every input image; predict images outside the output folder")
        print(
            f"left out {len(items) - len(kept)} file(s) inside the output folder {output} (an earlier run's "
            "results are never inputs)",
            file=sys.stderr,
        )
    items = kept
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SomadError(f"two inputs would both be written as {dup!r}; predict the folders separately")
    return items


def run(args) -> int:
    from somad.io.outputs import staged_output_dir, write_predictions

    _, verify_key = keys(args, model=args.model)
    content = None
    if is_export(args.model):  # somad.runtime: onnxruntime or OpenVINO, no torch
        model = load_export(args, verify_key)
    else:
        refuse_backend(args)
        from somad.methods import load

        if args.ray is not None:  # the workers re-read the file: pin the content verified here (hash, signature)
            from somad.service.model_info import read_metadata

            content = read_metadata(args.model).get("sha256")
        model = load(args.model, device=args.device, search=args.search, verify_key=verify_key, expect_sha256=content)
    model.batch_size = args.batch_size
    override_thresholds(model, args)
    items = _input_items(args.inputs, args.output)
    scorer = model
    if args.ray is not None:  # the same outputs, scored on a Ray actor pool (somad.distributed.ray)
        from somad.distributed.ray import RayScoredModel, require_ray

        require_ray()
        scorer = RayScoredModel(
            model,
            args.model,
            address=args.ray,
            workers=args.ray_workers,
            device=args.device,
            search=args.search,
            content_sha256=content,
        )
    with staged_output_dir(args.output, overwrite=args.overwrite, inputs=[*args.inputs, args.model]) as tmp:
        rows, skipped = write_predictions(
            scorer, items, tmp, save_maps=args.save_maps, on_error=args.on_error, explain=args.explain
        )
        if skipped and not rows:  # leaving the block by an error discards the staged folder: nothing is written
            first = skipped[0].split("; ")[0]  # the reason without its per-image hint
            raise SomadError(
                f"none of the {len(skipped)} input images could be read (first: {first}); "
                "pass readable image files or folders"
            )
    n_flag = sum(1 for r in rows if r[2] == 1)
    n_invalid = sum(1 for r in rows if r[3] != "ok")
    tail = f"; {n_flag} flagged anomalous" if model.image_threshold_ is not None else ""
    tail += f" ({n_invalid} refused as invalid input, see the status column)" if n_invalid else ""
    print(f"scored {len(rows)} images{tail}; wrote {args.output}/scores.csv")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), listed in {args.output}/skipped.csv", file=sys.stderr)
    return 0
