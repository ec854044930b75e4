"""``somad benchmark``: fit and evaluate every (method, category, setting) cell."""

from __future__ import annotations

from pathlib import Path

from somad.cli.common import add_model_args, batch_size
from somad.errors import SomadError
from somad.evaluation.benchmark import VARIANTS, _all_cells, _int_list, markdown_table, run_benchmark


def add_parser(sub) -> None:
    p = sub.add_parser(
        "benchmark",
        help="fit + evaluate methods on categories; one table of accuracy and cost",
        description="Run fit and evaluation for every method x category (x ablation setting) in fresh "
        "subprocesses and write OUT/results.csv and OUT/results.md. Resumable.",
    )
    p.add_argument("inputs", nargs="+", metavar="DATA_ROOT_OR_CATEGORY")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--methods", default="somad,padim,patchcore", help="comma-separated (default somad,padim,patchcore)")
    p.add_argument("--k-grid", dest="k_grid", default=None, help="SOMAD ablation: e.g. 1,2,3,4,5")
    p.add_argument("--som-size-grid", dest="som_size_grid", default=None, help="SOMAD ablation: e.g. 14,28,56,auto")
    p.add_argument(
        "--somad-variants",
        default=None,
        help="SOMAD variants: fast (the default model), exact (exhaustive search, float32 store and factors) "
        "and paper (--preset paper), e.g. fast,paper",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads per cell (default 2)")
    p.add_argument("--force", action="store_true", help="recompute finished cells")
    add_model_args(p)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    p.add_argument("--batch-size", type=batch_size, default=16, help="images per backbone batch (default 16)")
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    from somad.methods import METHODS
    from somad.params import PER_METHOD

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SomadError(f"unknown method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    from somad.methods.base import BaseDetector

    common = {n: getattr(args, n) for n in BaseDetector._get_param_names() if hasattr(args, n)}
    somad_grid = {
        "k": _int_list(args.k_grid) if args.k_grid else [args.k],
        "som_size": _int_list(args.som_size_grid, "auto") if args.som_size_grid else [args.som_size],
    }
    if args.somad_variants:
        variants = [v for v in args.somad_variants.split(",") if v]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise SomadError(f"unknown SOMAD variant {bad[0]!r}; choose from: {', '.join(VARIANTS)}")
        somad_grid["variant"] = variants
    own = {
        m: {
            n: getattr(args, n)
            for n in METHODS[m]._get_param_names()
            if n not in common and hasattr(args, n) and getattr(args, n) is not PER_METHOD
        }
        for m in methods
    }
    run_benchmark(
        [Path(p) for p in args.inputs],
        Path(args.output),
        methods=methods,
        common=common,
        own=own,
        somad_grid=somad_grid,
        force=args.force,
        threads=args.threads,
    )
    print(markdown_table(_all_cells(Path(args.output))))
    print(f"wrote {args.output}/results.csv and {args.output}/results.md")
    return 0
