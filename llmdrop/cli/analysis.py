"""`llmdrop act ...` (attention-sink calibration) and `llmdrop attnmap` (attention maps, logit lens)."""

import functools
from typing import Annotated, Optional

import typer

from .common import Json, Model, Seed, app, cli_errors, forward, model_options, print_json, require_out

# ---- analysis: act (attention-sink calibration) ----

act_app = typer.Typer(
    help="Attention-sink calibration (ACT): find the heads whose calibration helps a task, measure it, export it.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(act_app, name="act")

ActTask = Annotated[
    str,
    typer.Option(
        "--task",
        help="Multiple-choice JSONL ({prompt, choices, label} per line) [default: llmdrop's built-in act_mc.jsonl].",
        show_default=False,
    ),
]
ActSplit = Annotated[
    float, typer.Option("--split", help="Fraction of the items used for calibration (seeded); the rest is held out.")
]
ActNorm = Annotated[
    str, typer.Option("--norm", help="Choice score: sum (summed log-prob of its tokens) or mean (per token).")
]


def _default_task(task):
    from llmdrop.analysis.act import DEFAULT_TASK

    return task or str(DEFAULT_TASK)


@act_app.command("search")
@cli_errors
@model_options
def act_search_cmd(
    model: Model = None,
    out: Annotated[
        Optional[str],
        typer.Option("--out", "-o", help="heads.json to write (and resume from if it exists).", show_default=False),
    ] = None,
    task: ActTask = None,
    beta: Annotated[float, typer.Option(help="Factor on the attention paid to sinks.")] = 0.4,
    threshold: Annotated[
        float, typer.Option(help="Sink score (mean attention a key receives) above which a key is a sink.")
    ] = 0.1,
    layers: Annotated[
        Optional[str],
        typer.Option(help="Only these 0-based layers, e.g. 3,5,20-29 [default: all].", show_default=False),
    ] = None,
    max_heads: Annotated[
        Optional[int], typer.Option("--max-heads", help="Keep at most N heads (best gains first).", show_default=False)
    ] = None,
    greedy: Annotated[
        bool,
        typer.Option("--greedy", help="Then combine the kept heads greedily (best first, kept while accuracy rises)."),
    ] = False,
    split: ActSplit = 0.5,
    seed: Seed = 0,
    norm: ActNorm = "sum",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 16,
    json_out: Json = False,
):
    """Calibrate every (layer, head) alone on the task's calibration split and keep the heads that raise accuracy.

    Example: `llmdrop act search smollm2-135m --task mc.jsonl --out heads.json`
    """
    require_out(out, "file")
    from llmdrop.analysis.act import act_search
    from llmdrop.report import console

    r = forward(act_search, locals(), task=_default_task(task))
    if json_out:
        print_json(r)
    else:
        console.print(
            f"calibration accuracy {r['baseline']:.3f} -> {r['calibrated']:.3f} with {len(r['heads'])} heads "
            f"{r['heads']}\nwrote {out}"
        )


@act_app.command("eval")
@cli_errors
@model_options
def act_eval_cmd(
    model: Model = None,
    task: ActTask = None,
    heads: Annotated[
        Optional[str], typer.Option(help="heads.json from `llmdrop act search`.", show_default=False)
    ] = None,
    split: ActSplit = 0.5,
    seed: Seed = 0,
    norm: ActNorm = "sum",
    part: Annotated[str, typer.Option(help="heldout | calibration | all.")] = "heldout",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 16,
    json_out: Json = False,
):
    """Held-out accuracy without and with the calibrated heads.

    Example: `llmdrop act eval smollm2-135m --task mc.jsonl --heads heads.json`
    """
    from llmdrop.analysis.act import act_eval
    from llmdrop.report import console

    r = forward(act_eval, locals(), task=_default_task(task))
    if json_out:
        print_json(r)
    elif heads:
        console.print(
            f"{r['part']} accuracy ({r['items']} items): {r['baseline']:.3f} -> {r['calibrated']:.3f} "
            f"({r['gain']:+.3f}) with {len(r['heads'])} calibrated heads"
        )
    else:
        console.print(f"{r['part']} accuracy ({r['items']} items): {r['baseline']:.3f}")


@act_app.command("apply")
@cli_errors
@model_options
def act_apply_cmd(
    model: Model = None,
    heads: Annotated[str, typer.Option(help="heads.json from `llmdrop act search`.", show_default=False)] = ...,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Output checkpoint directory.", show_default=False)
    ] = None,
    attn_layers: Annotated[
        Optional[str], typer.Option("--attn-layers", help="Also drop these 0-based attention sublayers.")
    ] = None,
    mlp_layers: Annotated[
        Optional[str], typer.Option("--mlp-layers", help="Also drop these 0-based MLP sublayers.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json_out: Json = False,
):
    """Export MODEL (an llmdrop export keeps its drops) with the heads calibrated; loads with trust_remote_code=True.

    Example: `llmdrop act apply smollm2-135m --heads heads.json -o smollm2-act`
    """
    require_out(out, "directory")
    from llmdrop.analysis.act import act_apply
    from llmdrop.report import console

    path = forward(act_apply, locals(), dtype=model.dtype)
    if json_out:
        print_json({"out": str(path)})
    else:
        console.print(f"wrote {path}")


# ---- analysis: attnmap (attention maps with a logit lens) ----


@app.command("attnmap")
@cli_errors
@model_options
def attnmap_cmd(
    model: Model = None,
    prompt: Annotated[str, typer.Option(help="The prompt to generate from.", show_default=False)] = ...,
    out: Annotated[
        Optional[str],
        typer.Option("--out", "-o", help="Output directory (attn_{i}_{j}.png, attnmap.html).", show_default=False),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template (one user turn).")
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Greedy generation steps (stops early at EOS).")
    ] = 20,
    fmt: Annotated[str, typer.Option("--format", help="png, html or png,html.")] = "png,html",
    heads: Annotated[
        str, typer.Option(help="Reduce the heads of a layer: max, mean, or one 0-based head index.")
    ] = "max",
    window: Annotated[int, typer.Option(help="Tokens per PNG (and the viewer's initial width).")] = 32,
    stride: Annotated[int, typer.Option(help="Shift between successive PNG windows of a step.")] = 5,
    all_windows: Annotated[
        bool,
        typer.Option(
            "--all-windows/--last-window", help="PNGs of every window of a step, or only the one ending at the query."
        ),
    ] = True,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Logit-lens tokens kept per layer and position (the viewer's hover).")
    ] = 5,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json_out: Json = False,
):
    """Attention of every generated token to the previous ones, per layer, each cell labelled with the logit-lens
    token of that layer; PNGs and one self-contained HTML viewer.

    Example: `llmdrop attnmap smollm2-135m --prompt "Alice and Bob are siblings. Who is Bob's sister?" --chat -o attn`
    """
    require_out(out, "directory")
    from llmdrop.analysis.attnmaps import attnmap
    from llmdrop.report import console

    result = forward(attnmap, locals(), formats=fmt)
    result.pop("capture")
    if json_out:
        print_json(result, ensure_ascii=False)
        return
    say = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    say(
        f"generated {result['steps']} tokens after {result['prompt_tokens']} prompt tokens: "
        f"{result['generated_text']!r}"
    )
    pngs = sum(f.endswith(".png") for f in result["files"])
    say(f"wrote {pngs} PNGs{' and attnmap.html' if 'attnmap.html' in result['files'] else ''} to {result['out']}")
