"""Compare the selectors (and linear compensation) at fixed budgets: held-out perplexity and selection time.

    python scripts/compare_selectors.py smollm2-135m --calib llmdrop/data/english_sample.txt --samples 16 \
        --seq-len 256 --eval /usr/share/common-licenses/GPL-3 --eval /usr/lib/python3.11/argparse.py \
        --out docs/selection-smollm2.json

The model is loaded once; every (budget, selector) works on a fresh copy with the functions ``llmdrop drop``
calls (``llmdrop.planning.select.choose``,
``llmdrop.planning.compensate.compensate_linear``), and the plan is applied in memory with the export's own code
(``llmdrop.planning.surgery.apply_plan``), so the perplexity is that of the exported model.
"""

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from llmdrop.passes.evaluation import perplexity
from llmdrop.passes.scoring import compute_importance
from llmdrop.planning.surgery import apply_plan
from llmdrop.request import choose
from llmdrop.source.calibration import CalibSpec, load_texts, tokens_from_texts
from llmdrop.source.models import LoadSpec

BUDGETS = {"8 blocks": {"blocks": 8}, "8 attention": {"attn": 8}, "12 sublayers": {"joint": 12}}
SELECTORS = ("cosine", "loss", "angular-contiguous", "reverse")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--calib", default="self")
    p.add_argument("--samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval", action="append", required=True, help="held-out text file (repeat)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=12)
    p.add_argument("--loss-samples", type=int, default=4)
    p.add_argument("--candidates", type=int, help="--select loss pre-filter [default: twice the count]")
    p.add_argument("--extra-candidates", type=int, help="--select loss pre-filter: the count plus this many")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--out", required=True)
    args = p.parse_args()

    loaded = LoadSpec(args.model, device="cpu").load()
    calib = CalibSpec.of(CalibSpec(args.calib, args.samples, args.seq_len))
    start = time.perf_counter()
    tokens = calib.tokens(loaded.tokenizer, loaded.model)
    calib_seconds = time.perf_counter() - start
    start = time.perf_counter()
    importance = compute_importance(loaded.model, loaded.adapter, tokens)
    score_seconds = time.perf_counter() - start
    held_out = {}
    for path in args.eval:
        ids = tokens_from_texts(
            load_texts(path), loaded.tokenizer, samples=None, seq_len=args.eval_seq_len, purpose="evaluation"
        )
        held_out[path] = ids[: args.eval_samples]

    def ppl(model):
        return {path: round(perplexity(model, ids, progress=False)["perplexity"], 2) for path, ids in held_out.items()}

    def save():  # after every row: an interrupted run keeps what it measured
        result = {
            "model": args.model,
            "calibration": calib.record(tokens),
            "calibration_seconds": round(calib_seconds, 1),
            "score_seconds": round(score_seconds, 1),
            "loss_samples": args.loss_samples,
            "candidates": args.candidates,
            "extra_candidates": args.extra_candidates,
            "importance": importance,
            "held_out": {path: {"tokens": ids.numel(), "seq_len": args.eval_seq_len} for path, ids in held_out.items()},
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    rows = [{"budget": "none", "selector": "base", "perplexity": ppl(loaded.model)}]
    print(rows[-1], flush=True)
    save()
    for budget in args.budgets.split(","):
        counts = BUDGETS[budget]
        for selector in SELECTORS:
            if selector == "angular-contiguous" and "blocks" not in counts:
                continue
            work = replace(loaded, model=copy.deepcopy(loaded.model))
            start = time.perf_counter()
            plan, record = choose(
                selector,
                work,
                tokens,
                importance=importance,
                **counts,
                loss_samples=args.loss_samples,
                candidates=args.candidates or (args.extra_candidates and sum(counts.values()) + args.extra_candidates),
                progress=False,
            )
            seconds = time.perf_counter() - start + (score_seconds if selector in ("cosine", "loss") else 0.0)
            variants = [None, "linear"] if plan.blocks else [None]
            for comp in variants:
                model = copy.deepcopy(work.model) if comp is None and len(variants) > 1 else work.model
                target = replace(work, model=model)
                comp_record = None
                if comp:
                    from llmdrop.planning.compensate import compensate_linear

                    comp_record, _ = compensate_linear(target, plan, tokens, progress=False)
                apply_plan(model, work.adapter, plan)
                row = {
                    "budget": budget,
                    "selector": selector,
                    "compensate": comp,
                    "plan": plan.to_dict(),
                    "selection_seconds": round(seconds, 1),
                    "forward_passes": record.get("forward_passes"),
                    "compensation": comp_record,
                    "perplexity": ppl(model),
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "compensation"}), flush=True)
                save()
                del model
            del work


if __name__ == "__main__":
    main()
