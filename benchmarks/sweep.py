"""Benchmark: deltakit's resident-model sweep vs a reload-per-point baseline (as MergeLM runs it), side by side.

Baseline, per point: load the fine-tune with ``from_pretrained``, apply DARE with ``torch.bernoulli`` to every
prunable tensor (base loaded once, outside the points), ``save_pretrained`` the pruned model, load it again,
evaluate. deltakit: one :class:`deltakit.resident.ResidentModel`; per point, rewrite the prunable tensors in place
and evaluate. Both evaluate with the same evaluator object on the same examples, so the comparison that matters
is the per-point *preparation* time (everything except the evaluation forward passes); the end-to-end time
(model loading included) is reported separately. One untimed warm-up (a model load and an evaluation) runs first.

    python benchmarks/sweep.py [--member sentiment3] [--rates 0.1 0.5 0.9 0.99] [--seeds 0 1] [--limit 200]

Last line: JSON with ``speedup_vs_reload`` (baseline / deltakit preparation time per point) and
``end_to_end_speedup``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from deltakit.demo import FULL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="minilm-tweets")
    parser.add_argument("--member", default="sentiment3")
    parser.add_argument("--rates", nargs="+", type=float, default=list(FULL.rates), help="default: the full demo grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--limit", type=int, default=200, help="test examples per evaluation")
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from deltakit.sources import resolve
    from deltakit.resident import ResidentModel
    from deltakit.sweep import default_evaluator

    base, ft = resolve(f"family:{args.family}/base"), resolve(f"family:{args.family}/{args.member}")
    tokenizer = AutoTokenizer.from_pretrained(ft.path, trust_remote_code=False)
    evaluator = default_evaluator(ft, tokenizer, task=None, split="test", limit=args.limit)
    points = [(r, s) for r in args.rates for s in args.seeds]
    # Warm-up, untimed and shared: transformers' lazy imports of the model classes and the first forward pass
    # would otherwise be charged to whichever side runs first.
    evaluator(AutoModelForSequenceClassification.from_pretrained(ft.path, trust_remote_code=False).eval())

    # -- deltakit -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    rm = ResidentModel(base, ft)
    load_dk = time.perf_counter() - t0
    prep_dk, eval_dk, acc_dk = [], [], []
    for rate, seed in points:
        t = time.perf_counter()
        rm.apply("dare", rate=rate, seed=seed)
        prep_dk.append(time.perf_counter() - t)
        t = time.perf_counter()
        acc_dk.append(evaluator(rm.model)["accuracy"])
        eval_dk.append(time.perf_counter() - t)
    total_dk = time.perf_counter() - t0
    prunable = [t.name for t in rm.targets]
    base_tensors = {t.name: t.base.clone() for t in rm.targets}
    del rm

    # -- reload per point (MergeLM style) -------------------------------------------------------------------
    t0 = time.perf_counter()
    prep_rl, eval_rl, acc_rl = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rate, seed in points:
            t = time.perf_counter()
            model = AutoModelForSequenceClassification.from_pretrained(ft.path, trust_remote_code=False)
            torch.manual_seed(seed)
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name in prunable:
                    p = params[name]
                    delta = p - base_tensors[name]
                    mask = torch.bernoulli(torch.full_like(delta, 1.0 - rate))
                    p.copy_(base_tensors[name] + delta * mask / (1.0 - rate))
            model.save_pretrained(tmp)
            model = AutoModelForSequenceClassification.from_pretrained(tmp, trust_remote_code=False)
            prep_rl.append(time.perf_counter() - t)
            t = time.perf_counter()
            acc_rl.append(evaluator(model)["accuracy"])
            eval_rl.append(time.perf_counter() - t)
    total_rl = time.perf_counter() - t0

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{len(points)} points (DARE, rates {args.rates}, seeds {args.seeds}), {args.limit} test examples each, "
          f"{sum(base_tensors[n].numel() for n in prunable):,} prunable parameters, {torch.get_num_threads()} threads")
    first = [i for i, (_, seed) in enumerate(points) if all(s != seed for _, s in points[:i])]
    print(f"deltakit: load {load_dk:.2f} s; per point prep {mean(prep_dk):.3f} s (a seed's first point, which makes "
          f"its mask numbers: {mean([prep_dk[i] for i in first]):.3f} s; the others: "
          f"{mean([p for i, p in enumerate(prep_dk) if i not in first] or [math.nan]):.3f} s), "
          f"eval {mean(eval_dk):.3f} s; total {total_dk:.2f} s")
    print(f"reload  : per point prep {mean(prep_rl):.3f} s, eval {mean(eval_rl):.3f} s; total {total_rl:.2f} s")
    print("accuracy deltakit:", [round(a, 4) for a in acc_dk])
    print("accuracy reload  :", [round(a, 4) for a in acc_rl])
    print(json.dumps({
        "speedup_vs_reload": round(mean(prep_rl) / mean(prep_dk), 2),
        "end_to_end_speedup": round(total_rl / total_dk, 2),
        "deltakit_prep_s": round(mean(prep_dk), 4), "reload_prep_s": round(mean(prep_rl), 4),
        "deltakit_total_s": round(total_dk, 2), "reload_total_s": round(total_rl, 2),
        "points": len(points), "eval_examples": args.limit,
    }))


if __name__ == "__main__":
    main()
