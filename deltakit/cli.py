"""The ``deltakit`` command line: a thin layer over the library (every subcommand is one library call).

    deltakit family list
    deltakit family build [NAME ...]
    deltakit stats BASE FT [FT ...] [--out DIR] [--json]
    deltakit sweep BASE FT --methods dare magnitude --rates 0.5 0.9 --seeds 0 1 [--task T] [--out DIR]
    deltakit demo [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_family_list(args: argparse.Namespace) -> int:
    from deltakit.families import list_families

    df = list_families()
    print(df.to_string(index=False))
    return 0


def _cmd_family_build(args: argparse.Namespace) -> int:
    from deltakit.families import build_family

    for name in args.names or ["minilm-tweets"]:
        path = build_family(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from deltakit.stats import delta_stats
    from deltakit.store import check_writable_folder

    if args.out:
        check_writable_folder(args.out)  # before minutes of work, not after
    stats = delta_stats(
        args.base, args.fine_tunes, preset=args.preset, include=args.include, exclude=args.exclude,
        shared_rows=args.shared_rows, device=args.device, allow_pickle=args.allow_pickle, progress=not args.json,
    )
    # Print first: a late write error must not lose what was computed.
    print(json.dumps(stats.to_json(), default=str) if args.json else stats.summary(), flush=True)
    if args.out:
        stats.save(args.out)
        if not args.json:
            print(f"wrote {args.out}/{{tensors,layers,kinds,overall,similarity,histograms,pairing}}.parquet")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from deltakit.spec import RunOptions, SweepSpec
    from deltakit.summary import summarise
    from deltakit.sweep import sweep

    spec = SweepSpec(args.base, args.fine_tune, methods=args.methods, rates=args.rates, seeds=args.seeds,
                     preset=args.preset, include=args.include, exclude=args.exclude, shared_rows=args.shared_rows,
                     task=args.task, split=args.split, eval_limit=args.limit)
    df = sweep(spec, RunOptions(device=args.device, backend=args.backend, out=args.out, wait=args.wait))
    ok = df[df["status"] == "ok"]
    if len(ok):
        metric = "accuracy" if "accuracy" in set(ok["metric"]) else ok["metric"].iloc[0]
        table = summarise(df, metric)[["label", "rate", "mean", "std", "n_seeds", "q"]]
        print(f"{metric}, mean over seeds:")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"results: {args.out}/results.parquet")
    failed = df[df["status"] == "failed"]
    if len(failed):
        reasons = failed.groupby("error")["key"].nunique().sort_values(ascending=False)
        print(f"deltakit: error: {failed['key'].nunique()} point(s) failed; finished points are kept and a rerun "
              "retries only the failed ones. Reasons:", file=sys.stderr)
        for error, n in reasons.items():
            print(f"  {n} x {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from deltakit.demo import DEMO, FULL, run_demo

    grid = FULL if args.full else DEMO
    if args.limit is not None:
        grid = dataclasses.replace(grid, eval_limit=args.limit)
    path = run_demo(args.out, family=args.family, grid=grid)
    print(f"report: {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from deltakit.methods import sweep_methods
    from deltakit.spec import DEFAULT_METHODS, DEFAULT_PRESET, DEFAULT_RATES, DEFAULT_SEEDS

    parser = argparse.ArgumentParser(
        prog="deltakit",
        description="What did fine-tuning change, and how much of it can be thrown away? "
        "Model references: org/name[@revision], a local directory, or family:FAMILY/MEMBER.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    fam = sub.add_parser("family", help="the embedded model families (built offline from PyPI packages)")
    fam_sub = fam.add_subparsers(dest="family_command", required=True)
    fl = fam_sub.add_parser("list", help="list families and members, and whether they are built")
    fl.set_defaults(func=_cmd_family_list)
    fb = fam_sub.add_parser("build", help="build families (default: minilm-tweets); a second build is instant")
    fb.add_argument("names", nargs="*", help="family names (see `deltakit family list`)")
    fb.add_argument("--force", action="store_true", help="rebuild even if already built")
    fb.set_defaults(func=_cmd_family_build)

    st = sub.add_parser("stats", help="delta statistics of fine-tunes against their base")
    st.add_argument("base", help="the pre-trained base model")
    st.add_argument("fine_tunes", nargs="+", metavar="FT", help="one or more fine-tunes of BASE")
    st.add_argument("--out", help="write parquet tables, summary.txt and summary.json here")
    st.add_argument("--json", action="store_true", help="print a machine-readable summary instead of text")
    st.add_argument("--preset", default=DEFAULT_PRESET, help=f"prunable-set preset (default: {DEFAULT_PRESET})")
    st.add_argument("--include", action="append", help="regex a prunable tensor must match (repeatable)")
    st.add_argument("--exclude", action="append", help="regex excluding tensors from the prunable set (repeatable)")
    st.add_argument("--shared-rows", action="store_true", help="compare shared leading rows when vocab sizes differ")
    st.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the Triton statistics kernel)")
    st.add_argument("--allow-pickle", action="store_true", help="accept pickled weights (unsafe for untrusted models)")
    st.set_defaults(func=_cmd_stats)

    sw = sub.add_parser("sweep", help="prune a fine-tune over methods x rates x seeds and evaluate every point")
    sw.add_argument("base")
    sw.add_argument("fine_tune")
    sw.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help=f"registry entries, NAME or NAME:KEY=VALUE,... (e.g. darex_q:q=0.2); available: "
                         f"{', '.join(sweep_methods())}")
    sw.add_argument("--rates", nargs="+", type=float, default=list(DEFAULT_RATES),
                    help=f"pruning rates in [0, 1], sorted and de-duplicated (default: {' '.join(map(str, DEFAULT_RATES))})")
    sw.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    sw.add_argument("--task", help="evaluation data: glue/TASK, a dataset id, a parquet/csv file "
                    "(default: the family member's own data)")
    sw.add_argument("--split", default="test", help="evaluation split (default: test)")
    sw.add_argument("--limit", type=int, help="evaluate on a seeded subset of this many examples")
    sw.add_argument("--out", default="deltakit-sweep", help="results folder (resumable)")
    sw.add_argument("--wait", action="store_true",
                    help="wait for another sweep writing to the same --out to finish instead of failing")
    sw.add_argument("--preset", default=DEFAULT_PRESET, help=f"prunable-set preset (default: {DEFAULT_PRESET})")
    sw.add_argument("--include", action="append", help="regex a prunable tensor must match (repeatable)")
    sw.add_argument("--exclude", action="append", help="regex excluding tensors from the prunable set (repeatable)")
    sw.add_argument("--shared-rows", action="store_true",
                    help="when vocabularies differ, prune the shared rows (added rows keep fine-tuned values)")
    sw.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sw.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    sw.set_defaults(func=_cmd_sweep)

    de = sub.add_parser("demo", help="the main job: statistics, sweeps and an HTML report on the embedded family")
    de.add_argument("--out", default="deltakit-demo", help="output folder (index.html, results.parquet)")
    de.add_argument("--family", default="minilm-tweets", help="embedded family (tiny: a seconds-long smoke run)")
    de.add_argument("--full", action="store_true",
                    help="the fidelity study's larger grid (7 rates, the polarity member, 400 test examples): "
                         "beyond the default's 10-minute budget")
    de.add_argument("--limit", type=int, help="test examples per evaluation (default: 300, 400 with --full)")
    de.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    Bad input and environment failures (the library's errors are ValueError / KeyError subclasses; OSError for
    files and disks, RuntimeError, ImportError for a missing optional package) print one line naming the value
    and the fix and return 2; ``--debug`` shows the traceback instead. Ctrl-C returns 130.
    """
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("deltakit: interrupted; finished results are kept (a sweep resumes where it stopped).", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.filename is not None:
            msg = f"{err.strerror or err} ({err.filename}); check the path, its permissions and the free disk space"
        print(f"deltakit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
