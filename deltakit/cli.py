"""The ``deltakit`` command line: a thin layer over the library (every subcommand is one library call).

    deltakit family list
    deltakit family build [NAME ...]
    deltakit stats BASE FT [FT ...] [--out DIR] [--json] [--spectral [--spectral-k K]] [--stream]
    deltakit sweep BASE FT --methods dare magnitude --rates 0.5 0.9 --seeds 0 1 [--task T] [--out DIR]
                   [--ray [ADDRESS] [--workers N]]
    deltakit merge BASE FT1 FT2 [FT ...] --methods ta ties dare_ta --rates 0.5 0.9 --lambdas 0.5 1 [--out DIR]
    deltakit export BASE FT [FT ...] --method dare --rate 0.9 --seed 0 --out DIR [--compact] [--push-to-hub ORG/NAME]
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
        spectral=args.spectral, spectral_k=args.spectral_k, stream=args.stream,
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
    runner = None
    if args.ray is not None:
        from deltakit.ray_runner import RayRunner  # Ray is imported only here (an optional extra)

        runner = RayRunner(args.ray or None, args.workers)
    elif args.workers is not None:
        raise ValueError("--workers sets the number of Ray workers: add --ray (or --ray ADDRESS).")
    df = sweep(spec, RunOptions(device=args.device, backend=args.backend, out=args.out, wait=args.wait,
                                max_memory=args.max_memory, tier=args.tier), runner=runner)
    metric = _main_metric(df)
    if metric:
        table = summarise(df, metric)[["label", "rate", "mean", "std", "n_seeds", "q"]]
        print(f"{metric}, mean over seeds:")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if "peak_host_mb" in df and len(df):
        last = df.iloc[-1]
        device = "" if last.isna()["peak_device_mb"] else f", device {last['peak_device_mb']:.0f} MB"
        print(f"{df.attrs.get('memory', '')}; measured peak: host {last['peak_host_mb']:.0f} MB{device}")
    print(f"results: {args.out}/results.parquet")
    return _report_failed(df)


def _cmd_merge(args: argparse.Namespace) -> int:
    from deltakit.merge import merge_summary, merge_sweep, write_merge_report
    from deltakit.spec import MergeSpec, RunOptions

    spec = MergeSpec(args.base, args.fine_tunes, methods=args.methods, rates=args.rates, lambdas=args.lambdas,
                     seeds=args.seeds, preset=args.preset, include=args.include, exclude=args.exclude,
                     tasks=args.tasks, split=args.split, eval_limit=args.limit)
    df = merge_sweep(spec, RunOptions(device=args.device, backend=args.backend, out=args.out, wait=args.wait))
    metric = _main_metric(df)
    if metric:
        print(f"{metric} per task, mean over seeds:")
        print(merge_summary(df, metric).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        print(f"report: {write_merge_report(df, f'{args.out}/index.html', metric=metric)}")
    print(f"results: {args.out}/results.parquet")
    return _report_failed(df)


def _cmd_export(args: argparse.Namespace) -> int:
    from deltakit import export
    from deltakit.spec import MethodSpec
    from deltakit.store import ResultStore

    from deltakit.methods import get_merge, get_method

    method = MethodSpec.parse(args.method)
    params = dict(method.params)
    merging = len(args.fine_tunes) > 1
    random = (get_merge if merging else get_method)(method.name).random
    metrics = None
    if args.results:  # the point's measured metrics, for the card
        for r in ResultStore(args.results).records():
            if (r["status"] == "ok" and r["method"] == method.name and r["rate"] == args.rate
                    and json.loads(r["params"]) == params and (r["seed"] == args.seed or not random)
                    and (not merging or r.get("lam") == args.lam)):
                metrics = r["metrics"]
                if merging:  # a merge point's metrics are per task: the exported head's task
                    metrics = list(metrics.values())[args.head]
                break
        if metrics is None:
            raise ValueError(f"{args.results} holds no finished point {method.label} at rate {args.rate:g}, seed "
                             f"{args.seed}" + (f", lambda {args.lam:g}" if merging else "") + ": run it first, or "
                             "drop --results.")
    common = dict(preset=args.preset, include=args.include or (), exclude=args.exclude or (), overwrite=args.force)
    if args.compact:
        if merging:
            raise ValueError("--compact stores one DARE-pruned fine-tune: pass exactly one FT.")
        path = export.save_compact_delta(args.base, args.fine_tunes[0], args.out, method=method.name, rate=args.rate,
                                         seed=args.seed, q=params.get("q"), **common)
    elif merging:
        path = export.export_merged(args.base, args.fine_tunes, args.out, method=method.name, rate=args.rate,
                                    seed=args.seed, lam=args.lam, params=params, head=args.head, metrics=metrics,
                                    **common)
    else:
        path = export.export_pruned(args.base, args.fine_tunes[0], args.out, method=method.name, rate=args.rate,
                                    seed=args.seed, params=params, metrics=metrics, **common)
    print(f"wrote {path}")
    if args.push_to_hub:
        print(f"pushed: {export.push_to_hub(path, args.push_to_hub)}")
    return 0


def _main_metric(df) -> str | None:
    """The metric the CLI tables show: accuracy when measured, else the first one; None when no point finished."""
    ok = df[df["status"] == "ok"] if len(df) else df
    if not len(ok):
        return None
    return "accuracy" if "accuracy" in set(ok["metric"]) else ok["metric"].iloc[0]


def _report_failed(df) -> int:
    """Print why points failed (exit 1), or return 0."""
    failed = df[df["status"] == "failed"] if len(df) else df
    if not len(failed):
        return 0
    reasons = failed.groupby("error")["key"].nunique().sort_values(ascending=False)
    print(f"deltakit: error: {failed['key'].nunique()} point(s) failed; finished points are kept and a rerun "
          "retries only the failed ones. Reasons:", file=sys.stderr)
    for error, n in reasons.items():
        print(f"  {n} x {error}", file=sys.stderr)
    return 1


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
    from deltakit.methods import merge_methods, sweep_methods
    from deltakit.spec import (DEFAULT_LAMBDAS, DEFAULT_MERGE_METHODS, DEFAULT_MERGE_RATES, DEFAULT_METHODS,
                               DEFAULT_PRESET, DEFAULT_RATES, DEFAULT_SEEDS)

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
    st.add_argument("--spectral", action="store_true",
                    help="also compute spectral statistics of every 2-D delta (stable / effective rank, top-k energy, "
                         "rank at 90%%/99%% energy, merged-LoRA-like low rank)")
    st.add_argument("--spectral-k", type=int, default=64, metavar="K",
                    help="top singular values for --spectral (default: 64)")
    st.add_argument("--stream", action="store_true",
                    help="read Hub models by HTTP range requests: download only their small files, never the "
                         "weights (local folders and family members are read from disk as always)")
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
    sw.add_argument("--task", help="evaluation data: glue/TASK, a dataset id, a parquet/csv/jsonl file (default: the "
                    "family member's own data); a decoder is scored by multiple choice, generation or perplexity "
                    "when the data has a 'choices', an 'answer' or only a 'text' column")
    sw.add_argument("--split", default="test", help="evaluation split (default: test)")
    sw.add_argument("--limit", type=int, help="evaluate on a seeded subset of this many examples")
    sw.add_argument("--out", default="deltakit-sweep", help="results folder (resumable)")
    sw.add_argument("--wait", action="store_true",
                    help="wait for another sweep writing to the same --out to finish instead of failing")
    sw.add_argument("--preset", default=DEFAULT_PRESET, help=f"prunable-set preset (default: {DEFAULT_PRESET}: "
                    "darex_decoder for a decoder LM, mergelm_encoder otherwise)")
    sw.add_argument("--include", action="append", help="regex a prunable tensor must match (repeatable)")
    sw.add_argument("--exclude", action="append", help="regex excluding tensors from the prunable set (repeatable)")
    sw.add_argument("--shared-rows", action="store_true",
                    help="when vocabularies differ, prune the shared rows (added rows keep fine-tuned values)")
    sw.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sw.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    sw.add_argument("--max-memory", metavar="SIZE",
                    help="memory budget, e.g. 5GB, 5GiB or cpu=32GB,cuda=20GB (default: 80%% of the available host "
                         "memory, 90%% of a CUDA device's free memory); the fastest memory tier that fits is used")
    sw.add_argument("--tier", choices=["resident", "host", "file"],
                    help="force a memory tier: resident (fastest), host (base and fine-tune in host memory, streamed "
                         "to the GPU), file (read per tensor from the checkpoint files); all give the same results")
    sw.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="run the points on Ray workers, one resident model each (pip install 'deltakit[ray]'); "
                         "ADDRESS attaches to a cluster (e.g. 10.0.0.5:6379); without it: the local cluster of "
                         "`ray start --head`, else a new local instance. Workers read their own tokens.")
    sw.add_argument("--workers", type=int, metavar="N",
                    help="with --ray: the number of workers (default: one per GPU for --device cuda, else one per "
                         "CPU of the cluster)")
    sw.set_defaults(func=_cmd_sweep)

    me = sub.add_parser("merge", help="merge 2-8 fine-tunes of one base over methods x rates x lambdas x seeds; "
                        "evaluate every task with its own head")
    me.add_argument("base")
    me.add_argument("fine_tunes", nargs="+", metavar="FT", help="2 to 8 fine-tunes of BASE (their order keys the masks)")
    me.add_argument("--methods", nargs="+", default=list(DEFAULT_MERGE_METHODS),
                    help=f"merge methods, NAME or NAME:KEY=VALUE,... (e.g. dare_ta:q=0.2); available: "
                         f"{', '.join(merge_methods())}")
    me.add_argument("--rates", nargs="+", type=float, default=list(DEFAULT_MERGE_RATES),
                    help="fraction of each delta dropped before combining (ta runs at rate 0 only)")
    me.add_argument("--lambdas", nargs="+", type=float, default=list(DEFAULT_LAMBDAS),
                    help="merge weights: merged = base + lambda * combined deltas")
    me.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    me.add_argument("--tasks", nargs="+", help="evaluation data per fine-tune (default: each member's own data)")
    me.add_argument("--split", default="test", help="evaluation split (default: test)")
    me.add_argument("--limit", type=int, help="evaluate each task on a seeded subset of this many examples")
    me.add_argument("--out", default="deltakit-merge", help="results folder (resumable) and index.html")
    me.add_argument("--wait", action="store_true", help="wait for another run writing to the same --out")
    me.add_argument("--preset", default=DEFAULT_PRESET, help=f"merged-set preset (default: {DEFAULT_PRESET})")
    me.add_argument("--include", action="append", help="regex a merged tensor must match (repeatable)")
    me.add_argument("--exclude", action="append", help="regex excluding tensors from merging (repeatable)")
    me.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    me.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    me.set_defaults(func=_cmd_merge)

    ex = sub.add_parser("export", help="write a pruned or merged model as a loadable Hub-style folder, or a compact "
                        "seeded delta; optionally push it to a Hub")
    ex.add_argument("base")
    ex.add_argument("fine_tunes", nargs="+", metavar="FT", help="one fine-tune (pruned) or 2-8 (merged)")
    ex.add_argument("--method", required=True, help="a pruning method (one FT) or a merge method (several), "
                    "NAME or NAME:KEY=VALUE,... e.g. darex_q:q=0.3")
    ex.add_argument("--rate", type=float, required=True, help="fraction of delta entries dropped")
    ex.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    ex.add_argument("--lam", type=float, default=1.0, help="merge weight lambda (merges only; default 1)")
    ex.add_argument("--head", type=int, default=0, help="merges: whose head (task) the exported model carries, by "
                    "the fine-tune's position (default 0)")
    ex.add_argument("--compact", action="store_true", help="write a compact seeded delta (kept values only; the "
                    "mask is regenerated from the seed on load): dare, drop_only or darex_q")
    ex.add_argument("--results", help="a sweep/merge results folder: record that point's measured metrics in the card")
    ex.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    ex.add_argument("--force", action="store_true", help="replace an existing folder")
    ex.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder with huggingface_hub (uses your "
                    "login; HF_ENDPOINT for another Hub)")
    ex.add_argument("--preset", default=DEFAULT_PRESET, help=f"prunable/merged-set preset (default: {DEFAULT_PRESET})")
    ex.add_argument("--include", action="append", help="regex a pruned tensor must match (repeatable)")
    ex.add_argument("--exclude", action="append", help="regex excluding tensors (repeatable)")
    ex.set_defaults(func=_cmd_export)

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
