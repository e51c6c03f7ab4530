"""The ``deltakit`` command line: a thin layer over the library (every subcommand is one library call).

    deltakit family list
    deltakit family build [NAME ...]
    deltakit stats BASE FT [FT ...] [--out DIR] [--json]
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

    stats = delta_stats(
        args.base, args.fine_tunes, preset=args.preset, include=args.include, exclude=args.exclude,
        shared_rows=args.shared_rows, device=args.device, allow_pickle=args.allow_pickle, progress=not args.json,
    )
    if args.out:
        stats.save(args.out)
    if args.json:
        print(json.dumps(stats.to_json(), default=str))
    else:
        print(stats.summary())
        if args.out:
            print(f"wrote {args.out}/{{tensors,layers,kinds,overall,similarity,histograms,pairing}}.parquet")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltakit",
        description="What did fine-tuning change, and how much of it can be thrown away? "
        "Model references: org/name[@revision], a local directory, or family:FAMILY/MEMBER.",
    )
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
    st.add_argument("--preset", default="mergelm_encoder", help="prunable-set preset (default: mergelm_encoder)")
    st.add_argument("--include", action="append", help="regex a prunable tensor must match (repeatable)")
    st.add_argument("--exclude", action="append", help="regex excluding tensors from the prunable set (repeatable)")
    st.add_argument("--shared-rows", action="store_true", help="compare shared leading rows when vocab sizes differ")
    st.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the Triton statistics kernel)")
    st.add_argument("--allow-pickle", action="store_true", help="accept pickled weights (unsafe for untrusted models)")
    st.set_defaults(func=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (errors print one clear line to stderr and return 2)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"deltakit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
