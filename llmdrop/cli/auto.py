"""`llmdrop auto`: the fastest plan within a quality budget, or the best quality within a speed / KV-cache budget."""

from typing import Annotated, Optional

import typer

from .common import Model, Overwrite, app, cli_errors, model_options, print_json


@app.command("auto")
@cli_errors
@model_options
def auto_cmd(
    model: Model = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Output directory (the export and its report).")
    ] = None,
    max_loss_increase: Annotated[
        Optional[str],
        typer.Option(
            "--max-loss-increase",
            help="Target: the fastest plan whose perplexity (held-out rows) is at most this much above the source's: "
            "10% or 0.1.",
            show_default=False,
        ),
    ] = None,
    speedup: Annotated[
        Optional[str],
        typer.Option(
            "--speedup",
            help="Target: the best quality at least this many times faster (1.3) on --engine.",
            show_default=False,
        ),
    ] = None,
    kv_cache: Annotated[
        Optional[str],
        typer.Option(
            "--kv-cache",
            help="Target: the best quality with at most this much of the KV cache: 60% or 0.6.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Where speed is measured and what the export is for: transformers, vllm (nemotron-nas export) or "
            "llama.cpp (GGUF export). Not installed: the analytic decode bound stands in, and the report says so.",
        ),
    ] = "transformers",
    workload: Annotated[
        Optional[str],
        typer.Option(
            help="One request: prefill=N,decode=N,batch=N [default: prefill=128,decode=128,batch=1].",
            show_default=False,
        ),
    ] = None,
    calib: Annotated[
        str,
        typer.Option(
            help="Calibration text: self (sampled from the model), or a file / folder; cut into --seq-len rows that "
            "are split into search, verify and test rows."
        ),
    ] = "self",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration row.")] = 256,
    search_rows: Annotated[int, typer.Option(help="Rows the single-part losses are measured on.")] = 8,
    verify_rows: Annotated[int, typer.Option(help="Rows every proposed plan is verified on (never search rows).")] = 6,
    test_rows: Annotated[int, typer.Option(help="Rows only the chosen plan is measured on, for the report.")] = 4,
    candidates: Annotated[
        int, typer.Option(help="Parts measured per kind (attention, MLP, block): the lowest by cosine importance.")
    ] = 16,
    verify: Annotated[int, typer.Option(help="Plans from the exact additive optimum to verify.")] = 6,
    refine: Annotated[int, typer.Option(help="Verifications the local refinement may spend (0: none).")] = 24,
    bench_plans: Annotated[int, typer.Option(help="Verified plans whose speed is measured on the engine.")] = 6,
    bench_repeats: Annotated[int, typer.Option(help="Timed runs per model in every engine measurement.")] = 5,
    eval_texts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--eval", help="A held-out text file the chosen plan is also measured on (repeat).", show_default=False
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the calibration rows and their split.")] = 0,
    remeasure: Annotated[
        bool, typer.Option("--remeasure", help="Measure the cost model again instead of reading the cache.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Search and report; export nothing.")] = False,
    overwrite: Overwrite = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
):
    """The fastest model within a quality budget (or the best quality within a speed / KV budget) on your engine.

    Example: `llmdrop auto smollm2-135m -o out --speedup 1.3 --engine llama.cpp`
    """
    from llmdrop import api
    from llmdrop.report import console

    def say(line: str) -> None:
        console.print(line, soft_wrap=True, highlight=False, markup=False)

    report = api.auto(
        model,
        out,
        speedup=speedup,
        max_loss_increase=max_loss_increase,
        kv_cache=kv_cache,
        engine=engine,
        workload=workload,
        calib=calib,
        seq_len=seq_len,
        search_rows=search_rows,
        verify_rows=verify_rows,
        test_rows=test_rows,
        candidates=candidates,
        verify=verify,
        refine=refine,
        bench_plans=bench_plans,
        bench_repeats=bench_repeats,
        eval_texts=eval_texts or [],
        seed=seed,
        remeasure=remeasure,
        dry_run=dry_run,
        overwrite=overwrite,
        say=say,
    )
    if json_out:
        print_json(report)
    elif not dry_run:
        say(f"wrote {out} in the {report['chosen']['format']} format, with auto.json, auto.md and auto.png")
