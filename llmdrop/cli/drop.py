"""`llmdrop score` and `llmdrop drop`: how redundant each part is, and the drop itself."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmdrop.planning.selectors import SELECTORS

from .common import (
    BatchSize,
    DeviceMap,
    Json,
    Metric,
    Model,
    Overwrite,
    Stream,
    app,
    calib_options,
    cli_errors,
    forward,
    model_options,
    print_json,
)


@app.command("score")
@cli_errors
@model_options
@calib_options
def score_cmd(
    model: Model = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the scores JSON here.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG plot of the three importance curves.")] = None,
    metric: Metric = "cosine",
    batch_size: BatchSize = 1,
    stream: Stream = False,
    device_map: DeviceMap = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            "--nproc-per-node",
            help="Score on N processes of this machine (torchrun's --standalone launch, one GPU each when there are "
            "any); a failed rank ends in one error line and its exit code.",
        ),
    ] = 1,
    overwrite: Overwrite = False,
    json_out: Json = False,
    calib=None,
):
    """Score every attention sublayer, MLP sublayer and block (lower importance = more redundant).

    Example: `llmdrop score smollm2-135m --out scores.json --plot scores.png`

    Example: `llmdrop score ./Llama-3-70B --stream --calib wiki.txt -o scores.json` (one layer in memory at a time)

    Example: `llmdrop score ./Llama-3-70B --nproc-per-node 8 --calib wiki.txt -o scores.json` (each rank scores its
    share of the calibration blocks; rank 0 writes; `torchrun --nproc-per-node 8 -m llmdrop score ...` does the same
    and is how to run on several nodes)
    """
    from llmdrop import api
    from llmdrop.passes.distributed import is_main, launch, launched_by_torchrun
    from llmdrop.report import console, scores_table

    if nproc_per_node > 1 and not launched_by_torchrun():
        raise typer.Exit(launch(nproc_per_node, sys.argv[1:]))  # the ranks run this very command line
    scores = forward(api.score, locals())
    if not is_main():
        return
    if json_out:
        print_json(scores.to_dict())
    else:
        console.print(scores_table(scores))
        for path in (out, plot):
            if path:
                console.print(f"wrote {path}")


@app.command("drop")
@cli_errors
@model_options
@calib_options
def drop_cmd(
    model: Model = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Output checkpoint directory.", show_default=False)
    ] = None,
    attn: Annotated[int, typer.Option(help="Drop the N least important attention sublayers.")] = 0,
    mlp: Annotated[int, typer.Option(help="Drop the N least important MLP sublayers.")] = 0,
    blocks: Annotated[int, typer.Option(help="Drop the N least important whole blocks.")] = 0,
    joint: Annotated[int, typer.Option(help="Drop N sublayers, attention and MLP ranked together.")] = 0,
    attn_layers: Annotated[
        Optional[str], typer.Option("--attn-layers", help="Explicit 0-based attention layers, e.g. 3,5,20-29.")
    ] = None,
    mlp_layers: Annotated[Optional[str], typer.Option("--mlp-layers", help="Explicit 0-based MLP layers.")] = None,
    block_layers: Annotated[Optional[str], typer.Option("--block-layers", help="Explicit 0-based blocks.")] = None,
    scores: Annotated[
        Optional[str], typer.Option(help="Reuse a scores JSON from `llmdrop score` instead of scoring.")
    ] = None,
    force_scores: Annotated[
        bool,
        typer.Option(
            "--force-scores", help="Use --scores even if they record another model (e.g. the same checkpoint moved)."
        ),
    ] = False,
    iterative: Annotated[bool, typer.Option(help="Re-score after every single drop (in process).")] = False,
    selector: Annotated[
        str,
        typer.Option(
            "--select",
            help="How counted parts are chosen: "
            + "; ".join(f"{s.name}: {s.help}" for s in SELECTORS.values())
            + ". See docs/selection.md.",
        ),
    ] = "cosine",
    candidates: Annotated[
        Optional[int],
        typer.Option(
            help="--select loss: evaluate only the K lowest by cosine [default: twice the count].", show_default=False
        ),
    ] = None,
    loss_samples: Annotated[
        int, typer.Option("--loss-samples", help="--select loss: calibration blocks the loss is measured on.")
    ] = 8,
    compensate: Annotated[
        Optional[str],
        typer.Option(
            help="scale: scale the residual stream at each cut back to the magnitude the dropped parts gave it, "
            "folded into the later output projections (blocks and sublayers, every format, GGUF included). "
            "linear: fold a least-squares map for each dropped run of blocks into the layer before it (ReplaceMe). "
            "Both are fitted on --calib and add no tensor.",
            show_default=False,
        ),
    ] = None,
    compensate_ridge: Annotated[
        float,
        typer.Option(
            help="--compensate linear: shrink the map toward the plain drop by this much (relative to the mean "
            "diagonal of X^T X); 0 is ReplaceMe's plain least squares.",
        ),
    ] = 1.0,
    skip_attention_from: Annotated[
        Optional[int],
        typer.Option(
            "--skip-attention-from",
            help="Drop attention in layers K..L-1 (as `llmdrop probe --manipulation skip-attention` at K).",
            show_default=False,
        ),
    ] = None,
    metric: Metric = "cosine",
    batch_size: BatchSize = 1,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="Checkpoint format: auto (the first that can hold the plan: vanilla, nemotron-nas, llmdrop), "
            "vanilla (whole blocks only), nemotron-nas (served natively by vLLM; Llama family, not layer 0's "
            "attention), llmdrop (remote code, any plan) or gguf (a .gguf file for llama.cpp / Ollama: from a GGUF "
            "source with its tensors copied as stored, or from a Llama-family checkpoint; never chosen by auto).",
        ),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    stream: Stream = False,
    max_shard_size: Annotated[
        Optional[str],
        typer.Option(
            "--max-shard-size",
            help="Largest weight file of a streamed export, e.g. 5GB [default: transformers' save_pretrained default].",
            show_default=False,
        ),
    ] = None,
    device_map: DeviceMap = None,
    json_out: Json = False,
    calib=None,
):
    """Drop sublayers / blocks and export a checkpoint that loads with transformers (saved in the --dtype it loads in).

    Example: `llmdrop drop smollm2-135m -o smollm2-drop8attn --attn 8`
    """
    from llmdrop import api
    from llmdrop.planning.plan import DropPlan
    from llmdrop.report import console
    from llmdrop.request import DropRequest

    request = DropRequest.build(
        iterative=iterative,
        attn=attn,
        mlp=mlp,
        blocks=blocks,
        joint=joint,
        attn_layers=attn_layers,
        mlp_layers=mlp_layers,
        block_layers=block_layers,
        skip_attention_from=skip_attention_from,
        selector=selector,
        metric=metric,
        candidates=candidates,
        loss_samples=loss_samples,
        scores=scores,
        force_scores=force_scores,
        compensate=compensate,
        compensate_ridge=compensate_ridge,
        fmt=fmt,
        dtype=model.dtype,
        max_shard_size=max_shard_size,
        batch_size=batch_size,
    )
    record = api.drop(model, out, request, calib=calib, overwrite=overwrite, stream=stream, device_map=device_map)
    path, plan = Path(out), DropPlan(**record["plan"])
    exported = record["exported"]
    gone = record.get("already_dropped")
    if json_out:
        result = {"out": str(path), "plan": plan.to_dict(), "format": exported["format"]}
        print_json({**result, "already_dropped": gone} if gone else result)
    else:
        from llmdrop.planning.select import describe_records

        for line in describe_records(record.get("selection"), record.get("compensation")):
            console.print(line, soft_wrap=True)
        if gone:
            console.print(
                f"the source export had dropped attention {gone['attn']} and MLP {gone['mlp']} already (not chosen "
                "again; the numbers below are this run's)",
                soft_wrap=True,
            )
        why = f" ({'; '.join(exported['format_reason'])})" if exported.get("format_reason") else ""
        console.print(
            f"dropped {plan.describe()} (source layers: blocks {plan.blocks}, attn {plan.attn}, "
            f"mlp {plan.mlp})\n"
            + (
                "weights copied tensor by tensor from the source's safetensors files\n"
                if exported.get("streamed")
                else ""
            )
            + f"wrote {path} in the {exported['format']} format{why}",
            soft_wrap=True,
        )
