"""`llmdrop bench` and `llmdrop push`: speed on an engine, and the Hub."""

import functools
from typing import Annotated, Optional

import typer

from .common import Device, GgufFile, Json, Overwrite, TrustRemote, app, cli_errors, forward, print_json


@app.command("bench")
@cli_errors
def bench_cmd(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL",
            help="Checkpoints to compare (Hub id, dir, .gguf, smollm2-135m); the first is the baseline. With --random-"
            "weights: variants base, attn:N, mlp:N, blocks:N (the N last layers) or lists like attn:16-31, joined"
            " with + (attn:8+blocks:2).",
            show_default=False,
        ),
    ],
    random_weights: Annotated[
        Optional[str],
        typer.Option(
            "--random-weights",
            help="Benchmark this architecture at real size with random weights: builtin shape (tiny, llama-1b, "
            "llama-2-7b, llama-3-8b, mistral-7b, qwen2.5-7b), a config.json or a checkpoint dir.",
        ),
    ] = None,
    prompt_lens: Annotated[
        str, typer.Option("--prompt-lens", help="Comma-separated prompt lengths (random tokens, no padding).")
    ] = "128,512,2048",
    gen_len: Annotated[
        int, typer.Option("--gen-len", help="Decode steps per run (one token each, KV cache fed back).")
    ] = 128,
    batch_sizes: Annotated[
        Optional[str],
        typer.Option(
            "--batch-sizes", help="Comma-separated batch sizes [default: 1,8; llama.cpp: 1].", show_default=False
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per model and setting (median, min-max reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed full runs per model and setting first.")] = 2,
    device: Device = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto | float32 | bfloat16 | float16 (auto: checkpoints keep theirs; random weights: bfloat16 on "
            "CUDA, float32 on CPU)."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for prompts and random weights.")] = 0,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure peak memory (CPU: one child process per model).")
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="transformers (eager forward + KV cache loop), vllm (its offline API, one engine process per "
            "model; exports must be nemotron-nas or vanilla; random weights use vLLM's dummy loading) or llama.cpp "
            "(llama-cpp-python on GGUF files, e.g. `drop --format gguf` exports; one sequence, flash attention)."
        ),
    ] = "transformers",
    out: Annotated[
        Optional[str],
        typer.Option(
            "--out",
            "-o",
            help="Write every raw sample and the summary as JSON here (e.g. DIR/bench_results.json for the model "
            "card).",
        ),
    ] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG of throughput against prompt length.")] = None,
    markdown: Annotated[Optional[str], typer.Option(help="Write the table as Markdown here.")] = None,
    overwrite: Overwrite = False,
    gguf_file: GgufFile = None,
    trust_remote_code: TrustRemote = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the JSON report on stdout instead of the table.")
    ] = False,
):
    """Prefill / decode throughput, time to first token, peak memory and KV-cache bytes per token, against the
    first model, with the theoretical speedup bound beside each measured speedup.

    Example: `llmdrop bench smollm2-135m ./smollm2-drop8attn --prompt-lens 128,512 -o bench.json`

    Example: `llmdrop bench --random-weights llama-3-8b base attn:16 blocks:8 --plot bench.png`

    Example: `llmdrop bench --engine vllm --random-weights llama-3-8b base attn:16 blocks:8`

    Example: `llmdrop bench --engine llama.cpp smollm2-135m ./drop8attn-gguf --prompt-lens 128`
    """
    from llmdrop.report import console
    from llmdrop.serving.benchmark import bench
    from llmdrop.serving.speed import parse_int_list, print_table

    report = forward(
        bench,
        locals(),
        prompt_lens=parse_int_list(prompt_lens, "--prompt-lens"),
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes else None,
    )
    if json_out:
        print_json(report)
        return
    print_table(report, console)
    for path in (out, plot, markdown):
        if path:
            console.print(f"wrote {path}")


@app.command("push")
@cli_errors
def push_cmd(
    folder: Annotated[
        str,
        typer.Argument(
            metavar="DIR", help="Checkpoint directory to upload (e.g. from `llmdrop drop`).", show_default=False
        ),
    ],
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Hub model repo NAMESPACE/NAME; created if missing.", show_default=False)
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        Optional[str],
        typer.Option(help="Branch to commit to (created from main if missing) [default: main].", show_default=False),
    ] = None,
    commit_message: Annotated[
        Optional[str],
        typer.Option(
            "--commit-message", help="Commit message [default: Upload DIR with llmdrop VERSION].", show_default=False
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files and the commit; no network, nothing written.")
    ] = False,
    token: Annotated[
        Optional[str],
        typer.Option(
            help="Hub token with write access [default: $HF_TOKEN, else the `hf auth login` one].", show_default=False
        ),
    ] = None,
    json_out: Json = False,
):
    """Upload a checkpoint directory to the Hugging Face Hub in one commit (the model card is refreshed first).

    Example: `llmdrop push smollm2-drop8attn --repo-id me/SmolLM2-135M-drop8attn --dry-run`
    """
    from llmdrop.report import console
    from llmdrop.serving.hub import push

    result = forward(push, locals())
    if json_out:
        print_json(result)
        return
    n, size = len(result["files"]), result["total_bytes"]
    visibility = "private" if private else "public"
    card = {
        "refreshed": "README.md: model card refreshed from llmdrop.json",
        "created": "README.md: model card created from llmdrop.json",
        "unchanged": "README.md: model card up to date",
        "kept": "README.md: kept as is (not written by llmdrop)",
        "no-record": "README.md: kept as is (no llmdrop.json)",
    }[result["card"]]
    say = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    if dry_run:
        say(
            f"dry run: would push {n} files ({size:,} bytes) to {result['repo_id']} (revision {result['revision']}, "
            f"{visibility} if created) in one commit: {result['commit_message']!r}"
        )
        for f in result["files"]:
            say(f"  {f['size']:>15,}  {f['path']}")
    else:
        say(
            f"pushed {n} files ({size:,} bytes) to {result['repo_id']} (revision {result['revision']}) in commit "
            f"{result['commit']}"
        )
    say(card)
    typer.echo(result["url"])
