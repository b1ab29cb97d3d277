"""`llmdrop probe` and `llmdrop inject`: the Attend First manipulations."""

from typing import Annotated, Optional

import typer

from .common import Json, Model, Overwrite, Seed, app, cli_errors, forward, model_options, print_json

# ---- analysis: probe / inject (Attend First) ----

Layers = Annotated[
    Optional[str],
    typer.Option(help="0-based layers k to manipulate, e.g. 0-29 or 4,8,12 [default: all].", show_default=False),
]


@app.command("probe")
@cli_errors
@model_options
def probe_cmd(
    model: Model = None,
    manipulation: Annotated[
        str, typer.Option(help="freeze | random | shuffle | skip-attention | all (comma lists too).")
    ] = "all",
    task: Annotated[
        str, typer.Option(help='capitals (built in) or a JSONL file of {"prompt", "answer"}.')
    ] = "capitals",
    layers: Layers = None,
    samples: Annotated[
        Optional[int], typer.Option(help="Use a seeded subset of N prompts [default: all].", show_default=False)
    ] = None,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 32,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write the accuracy / gold log-prob plot (PNG) here.")] = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
):
    """Manipulate the previous tokens from each layer k on and measure task accuracy (Attend First, Fig. 2).

    Example: `llmdrop probe smollm2-135m --manipulation all --task capitals --out probe.json --plot probe.png`
    """
    from rich.table import Table

    from llmdrop.analysis.probing import harmless_from, probe
    from llmdrop.report import console

    result = forward(probe, locals())
    if json_out:
        print_json(result)
        return
    kinds = list(dict.fromkeys(r["manipulation"] for r in result["results"]))
    table = Table(
        title=f"{result['model']} on {result['task']} ({result['samples']} prompts): accuracy / gold log-prob; "
        f"baseline {result['baseline']['accuracy']:.2f} / {result['baseline']['gold_logprob']:.2f}"
    )
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    cell = {
        (r["manipulation"], r["layer"]): f"{r['accuracy']:.2f} / {r['gold_logprob']:.2f}" for r in result["results"]
    }
    for layer in sorted({r["layer"] for r in result["results"]}):
        table.add_row(str(layer), *(cell.get((k, layer), "") for k in kinds))
    console.print(table)
    for kind in kinds:
        k = harmless_from(result, kind)
        console.print(f"{kind}: within 90% of baseline accuracy from layer {k if k is not None else '- (never)'} on")
    for path in (out, plot):
        if path:
            console.print(f"wrote {path}")


@app.command("inject")
@cli_errors
@model_options
def inject_cmd(
    model: Model = None,
    prompt: Annotated[Optional[str], typer.Option(help="The prompt whose word is replaced.")] = None,
    word: Annotated[
        Optional[str], typer.Option(help="The word in PROMPT (all its whole-word occurrences are replaced).")
    ] = None,
    donor: Annotated[Optional[str], typer.Option(help="The donor prompt.")] = None,
    donor_word: Annotated[
        Optional[str], typer.Option("--donor-word", help="The word in DONOR whose states are injected.")
    ] = None,
    watch: Annotated[
        Optional[str], typer.Option(help="Comma-separated answers whose log-probs are reported, e.g. Paris,Rome.")
    ] = None,
    task: Annotated[
        Optional[str], typer.Option(help="capitals: swap every country with another and count who follows.")
    ] = None,
    layers: Layers = None,
    samples: Annotated[
        Optional[int], typer.Option(help="--task: use a seeded subset of N countries.", show_default=False)
    ] = None,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 32,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG plot here.")] = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
):
    """Inject a donor word's hidden state into a prompt at each layer k and see whether the model follows.

    Example: `llmdrop inject smollm2-135m --prompt "Q: What is the capital of France?\\nA:" --word France
    --donor "Q: What is the capital of Italy?\\nA:" --donor-word Italy --watch Paris,Rome`
    """
    from rich.table import Table

    from llmdrop.analysis.probing import followed_until, inject
    from llmdrop.report import console

    def unescape(text):  # shells make "\n" hard to type
        return text.replace("\\n", "\n") if text is not None else None

    result = forward(inject, locals(), prompt=unescape(prompt), donor=unescape(donor))
    if json_out:
        print_json(result)
        return
    capitals = result.get("task") == "capitals"
    table = Table(
        title=f"{result['model']}: injection per layer" + (f" ({result['pairs']} capital swaps)" if capitals else "")
    )
    for col in (
        ["layer", "top token"]
        + ([*("follow", "keep", "other")] if capitals else [])
        + [f"log p({w})" for w in result["watch"]]
    ):
        table.add_column(col, justify="right")
    for r in [{"layer": "none", **result["baseline"]}] + result["layers"]:
        extra = [f"{r[k]:.2f}" for k in ("follow", "keep", "other")] if capitals else []
        table.add_row(
            str(r["layer"]), repr(r["top_token"]), *extra, *(f"{r['watch_logprobs'][w]:.3f}" for w in result["watch"])
        )
    console.print(table)
    if capitals:
        k = followed_until(result)
        console.print(
            "the injection is followed by at least half of the prompts up to layer "
            f"{k if k is not None else '- (never)'}"
        )
    for path in (out, plot):
        if path:
            console.print(f"wrote {path}")
