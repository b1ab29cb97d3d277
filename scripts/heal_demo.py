"""docs/healing.md: heal the demo's three SmolLM2-135M exports with lora, last:K and full at one token budget.

    python scripts/heal_demo.py EXPORTS OUT [--samples 44] [--steps 10] [--batch-size 4] [--methods lora,last:4,full]

EXPORTS holds the demo's checkpoints drop8blocks, drop8attn, drop8mlp (``llmdrop drop smollm2-135m -o
EXPORTS/drop8attn --attn 8 --scores demo-out/scores.json``, likewise --mlp 8, --blocks 8). The script

1. samples the calibration text from the teacher once (OUT/teacher-samples.jsonl, what ``--calib self`` does in
   every ``llmdrop heal`` run; written once here so that the nine runs train on the very same tokens),
2. heals every export with every method: the same blocks, the same steps, the same held-out share,
3. measures perplexity on llmdrop's English sample, which no run trains on, before and after,

and writes OUT/results.json, the Markdown table of docs/healing.md and OUT/healing-loss.png.
"""

import argparse
import json
import time
from pathlib import Path

import llmdrop
from llmdrop.report import console
from llmdrop.source.calibration import CalibSpec, sample_self
from llmdrop.source.models import load_model

PLANS = ("drop8blocks", "drop8attn", "drop8mlp")


def teacher_samples(teacher, path: Path, samples: int, seq_len: int) -> None:
    """``samples`` rows of ``seq_len`` tokens sampled from the teacher (as ``--calib self``), saved as JSON lines.
    Decoding and re-tokenizing shifts a few token boundaries, so two extra rows keep the text long enough."""
    if path.is_file():
        return
    start = time.perf_counter()
    tokens = sample_self(teacher.model, teacher.tokenizer, samples=samples + 2, seq_len=seq_len, seed=0)
    texts = teacher.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    console.print(f"sampled {tokens.numel():,} tokens from the teacher in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("exports", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=44)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default="lora,last:4,full")
    parser.add_argument("--plans", default=",".join(PLANS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    teacher = load_model("smollm2-135m", dtype="float32")
    samples_path = args.out / "teacher-samples.jsonl"
    teacher_samples(teacher, samples_path, args.samples, args.seq_len)
    calib = CalibSpec(str(samples_path), args.samples, args.seq_len)
    if "base" not in results:
        results["base"] = llmdrop.evaluate(teacher, progress=False)["perplexity"]
    for plan in args.plans.split(","):
        export = args.exports / plan
        key = f"{plan} unhealed"
        if key not in results:
            results[key] = llmdrop.evaluate(str(export), progress=False)["perplexity"]
        for method in args.methods.split(","):
            key = f"{plan} {method}"
            if key in results:
                continue
            out = args.out / f"{plan}-{method.replace(':', '')}"
            entry = llmdrop.heal(
                str(export),
                out,
                teacher=teacher,
                train=method,
                calib=calib,
                steps=args.steps,
                batch_size=args.batch_size,
                overwrite=True,
            )
            entry["english_sample_perplexity"] = llmdrop.evaluate(str(out), progress=False)["perplexity"]
            results[key] = entry
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            h = entry["heldout"]
            console.print(
                f"{key}: {entry['tokens_seen']:,} tokens, {entry['cpu_seconds']:.0f} CPU s ({entry['seconds']:.0f} s); "
                f"held-out ppl {h['perplexity_before']:.2f} -> {h['perplexity_after']:.2f}; english_sample "
                f"{results[f'{plan} unhealed']:.2f} -> {entry['english_sample_perplexity']:.2f}"
            )
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    table(results, args)
    plot(results, args, args.out / "healing-loss.png")


def table(results: dict, args) -> None:
    methods = args.methods.split(",")
    lines = [
        "| model | unhealed | " + " | ".join(methods) + " |",
        "|---|--:|" + "--:|" * len(methods),
    ]
    for plan in args.plans.split(","):
        cells = []
        for m in methods:
            e = results.get(f"{plan} {m}")
            cells.append(
                f"{e['english_sample_perplexity']:.2f} ({e['heldout']['perplexity_after']:.2f}; "
                f"{e['cpu_seconds'] / 60:.1f} CPU min)"
                if e
                else "-"
            )
        lines.append(f"| {plan} | {results[f'{plan} unhealed']:.2f} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = args.plans.split(",")
    fig, axes = plt.subplots(1, len(plans), figsize=(4 * len(plans), 3.4), dpi=120, sharey=True)
    for ax, plan in zip(axes if len(plans) > 1 else [axes], plans):
        for m in args.methods.split(","):
            e = results.get(f"{plan} {m}")
            if e:
                losses = e["loss_curve"]
                (line,) = ax.plot(range(1, len(losses) + 1), losses, label=m)
                h = e["heldout"]
                ax.plot([0, len(losses)], [h["kl_before"], h["kl_after"]], "o", color=line.get_color(), alpha=0.6)
        ax.set_title(plan)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(teacher || student)")
    axes[0].legend(title="lines: training batches\ndots: held-out before/after", fontsize=8, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
