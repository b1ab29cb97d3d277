"""Re-run `--compensate linear` on the block plans recorded by compare_selectors.py, for several ridges.

    python scripts/compensation_ridge.py docs/selection-smollm2.json --ridges 0.1 --also 0,1 \
        --out docs/compensation-ridge-smollm2.json

The plans, calibration (llmdrop's English sample, 16 x 256 tokens) and held-out texts (12 x 512 tokens each) are
those of the comparison, so the numbers sit beside its rows: ridge 0 is the comparison's "+ linear" (plain least
squares). ``--also`` ridges run on the first plan only (the cosine plan), to show the curve.
"""

import argparse
import copy
import json
import time
from dataclasses import replace

from llmdrop.passes.evaluation import perplexity
from llmdrop.planning.compensate import compensate_linear
from llmdrop.planning.plan import DropPlan
from llmdrop.planning.surgery import apply_plan
from llmdrop.source.calibration import CalibSpec, load_texts, tokens_from_texts
from llmdrop.source.models import LoadSpec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison")
    p.add_argument("--ridges", default="0.1")
    p.add_argument("--also", default="", help="more ridges, on the first plan only")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    comparison = json.load(open(args.comparison))
    plans = []
    for row in comparison["rows_8_blocks"] + comparison["rows"]:
        if row.get("compensate") is None and row.get("plan", {}).get("blocks"):
            plans.append((f"{row['budget']}, {row['selector']}", row["plan"]))
    loaded = LoadSpec(comparison["model"], device="cpu").load()
    calib = comparison["calibration"]
    tokens = CalibSpec.of(CalibSpec(calib["source"], calib["samples"], calib["seq_len"])).tokens(
        loaded.tokenizer, loaded.model
    )
    held_out = {
        path: tokens_from_texts(
            load_texts(path), loaded.tokenizer, samples=None, seq_len=spec["seq_len"], purpose="evaluation"
        )[: spec["tokens"] // spec["seq_len"]]
        for path, spec in comparison["held_out"].items()
    }
    ridges = [float(r) for r in args.ridges.split(",")]
    also = [float(r) for r in args.also.split(",") if r]
    rows = []
    for i, (name, plan_dict) in enumerate(plans):
        plan = DropPlan(**plan_dict)
        for ridge in ridges + (also if i == 0 else []):
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            record, _ = compensate_linear(replace(loaded, model=model), plan, tokens, progress=False, ridge=ridge)
            seconds = time.perf_counter() - start
            apply_plan(model, loaded.adapter, plan)
            ppl = {
                path: round(perplexity(model, ids, progress=False)["perplexity"], 2) for path, ids in held_out.items()
            }
            rows.append(
                {
                    "plan": name,
                    "blocks": plan.blocks,
                    "ridge": ridge,
                    "perplexity": ppl,
                    "compensation_seconds": round(seconds, 1),
                    "runs": record["runs"],
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
            with open(args.out, "w") as f:
                json.dump({"comparison": args.comparison, "rows": rows}, f, indent=2)
                f.write("\n")
            del model


if __name__ == "__main__":
    main()
