"""`make demo`: the paper's central claim on the builtin SmolLM2-135M, offline, on CPU.

Scores every part once (calibration text sampled from the model itself), then drops the 8 least
important attention sublayers, the 8 least important MLP sublayers and the 8 least important whole
blocks, exports each as a checkpoint, reloads it from disk and measures perplexity on the English
sample shipped with llmdrop. Outputs land in demo-out/.
"""

import copy
import sys
from pathlib import Path

from rich.table import Table

import llmdrop
from llmdrop.planning.plan import DropPlan
from llmdrop.report import console, scores_table
from llmdrop.source.models import load_model

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
N = 8


def main() -> None:
    OUT.mkdir(exist_ok=True)
    console.rule("1/3 load SmolLM2-135M (GGUF, dequantized) and score it")
    loaded = load_model()
    scores = llmdrop.score(loaded, out=OUT / "scores.json", plot=OUT / "scores.png")
    console.print(scores_table(scores))

    console.rule("2/3 drop and export")
    base = llmdrop.evaluate(loaded)
    exports = {}
    for kind in ("attn", "mlp", "blocks"):
        # the export consumes the model it is given: give it a copy, keep the original for the next one
        clone = copy.copy(loaded)
        clone.model = copy.deepcopy(loaded.model)
        path = OUT / f"smollm2-135m-drop{N}{kind}"
        record = llmdrop.drop(clone, out=path, scores=scores, overwrite=True, **{kind: N})
        plan = DropPlan(**record["plan"])
        exports[kind] = (path, plan)
        console.print(f"{kind}: dropped source layers {plan.attn or plan.mlp or plan.blocks} -> {path}")

    console.rule("3/3 reload each export from disk and measure perplexity")
    table = Table(title=f"SmolLM2-135M, perplexity on {Path(base['text']).name} ({base['tokens']:,} tokens)")
    for col in ("model", "dropped (0-based source layers)", "perplexity", "vs base"):
        table.add_column(col)
    table.add_row("base", "-", f"{base['perplexity']:.2f}", "")
    for kind, (path, plan) in exports.items():
        result = llmdrop.evaluate(str(path))
        ratio = result["perplexity"] / base["perplexity"]
        layers = plan.attn or plan.mlp or plan.blocks
        table.add_row(f"drop {N} {kind}", ",".join(map(str, layers)), f"{result['perplexity']:.2f}", f"x{ratio:.2f}")
    console.print(table)
    console.print(f"scores: {OUT / 'scores.json'}, plot: {OUT / 'scores.png'}, checkpoints: {OUT}/")


if __name__ == "__main__":
    main()
