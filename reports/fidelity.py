"""Re-runnable fidelity report: each claim of the DARE / DAREx papers, measured on the minilm-tweets family.

    python reports/fidelity.py [--out reports] [--limit 500] [--seeds 0 1 2 3]

Writes ``reports/fidelity.md`` (the table, with seeds and 95% intervals, and a plain verdict per claim) and
``reports/fidelity-results.parquet`` (every sweep row). Sweep results are cached under ``reports/.fidelity-runs``
(resumable: a rerun only computes missing points). Claims (DARE, arXiv:2311.03099; DAREx, arXiv:2410.09344):

(a) SFT deltas are small: most entries below 0.005 (the standard members) -- "within 0.005" (MergeLM README).
(b) DARE keeps accuracy up to about 90% drop on an SFT fine-tune.
(c) DARE collapses at 99%, and DAREx-q (rescale 1/q, q searched on labelled validation data, or on the unlabelled
    output change) recovers.
(d) With large deltas (``sentiment3-hot``, a 10x larger learning rate) DARE fails earlier, and magnitude / WANDA-style pruning do better.
(e) A fine-tune trained with AdamR (delta-regularised, DAREx-L2) is more prunable by DARE at high rates.
(f) Merging: DARE before task arithmetic / TIES keeps each task's accuracy better than TA / TIES alone (merging
    ``sentiment3`` with ``topic``, a BBC-news topic classifier on the same base; each task keeps its own head).

(g) Decoders (the ``smollm2`` family: SmolLM2-135M-Instruct fine-tuned on arithmetic word problems, scored by
    greedy generation and exact match): DARE holds to about 90% on the SFT-sized member (``arith``), fails earlier on
    the hot one (``arith-hot``, a 25x larger learning rate), and DAREx-q recovers it.

``--only merge`` / ``--only decoder`` measures (f) / (g) alone and replaces that section of an existing
``fidelity.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from deltakit.families import get_family
from deltakit.merge import merge_sweep
from deltakit.spec import MergeSpec, RunOptions, SweepSpec
from deltakit.stats import delta_stats
from deltakit.summary import summarise
from deltakit.sweep import sweep

FAMILY = "minilm-tweets"


def _member(name: str) -> str:
    return f"family:{FAMILY}/{name}"


def _has_member(name: str) -> bool:
    return name in get_family(FAMILY).members


def _fmt(row: pd.Series) -> str:
    half = (row["hi"] - row["lo"]) / 2
    return f"{row['mean']:.3f} ± {half:.3f}" if row["n_seeds"] > 1 else f"{row['mean']:.3f}"


def main() -> None:
    global FAMILY
    parser = argparse.ArgumentParser(description="Measure the DARE/DAREx claims on minilm-tweets.")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--limit", type=int, default=500, help="test examples per evaluation (seeded subset)")
    parser.add_argument("--search-limit", type=int, default=200, help="validation examples per q-search step")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--family", default=FAMILY, help="tiny: a quick smoke run of the script itself")
    parser.add_argument("--only", choices=["merge", "decoder"],
                        help="measure section (f) or (g) alone; the others stay as they are")
    parser.add_argument("--decoder-family", default="smollm2", help="tiny-llm: a quick smoke run of section (g)")
    parser.add_argument("--decoder-limit", type=int, default=200, help="test problems per decoder evaluation")
    args = parser.parse_args()
    FAMILY = args.family
    base = _member("base")
    out = Path(args.out)
    runs = out / ".fidelity-runs"
    t0 = time.perf_counter()
    if args.only:
        heading, section = {"merge": (MERGE_HEADING, merge_section), "decoder": (DECODER_HEADING, decoder_section)}[
            args.only]
        lines = section(args, runs)
        report = out / "fidelity.md"
        report.write_text(_replace_section(report.read_text() if report.exists() else "", heading, lines))
        print("\n".join(lines))
        return
    members = ["sentiment3", "polarity", "sentiment3-hot"] + (["sentiment3-adamr"] if _has_member("sentiment3-adamr") else [])
    stats = delta_stats(base, [_member(m) for m in members], progress=True)
    common = dict(seeds=args.seeds, eval_limit=args.limit, search_limit=args.search_limit)
    darex = ["darex_q_labelled", "darex_q_unlabelled"]
    s3_rates = [0.5, 0.7, 0.9, 0.95, 0.99, 0.995, 0.999]  # past 0.99 to find where DARE collapses on small deltas
    hot_rates = [0.3, 0.5, 0.7, 0.9, 0.95, 0.99]
    plans = [  # (member, methods, rates); a member's sweeps share its results folder
        ("sentiment3", ["dare", *darex], s3_rates),
        ("sentiment3-hot", ["dare", "magnitude", "wanda"], hot_rates),
        ("sentiment3-hot", darex, [0.95, 0.99]),  # DAREx-q where DARE collapses on large deltas
    ]
    if "sentiment3-adamr" in members:
        plans.append(("sentiment3-adamr", ["dare"], s3_rates))
    frames = []
    for i, (member, methods, rates) in enumerate(plans):
        first = all(m != member for m, _, _ in plans[:i])  # reference rows once per member
        spec = SweepSpec(base, _member(member), methods=methods, rates=rates, references=first, **common)
        df = sweep(spec, RunOptions(out=runs / member))
        frames.append(df.assign(member=member))
    results = pd.concat(frames, ignore_index=True)
    results.assign(params=results["params"].astype(str)).to_parquet(out / "fidelity-results.parquet", index=False)
    swept = list(dict.fromkeys(m for m, _, _ in plans))
    curves = {m: summarise(results[results["member"] == m], "accuracy") for m in swept}

    def acc(member: str, label: str, rate: float) -> pd.Series:
        c = curves[member]
        return c[(c["label"] == label) & (c["rate"] == rate)].iloc[0]

    def ref(member: str, which: str) -> float:
        return float(curves[member][curves[member]["method"] == which]["mean"].iloc[0])

    lines = [
        f"# Fidelity report: DARE / DAREx claims on {FAMILY}",
        "",
        f"Measured by `python reports/fidelity.py --limit {args.limit} --seeds {' '.join(map(str, args.seeds))}` "
        f"on {_machine()}; this invocation took {time.perf_counter() - t0:.0f} s (points already stored under "
        f"`reports/.fidelity-runs` are reused, not recomputed). Accuracy on a fixed seeded subset of {args.limit} "
        f"test tweets; DAREx-q searches use {args.search_limit} validation tweets (never the test split). "
        f"Values are mean ± half-width of the Student-t 95% interval of the mean over mask seeds {args.seeds}.",
        "",
    ]
    ov = stats.overall.assign(model=stats.overall["model"].str.removeprefix(f"{FAMILY}/")).set_index("model")
    lines += ["## (a) SFT deltas are small", "", "| member | mean abs delta | max abs delta | fraction below 0.005 | fraction below 0.002 |",
              "|---|---|---|---|---|"]
    for m in members:
        r = ov.loc[m]
        lines.append(f"| {m} | {r['mean_abs']:.2e} | {r['max_abs']:.3g} | {r['frac_below_0.005']:.4f} | "
                     f"{r['frac_below_0.002']:.4f} |")
    s3 = ov.loc["sentiment3"]
    lr = {m: get_family(FAMILY).finetune(m).recipe.learning_rate for m in ("sentiment3", "sentiment3-hot")}
    lines += ["", f"Verdict: {'holds' if s3['frac_below_0.005'] > 0.99 else 'does not hold'} for the "
              f"lr {lr['sentiment3']:g} member ({s3['frac_below_0.005']:.2%} of entries below 0.005); the "
              f"lr {lr['sentiment3-hot']:g} member's mean |delta| is "
              f"{ov.loc['sentiment3-hot', 'mean_abs'] / s3['mean_abs']:.1f}x larger.", ""]

    ft3, base3 = ref("sentiment3", "finetuned"), ref("sentiment3", "base")
    lines += ["## (b) DARE keeps accuracy up to ~90% drop (sentiment3)", "",
              f"Fine-tune: {ft3:.3f}; base with the fine-tuned head: {base3:.3f}.", "", "| rate | DARE |", "|---|---|"]
    for rate in s3_rates:
        lines.append(f"| {rate} | {_fmt(acc('sentiment3', 'dare', rate))} |")
    d90 = acc("sentiment3", "dare", 0.9)
    lines += ["", f"Verdict: at 90% drop DARE is {d90['mean'] - ft3:+.3f} from the fine-tune: "
              f"{'holds (within 0.02)' if abs(d90['mean'] - ft3) <= 0.02 else 'does not hold (more than 0.02 away)'}.", ""]

    def first_drop(member: str, rates: list[float], ref_acc: float) -> float | None:
        """The first rate at which DARE loses more than 0.05 accuracy (None: none of the rates)."""
        return next((r for r in rates if acc(member, "dare", r)["mean"] < ref_acc - 0.05), None)

    fth = ref("sentiment3-hot", "finetuned")
    collapse = {"sentiment3": first_drop("sentiment3", s3_rates, ft3),
                "sentiment3-hot": first_drop("sentiment3-hot", hot_rates, fth)}
    lines += ["## (c) DARE collapses at 99%; DAREx-q recovers", "",
              "DAREx-q keeps DARE's mask and rescales by 1/q instead of 1/(1-rate). q is searched once per rate -- "
              "on labelled validation data with one fixed search mask, or on the unlabelled change of the last "
              "hidden states averaged over 4 masks -- and used with every evaluation seed's mask.", "",
              "| member | rate | DARE | DAREx-q labelled | q | DAREx-q unlabelled | q |", "|---|---|---|---|---|---|---|"]
    checks = [("sentiment3", r) for r in (0.99, 0.995, 0.999)] + [("sentiment3-hot", r) for r in (0.95, 0.99)]
    recovered = []
    for member, rate in checks:
        res = results[(results["member"] == member) & (results["rate"] == rate) & (results["metric"] == "accuracy")]
        cells = [_fmt(acc(member, "dare", rate))]
        for label in darex:
            cells += [_fmt(acc(member, label, rate)), f"{res[res['label'] == label]['q'].mean():.4f}"]
        lines.append(f"| {member} | {rate} | " + " | ".join(cells) + " |")
        d = acc(member, "dare", rate)
        best = max((acc(member, lab, rate) for lab in darex),
                   key=lambda r: r["mean"])
        if best["lo"] > d["hi"] and best["mean"] > d["mean"] + 0.02:
            recovered.append(f"{member} at {rate} ({d['mean']:.3f} -> {best['mean']:.3f})")
    lines += ["", "Verdict: DARE first loses more than 0.05 of the fine-tune's accuracy at rate "
              + "; ".join(f"{collapse[m] if collapse[m] is not None else 'none of those tested'} on {m}"
                          for m in collapse)
              + (". At 99% on sentiment3 it does not collapse" if collapse["sentiment3"] is None or
                 collapse["sentiment3"] > 0.99 else ". At 99% on sentiment3 it collapses")
              + ". DAREx-q beats DARE by more than 0.02 with separated 95% intervals at: "
              + (", ".join(recovered) if recovered else "none of these points") + ".", ""]

    lines += ["## (d) Large deltas: DARE fails earlier; magnitude / WANDA do better (sentiment3-hot)", "",
              f"Fine-tune: {fth:.3f}.", "", "| rate | DARE | magnitude | WANDA |", "|---|---|---|---|"]
    for rate in hot_rates:
        lines.append(f"| {rate} | " + " | ".join(_fmt(acc("sentiment3-hot", lab, rate))
                                                  for lab in ("dare", "magnitude", "wanda")) + " |")
    def beats_dare(r: float) -> bool:
        d = acc("sentiment3-hot", "dare", r)
        best = max(acc("sentiment3-hot", lab, r)["mean"] for lab in ("magnitude", "wanda"))
        return best > d["hi"] and best > d["mean"] + 0.01

    wins = [r for r in hot_rates if beats_dare(r)]
    earlier = collapse["sentiment3-hot"] is not None and (collapse["sentiment3"] is None
                                                          or collapse["sentiment3-hot"] < collapse["sentiment3"])
    lines += ["", f"Verdict: DARE fails {'earlier' if earlier else 'no earlier'} on the hot member (first loss above "
              f"0.05 at {collapse['sentiment3-hot']} vs {collapse['sentiment3']} on sentiment3); magnitude or WANDA "
              f"(one deterministic run each) lie above DARE's 95% interval and more than 0.01 above its mean at rates "
              f"{wins or 'none'}.", ""]

    if "sentiment3-adamr" in swept:
        fta = ref("sentiment3-adamr", "finetuned")
        lines += ["## (e) The AdamR (DAREx-L2) member is more prunable", "", f"Fine-tunes: sentiment3 {ft3:.3f}, "
                  f"sentiment3-adamr {fta:.3f}. Columns: DARE's accuracy minus its own fine-tune's.", "",
                  "| rate | sentiment3 | sentiment3-adamr |", "|---|---|---|"]
        for rate in s3_rates:
            lines.append(f"| {rate} | {acc('sentiment3', 'dare', rate)['mean'] - ft3:+.3f} | "
                         f"{acc('sentiment3-adamr', 'dare', rate)['mean'] - fta:+.3f} |")
        better = [r for r in s3_rates if acc("sentiment3-adamr", "dare", r)["mean"] - fta
                  > acc("sentiment3", "dare", r)["mean"] - ft3 + 0.02]
        lines += ["", "Verdict: the AdamR member keeps more than 0.02 more of its accuracy at rates "
                  f"{better or 'none'}" + (" (holds there)." if better else " (does not hold on this family)."), ""]
    else:
        lines += ["## (e) AdamR member", "", "Not measured: the family has no `sentiment3-adamr` member.", ""]
    lines += merge_section(args, runs)
    lines += decoder_section(args, runs)
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


MERGE_HEADING = "## (f) Merging"
MERGE_RATES = [0.5, 0.7, 0.9]  # MergeLM's DARE grid for GLUE merges is 0.1-0.9
MERGE_LAMBDAS = [0.5, 0.7, 1.0]


def merge_section(args: argparse.Namespace, runs: Path) -> list[str]:
    """Section (f): merge sentiment3 with topic by TA, TIES, DARE+TA, DARE+TIES; each task with its own head."""
    t0 = time.perf_counter()
    partner = "topic" if _has_member("topic") else "polarity"
    spec = MergeSpec(_member("base"), [_member("sentiment3"), _member(partner)], methods=["ta", "ties", "dare_ta",
                     "dare_ties"], rates=MERGE_RATES, lambdas=MERGE_LAMBDAS, seeds=args.seeds, eval_limit=args.limit)
    results = merge_sweep(spec, RunOptions(out=runs / f"merge-sentiment3-{partner}"))
    results.assign(params=results["params"].astype(str)).to_parquet(runs.parent / "fidelity-merge-results.parquet",
                                                                      index=False)
    data = summarise(results, "accuracy")
    tasks = ["sentiment3", partner]
    per_point = results.drop_duplicates("key")
    computed = float(per_point["prep_seconds"].fillna(0).sum() + per_point["eval_seconds"].fillna(0).sum())

    def cell(label: str, rate: float, lam: float, task: str) -> pd.Series:
        return data[(data["label"] == label) & (data["task"] == task) & (data["rate"] == rate)
                    & (data["lam"] == lam)].iloc[0]

    def ref(which: str, task: str) -> float:
        return float(data[(data["method"] == which) & (data["task"] == task)]["mean"].iloc[0])

    lines = [f"{MERGE_HEADING}: does DARE before TA / TIES keep each task's accuracy? (sentiment3 + {partner})", "",
             f"Measured by `python reports/fidelity.py --only merge --limit {args.limit} --seeds "
             f"{' '.join(map(str, args.seeds))}` on {_machine()}; this invocation took {time.perf_counter() - t0:.0f} s "
             f"(stored points are reused; the {len(spec.points())} points' own compute time, merging and evaluating, "
             f"is {computed:.0f} s). The two "
             f"fine-tunes of all-MiniLM-L6-v2 (`sentiment3`: 3-way tweet sentiment; `{partner}`) are merged on "
             "every tensor but the classifier heads (preset mergelm_encoder); the merged body is evaluated on each "
             f"task with that task's own head, on a fixed seeded subset of at most {args.limit} test examples per task "
             "(the topic test split holds 212). "
             "DARE's masks are drawn per fine-tune (its own Philox key); intervals are Student-t 95% over mask "
             f"seeds {args.seeds} (TA and TIES are deterministic: one run). lambda is compared at equal values, "
             "with no selection on the test split.", "",
             "References: " + "; ".join(f"{t}: fine-tune alone {ref('finetuned', t):.3f}, base with its head "
                                        f"{ref('base', t):.3f}" for t in tasks) + ".", "",
             "| lambda | method | rate | " + " | ".join(tasks) + " | mean |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
    verdicts = []
    for lam in MERGE_LAMBDAS:
        rows = [("ta", 0.0)] + [(m, r) for m in ("ties", "dare_ta", "dare_ties") for r in MERGE_RATES]
        for label, rate in rows:
            cells = [cell(label, rate, lam, t) for t in tasks]
            lines.append(f"| {lam:g} | {label} | {rate:g} | " + " | ".join(_fmt(c) for c in cells)
                         + f" | {sum(c['mean'] for c in cells) / len(cells):.3f} |")
        for dare, plain, plain_rate in (("dare_ta", "ta", None), ("dare_ties", "ties", "same")):
            for rate in MERGE_RATES:
                pr = 0.0 if plain_rate is None else rate
                for t in tasks:
                    d, p = cell(dare, rate, lam, t), cell(plain, pr, lam, t)
                    verdicts.append(dict(lam=lam, pair=f"{dare} vs {plain}", rate=rate, task=t,
                                         better=d["lo"] > p["mean"], worse=d["hi"] < p["mean"], diff=d["mean"] - p["mean"]))
    v = pd.DataFrame(verdicts)
    summary = v.groupby("pair").agg(points=("diff", "size"), better=("better", "sum"), worse=("worse", "sum"),
                                    mean_diff=("diff", "mean"))
    lines += ["", "Paired comparison (every lambda, rate and task; TA has no rate, so DARE+TA at each rate is compared "
              "with TA at the same lambda; DARE+TIES with TIES at the same rate and lambda). 'better' / 'worse': "
              "DARE's whole 95% interval lies above / below the plain method's value.", "",
              "| comparison | points | DARE better | DARE worse | mean difference |", "|---|---|---|---|---|"]
    for pair, r in summary.iterrows():
        lines.append(f"| {pair} | {int(r['points'])} | {int(r['better'])} | {int(r['worse'])} | {r['mean_diff']:+.3f} |")
    parts = []
    for pair, r in summary.iterrows():
        if r["better"] >= r["points"] / 3 and r["mean_diff"] > 0.005:
            what = "DARE helps"
        elif r["worse"] >= r["points"] / 3 and r["mean_diff"] < -0.005:
            what = "DARE hurts"
        else:
            what = "no difference beyond the intervals: DARE drops that much of each delta at no measurable cost"
        parts.append(f"{pair}: better at {int(r['better'])}, worse at {int(r['worse'])} of {int(r['points'])} "
                     f"points, mean difference {r['mean_diff']:+.3f} ({what})")
    holds = summary["worse"].sum() <= 1 and summary["mean_diff"].min() > -0.01
    lines += ["", f"Verdict: {'holds' if holds else 'does not hold'} on this pair (DARE before merging keeps each "
              "task's accuracy at least as well as the plain merge): " + "; ".join(parts) + ".", ""]
    return lines


def _replace_section(report: str, heading: str, lines: list[str]) -> str:
    """``report`` with the section that starts with ``heading`` (up to the next ``## (`` heading) replaced by
    ``lines``, or with ``lines`` appended when it has no such section."""
    before, found, rest = report.partition(heading)
    after = rest[rest.find("\n## (") + 1:] if found and "\n## (" in rest else ""
    parts = [before.rstrip("\n"), "\n".join(lines).rstrip("\n"), after.rstrip("\n")]
    return "\n\n".join(p for p in parts if p) + "\n"


DECODER_HEADING = "## (g) Decoders"
DECODER_RATES = [0.5, 0.7, 0.9, 0.95, 0.99]


def decoder_section(args: argparse.Namespace, runs: Path) -> list[str]:
    """Section (g): DARE, DAREx-q (labelled search) and magnitude on the decoder family's arithmetic members."""
    t0 = time.perf_counter()
    family = args.decoder_family

    def member(name: str) -> str:
        return f"family:{family}/{name}"

    stats = delta_stats(member("base"), [member("arith"), member("arith-hot")], progress=True)
    ov = stats.overall.assign(model=stats.overall["model"].str.removeprefix(f"{family}/")).set_index("model")
    curves, frames = {}, []
    for name in ("arith", "arith-hot"):
        spec = SweepSpec(member("base"), member(name), methods=["dare", "darex_q_labelled", "magnitude"],
                         rates=DECODER_RATES, seeds=args.seeds, eval_limit=args.decoder_limit,
                         search_limit=min(args.search_limit, 100))
        df = sweep(spec, RunOptions(out=runs / f"{family}-{name}")).assign(member=name)
        frames.append(df)
        curves[name] = summarise(df, "exact_match")
    results = pd.concat(frames, ignore_index=True)
    results.assign(params=results["params"].astype(str)).to_parquet(
        runs.parent / "fidelity-decoder-results.parquet", index=False)
    per_point = results.drop_duplicates("key")
    computed = float(per_point["prep_seconds"].fillna(0).sum() + per_point["eval_seconds"].fillna(0).sum())

    def em(name: str, label: str, rate: float) -> pd.Series:
        c = curves[name]
        return c[(c["label"] == label) & (c["rate"] == rate)].iloc[0]

    def ref(name: str, which: str) -> float:
        return float(curves[name][curves[name]["method"] == which]["mean"].iloc[0])

    lr = {m: get_family(family).finetune(m).recipe.learning_rate for m in ("arith", "arith-hot")}
    lines = [f"{DECODER_HEADING}: DARE on an SFT-sized and a hot fine-tune of a real decoder ({family})", "",
             f"Measured by `python reports/fidelity.py --only decoder --seeds {' '.join(map(str, args.seeds))}` on "
             f"{_machine()}; this invocation took {time.perf_counter() - t0:.0f} s (stored points are reused; the "
             f"points' own compute time, q searches and generation, is {computed:.0f} s). Members: full fine-tunes "
             f"of the family's base on one-step arithmetic word problems at learning rate {lr['arith']:g} (`arith`) "
             f"and {lr['arith-hot']:g} (`arith-hot`). Metric: exact match of the first integer of a greedy generation "
             f"(at most 5 new tokens, stopped at a newline) on a fixed seeded subset of {args.decoder_limit} test "
             "problems; attention and MLP weights are pruned (preset darex_decoder: embeddings, norms and the tied "
             f"head keep their fine-tuned values); DAREx-q's q is searched on {min(args.search_limit, 100)} "
             "validation problems. Values are mean ± half-width of the Student-t 95% interval over mask seeds "
             f"{args.seeds} (magnitude is deterministic: one run).", "",
             "| member | mean abs delta | fraction below 0.005 | fine-tune | base |", "|---|---|---|---|---|"]
    for name in ("arith", "arith-hot"):
        r = ov.loc[name]
        lines.append(f"| {name} | {r['mean_abs']:.2e} | {r['frac_below_0.005']:.4f} | {ref(name, 'finetuned'):.3f} "
                     f"| {ref(name, 'base'):.3f} |")
    lines += ["", "| member | rate | DARE | DAREx-q labelled | q | magnitude |", "|---|---|---|---|---|---|"]
    for name in ("arith", "arith-hot"):
        res = results[(results["member"] == name) & (results["metric"] == "exact_match")]
        for rate in DECODER_RATES:
            q = res[(res["label"] == "darex_q_labelled") & (res["rate"] == rate)]["q"].mean()
            lines.append(f"| {name} | {rate} | {_fmt(em(name, 'dare', rate))} | "
                         f"{_fmt(em(name, 'darex_q_labelled', rate))} | {q:.3f} | {_fmt(em(name, 'magnitude', rate))} |")

    def first_drop(name: str) -> float | None:
        """The first rate at which DARE keeps less than 90% of the fine-tune's exact match (None: none)."""
        return next((r for r in DECODER_RATES if em(name, "dare", r)["mean"] < 0.9 * ref(name, "finetuned")), None)

    drops = {name: first_drop(name) for name in ("arith", "arith-hot")}
    holds_90 = drops["arith"] is None or drops["arith"] > 0.9
    earlier = drops["arith-hot"] is not None and (drops["arith"] is None or drops["arith-hot"] < drops["arith"])
    recovered = [f"{name} at {rate} ({em(name, 'dare', rate)['mean']:.3f} -> "
                 f"{em(name, 'darex_q_labelled', rate)['mean']:.3f})"
                 for name in ("arith", "arith-hot") for rate in DECODER_RATES
                 if em(name, "darex_q_labelled", rate)["lo"] > em(name, "dare", rate)["hi"]
                 and em(name, "darex_q_labelled", rate)["mean"] > em(name, "dare", rate)["mean"] + 0.02]
    def at(rate: float | None) -> str:
        return f"at rate {rate}" if rate is not None else f"at none of the rates tested (up to {DECODER_RATES[-1]})"

    lines += ["", "Verdicts (DARE 'holds' at a rate while it keeps at least 90% of its fine-tune's exact match): "
              f"on the SFT-sized member DARE first falls below that {at(drops['arith'])} -- "
              f"{'holds to 90%' if holds_90 else 'does not hold to 90%'}; on the hot member {at(drops['arith-hot'])} "
              f"-- {'fails earlier' if earlier else 'does not fail earlier'}. DAREx-q beats DARE "
              "by more than 0.02 with separated 95% intervals at: " + (", ".join(recovered) if recovered else
                                                                       "none of these points") + ".", ""]
    return lines


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
