"""`llmdrop eval`, `llmdrop quantize`, `llmdrop heal`: what is done with an export."""

from typing import Annotated, Optional

import typer

from .common import BatchSize, Json, Model, Seed, app, calib_options, cli_errors, forward, model_options, print_json


@app.command("eval")
@cli_errors
@model_options
def eval_cmd(
    model: Model = None,
    text: Annotated[
        Optional[str],
        typer.Option(
            help="Text file(s) (.txt/.jsonl/.json/.parquet or a directory) [default: the English sample shipped with "
            "llmdrop].",
            show_default=False,
        ),
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option(
            "--seq-len", help="Tokens per block [default: 512, or the model's positions if fewer].", show_default=False
        ),
    ] = None,
    samples: Annotated[
        Optional[int],
        typer.Option(help="Use only this many blocks (seeded choice) [default: all].", show_default=False),
    ] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 1,
    save: Annotated[
        bool,
        typer.Option(
            "--save",
            help="Also record the result in MODEL/eval_results.json (MODEL must be a local directory); `llmdrop push` "
            "puts it in the model card.",
        ),
    ] = False,
    tasks: Annotated[
        Optional[str],
        typer.Option(
            help="Run lm-evaluation-harness tasks instead of perplexity: NAME[,NAME...] (lm-eval's own, e.g. boolq, or "
            "the bundled offline llmdrop_mc, llmdrop_capitals). Needs `pip install 'llmdrop[eval]'`.",
            show_default=False,
        ),
    ] = None,
    num_fewshot: Annotated[
        Optional[int],
        typer.Option(
            "--num-fewshot", help="With --tasks: few-shot examples [default: each task's own].", show_default=False
        ),
    ] = None,
    limit: Annotated[
        Optional[float],
        typer.Option(
            help="With --tasks: documents per task (or a fraction below 1) [default: all].", show_default=False
        ),
    ] = None,
    include_path: Annotated[
        Optional[str],
        typer.Option(
            "--include-path", help="With --tasks: a folder of your own lm-eval task YAMLs.", show_default=False
        ),
    ] = None,
    json_out: Json = False,
):
    """Perplexity on text (non-overlapping blocks), or lm-evaluation-harness tasks with --tasks. llmdrop exports load
    their remote code on their own.

    Example: `llmdrop eval smollm2-drop8attn --text wiki.txt --json`

    Example: `llmdrop eval ./smollm2-drop8attn --tasks llmdrop_mc,llmdrop_capitals --save` (then `llmdrop push` shows
    perplexity and task results in the model card)
    """
    from llmdrop import api
    from llmdrop.report import console

    result = forward(api.evaluate, locals())
    saved = result.pop("saved_to", None)
    if json_out:
        print_json(result)
    elif tasks is not None:
        for r in result["tasks"]:
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in r["metrics"].items() if "_stderr" not in k and isinstance(v, (int, float))
            )
            console.print(f"{r['task']}: {shown} ({r['samples']} samples, {r['num_fewshot']}-shot)", soft_wrap=True)
        if saved:
            console.print(f"wrote {saved}", soft_wrap=True)
    else:
        console.print(
            f"perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens "
            f"({result['samples']} x {result['seq_len']}) of {result['text']}"
        )
        if saved:
            console.print(f"wrote {saved}", soft_wrap=True)


@app.command("quantize")
@cli_errors
@model_options
@calib_options
def quantize_cmd(
    model: Annotated[
        Optional[str],
        typer.Argument(
            metavar="SRC",
            help="Checkpoint to quantize: an llmdrop export, local dir, Hub id, .gguf file, or builtin alias "
            "smollm2-135m (default).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Output checkpoint directory.", show_default=False)
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="gptq (symmetric groups) or awq (activation-aware scaling, groups with zero points).",
            show_default=False,
        ),
    ] = ...,
    bits: Annotated[int, typer.Option(help="Weight bits: 4 or 8.")] = 4,
    group_size: Annotated[
        Optional[int],
        typer.Option(
            "--group-size",
            help="Weights sharing one scale; must divide every quantized layer's input size [default: the largest of "
            "128, 64, 32 that does (vLLM's Marlin kernels)].",
            show_default=False,
        ),
    ] = None,
    symmetric: Annotated[
        Optional[bool],
        typer.Option(
            "--symmetric/--asymmetric",
            help="Scales only, or scales and zero points [default: symmetric for gptq, asymmetric for awq].",
            show_default=False,
        ),
    ] = None,
    observer: Annotated[
        str,
        typer.Option(
            help="Group scales from the min/max or the least-squared-error clipping: auto | minmax | mse (auto: mse "
            "for gptq, minmax for awq)."
        ),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show llm-compressor's own log (INFO and per-layer error metrics, on stdout)."),
    ] = False,
    json_out: Json = False,
    calib=None,
):
    """Quantize weights to 4 / 8 bits with llm-compressor (GPTQ or AWQ) into a compressed-tensors checkpoint
    that transformers loads and vLLM serves. Needs `pip install 'llmdrop[quant]'`.

    Example: `llmdrop quantize smollm2-drop8attn -o smollm2-drop8attn-gptq --method gptq --group-size 64`
    """
    from llmdrop.checkpoints.quantization import quantize
    from llmdrop.report import console

    result = forward(quantize, locals())
    if json_out:
        print_json(result)
    else:
        c = result["calibration"]
        console.print(
            f"quantized {result['quantized_modules']} Linear layers with {result['method'].upper()} "
            f"({result['scheme']}, group size {result['group_size']}, {result['observer']} scales; "
            f"calibration {c['samples']} x "
            f"{c['seq_len']} tokens) in {result['seconds']:.0f} s; weights {result['weights_bytes'] / 2**20:.1f} MiB"
            f"\nwrote {result['out']}"
        )


@app.command("heal")
@cli_errors
@model_options
@calib_options
def heal_cmd(
    model: Annotated[
        Optional[str],
        typer.Argument(
            metavar="EXPORT",
            help="The llmdrop export to heal (the student): a checkpoint directory.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Output checkpoint directory.", show_default=False)
    ] = None,
    teacher: Annotated[
        Optional[str],
        typer.Option(
            help="The teacher [default: the source model recorded in EXPORT/llmdrop.json].", show_default=False
        ),
    ] = None,
    train: Annotated[
        str,
        typer.Option(
            help="What trains: lora (adapters on the kept attention / MLP projections, merged when saving; needs "
            "llmdrop[heal]), last:K (the last K layers and the final norm) or full."
        ),
    ] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 2 x rank).")] = 8,
    steps: Annotated[
        Optional[int],
        typer.Option(help="Optimizer steps [default: one pass over the training blocks].", show_default=False),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(help="Peak learning rate [default: 1e-3 lora, 2e-4 last:K, 5e-5 full].", show_default=False),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the distillation loss.")] = 1.0,
    eval_split: Annotated[
        float, typer.Option("--eval-split", help="Share of the calibration blocks held out (never trained on).")
    ] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per forward pass.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Forward passes per optimizer step.")] = 1,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass (less memory, about a third more compute).",
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json_out: Json = False,
    calib=None,
):
    """Win back what a drop cost: distil the source model (teacher) into the export (student), KL divergence of
    their next-token distributions on calibration text; writes a checkpoint in the export's own format.

    Example: `llmdrop heal smollm2-drop8blocks -o smollm2-drop8blocks-healed --samples 64 --steps 40`

    Example: `llmdrop heal smollm2-drop8attn -o healed --train lora --rank 16 --calib wiki.txt --seq-len 512`
    """
    from llmdrop import api
    from llmdrop.report import console

    result = forward(api.heal, locals(), student=model)
    if json_out:
        print_json({k: v for k, v in result.items() if k != "loss_curve"})
    else:
        h = result["heldout"]
        ppl = (
            f"; held-out perplexity {h['perplexity_before']:.2f} -> {h['perplexity_after']:.2f} (teacher "
            f"{h['teacher_perplexity']:.2f}, {h['tokens']:,} tokens)"
            if h["samples"]
            else ""
        )
        console.print(
            f"healed with {result['method']} ({result['trainable_parameters']:,} parameters trained): "
            f"{result['steps']} steps, {result['tokens_seen']:,} tokens, {result['seconds']:.0f} s; loss "
            f"{result['loss_start']:.4f} -> {result['loss_end']:.4f}{ppl}\nwrote {result['out']}",
            soft_wrap=True,
        )
