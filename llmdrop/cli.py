"""`llmdrop <verb>`: thin Typer commands over llmdrop.api. Errors are one line on stderr (traceback with --debug)."""

import contextlib
import functools
import inspect
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import LlmdropError
from .selectors import SELECTORS

app = typer.Typer(
    help="Find redundant attention / MLP sublayers and blocks in decoder LLMs, drop them, export checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# Options shared by several verbs.
Model = Annotated[
    Optional[str],
    typer.Argument(
        help="Hub id, local checkpoint dir, .gguf file, or builtin alias smollm2-135m (default).", show_default=False
    ),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda (auto picks CUDA when present).")]
Dtype = Annotated[
    str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: the checkpoint's; GGUF: float32).")
]
GgufFile = Annotated[Optional[str], typer.Option("--gguf-file", help="GGUF file name inside MODEL (a directory).")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow custom code of non-llmdrop checkpoints.")]
Calib = Annotated[
    str,
    typer.Option(
        help="Calibration text: self (sampled from the model, offline), a .txt/.jsonl/.json/.parquet file or "
        "directory, or hf:NAME[:CONFIG][:SPLIT]."
    ),
]
Samples = Annotated[
    Optional[int], typer.Option(help="Calibration blocks [default: 32 for self, 128 otherwise].", show_default=False)
]
SeqLen = Annotated[
    Optional[int],
    typer.Option("--seq-len", help="Tokens per block [default: 256 for self, 2048 otherwise].", show_default=False),
]
Seed = Annotated[int, typer.Option(help="Seed for sampling and block selection.")]
Metric = Annotated[str, typer.Option(help="cosine (1 - cos) or angular (arccos(cos) / pi).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Blocks per forward pass.")]
Stream = Annotated[
    bool,
    typer.Option(
        "--stream",
        help="Score one decoder layer at a time, read from the safetensors files (models larger than memory; "
        "needs --calib text, not self).",
    ),
]
DeviceMap = Annotated[
    Optional[str],
    typer.Option(
        "--device-map",
        help="Spread one model in memory over several GPUs: auto (accelerate's big-model loading); replaces --device.",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option(help="Replace the outputs if they exist.")]

# `llmdrop --debug VERB ...` (or LLMDROP_DEBUG=1): the traceback instead of one error line.
_state = {"debug": bool(os.environ.get("LLMDROP_DEBUG"))}

# The options of "which model and how to load it", added to every command that loads one (see model_options).
_LOAD_OPTIONS = [
    ("device", Device, "auto"),
    ("dtype", Dtype, "auto"),
    ("gguf_file", GgufFile, None),
    ("trust_remote_code", TrustRemote, False),
]
_CALIB_OPTIONS = [("calib", Calib, "self"), ("samples", Samples, None), ("seq_len", SeqLen, None), ("seed", Seed, 0)]


def _with_options(fn, options, build):
    """Append ``options`` to ``fn``'s CLI signature; the wrapper turns their values into one object (``build``)."""
    sig = inspect.signature(fn)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in options
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name, _, _ in options}
        return fn(*args, **build(kwargs, values))

    names = {name for name, _, _ in options}
    kept = [p for p in sig.parameters.values() if p.name not in names]  # e.g. `calib=None`: the built object
    wrapper.__signature__ = sig.replace(parameters=[*kept, *extra])
    return wrapper


def model_options(fn):
    """--device/--dtype/--gguf-file/--trust-remote-code, handed to the command as ``model``, one LoadSpec."""

    def build(kwargs, values):
        from .models import LoadSpec

        return {**kwargs, "model": LoadSpec(kwargs.get("model"), **values)}

    return _with_options(fn, _LOAD_OPTIONS, build)


def calib_options(fn):
    """--calib/--samples/--seq-len/--seed, handed to the command as ``calib``, one CalibSpec."""

    def build(kwargs, values):
        from .data import CalibSpec

        return {**kwargs, "calib": CalibSpec(values.pop("calib"), **values)}

    return _with_options(fn, _CALIB_OPTIONS, build)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, job schedulers, container stops), handled like Ctrl-C: temporary folders are removed
    and nothing half-written is left."""


def _on_sigterm(signum, frame):
    raise Terminated


def _fail(message: str, code: int = 1) -> None:
    """One error line, from rank 0 only under torchrun (every rank meets the same bad input); torchrun's own report
    of the failed ranks shows it too (TORCHELASTIC_ERROR_FILE) instead of a link to enable tracebacks."""
    from .distributed import launched_by_torchrun

    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"error: {message}", err=True)
        if launched_by_torchrun() and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            info = {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}  # torch's own format
            error = {"message": f"llmdrop: {message}", "extraInfo": info}
            with contextlib.suppress(OSError):
                Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps({"message": error}))
    raise typer.Exit(code)


def cli_errors(fn):
    """One clear line and exit 1 for user errors; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Terminated:
            _fail("terminated (SIGTERM); nothing was written", 128 + signal.SIGTERM)
        except KeyboardInterrupt:
            _fail("interrupted")
        except Exception as e:  # noqa: BLE001 - anything else is reported the same way, with a hint
            if _state["debug"]:
                raise
            hint = " (rerun as `llmdrop --debug ...` for the traceback)"
            _fail(str(e) if isinstance(e, LlmdropError) else f"{type(e).__name__}: {e}{hint}")

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"llmdrop {__version__}")
        raise typer.Exit()


# The verbs that split their work over torchrun's ranks; the others would only run N times over, each rank writing.
DISTRIBUTED_VERBS = ("score",)


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback on errors (also LLMDROP_DEBUG=1).")
    ] = False,
):
    if debug:
        _state["debug"] = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    from .distributed import launched_by_torchrun

    if launched_by_torchrun() and ctx.invoked_subcommand not in DISTRIBUTED_VERBS:
        _fail(
            f"llmdrop {ctx.invoked_subcommand} does not run under torchrun (only {', '.join(DISTRIBUTED_VERBS)} "
            "splits its work over the ranks): run it as one process"
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
    from . import api
    from .distributed import is_main, launch, launched_by_torchrun
    from .report import console, scores_table

    if nproc_per_node > 1 and not launched_by_torchrun():
        raise typer.Exit(launch(nproc_per_node, sys.argv[1:]))  # the ranks run this very command line
    scores = api.score(
        model,
        calib=calib,
        metric=metric,
        batch_size=batch_size,
        out=out,
        plot=plot,
        stream=stream,
        device_map=device_map,
        overwrite=overwrite,
    )
    if not is_main():
        return
    if json_out:
        typer.echo(json.dumps(scores.to_dict(), indent=2))
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
            help="linear: fold a least-squares map for each dropped run of blocks into the layer before it "
            "(ReplaceMe; the export stays vanilla).",
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
            "attention) or llmdrop (remote code, any plan).",
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
    from . import api
    from .plan import DropPlan
    from .report import console
    from .request import DropRequest

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
        typer.echo(json.dumps({**result, "already_dropped": gone} if gone else result, indent=2))
    else:
        from .select import describe_records

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
    from . import api
    from .report import console

    result = api.evaluate(
        model,
        text=text,
        seq_len=seq_len,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        save=save,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        include_path=include_path,
    )
    saved = result.pop("saved_to", None)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
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
    from .quantize import quantize
    from .report import console

    result = quantize(
        model,
        out,
        method=method,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        observer=observer,
        calib=calib,
        overwrite=overwrite,
        verbose=verbose,
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2))
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
    from . import api
    from .report import console

    result = api.heal(
        model,
        out,
        teacher=teacher,
        train=train,
        rank=rank,
        steps=steps,
        lr=lr,
        temperature=temperature,
        calib=calib,
        eval_split=eval_split,
        batch_size=batch_size,
        grad_accum=grad_accum,
        gradient_checkpointing=gradient_checkpointing,
        overwrite=overwrite,
    )
    if json_out:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))
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
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8",
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
            help="transformers (eager forward + KV cache loop) or vllm (its offline API, one engine process per "
            "model; exports must be nemotron-nas or vanilla; random weights use vLLM's dummy loading)."
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
    """
    from .bench import parse_int_list, print_table
    from .benchmark import bench
    from .report import console

    report = bench(
        models,
        random_weights=random_weights,
        prompt_lens=parse_int_list(prompt_lens, "--prompt-lens"),
        gen_len=gen_len,
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        repeats=repeats,
        warmup=warmup,
        device=device,
        dtype=dtype,
        seed=seed,
        memory=memory,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        engine=engine,
        out=out,
        plot=plot,
        markdown=markdown,
        overwrite=overwrite,
    )
    if json_out:
        typer.echo(json.dumps(report, indent=2))
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
    from .hub import push
    from .report import console

    result = push(
        folder, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run, token=token
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2))
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

    from .probing import harmless_from, probe
    from .report import console

    result = probe(
        model,
        manipulation=manipulation,
        task=task,
        layers=layers,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        out=out,
        plot=plot,
        overwrite=overwrite,
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2))
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

    from .probing import followed_until, inject
    from .report import console

    def unescape(text):  # shells make "\n" hard to type
        return text.replace("\\n", "\n") if text is not None else None

    result = inject(
        model,
        prompt=unescape(prompt),
        word=word,
        donor=unescape(donor),
        donor_word=donor_word,
        watch=watch,
        task=task,
        layers=layers,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        out=out,
        plot=plot,
        overwrite=overwrite,
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2))
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
    from .act import DEFAULT_TASK

    return task or str(DEFAULT_TASK)


@act_app.command("search")
@cli_errors
@model_options
def act_search_cmd(
    model: Model = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="heads.json to write (and resume from if it exists).", show_default=False)
    ] = ...,
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
    from .act import act_search
    from .report import console

    r = act_search(
        model,
        task=_default_task(task),
        out=out,
        beta=beta,
        threshold=threshold,
        layers=layers,
        max_heads=max_heads,
        greedy=greedy,
        split=split,
        seed=seed,
        norm=norm,
        batch_size=batch_size,
    )
    if json_out:
        typer.echo(json.dumps(r, indent=2))
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
    from .act import act_eval
    from .report import console

    r = act_eval(
        model,
        task=_default_task(task),
        heads=heads,
        split=split,
        seed=seed,
        norm=norm,
        part=part,
        batch_size=batch_size,
    )
    if json_out:
        typer.echo(json.dumps(r, indent=2))
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
    out: Annotated[str, typer.Option("--out", "-o", help="Output checkpoint directory.", show_default=False)] = ...,
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
    from .act import act_apply
    from .report import console

    path = act_apply(
        model,
        heads=heads,
        out=out,
        attn_layers=attn_layers,
        mlp_layers=mlp_layers,
        dtype=model.dtype,
        overwrite=overwrite,
    )
    if json_out:
        typer.echo(json.dumps({"out": str(path)}, indent=2))
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
        str, typer.Option("--out", "-o", help="Output directory (attn_{i}_{j}.png, attnmap.html).", show_default=False)
    ] = ...,
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
    from .attnmaps import attnmap
    from .report import console

    result = attnmap(
        model,
        prompt=prompt,
        out=out,
        chat=chat,
        max_new_tokens=max_new_tokens,
        formats=fmt,
        heads=heads,
        window=window,
        stride=stride,
        all_windows=all_windows,
        top_k=top_k,
        overwrite=overwrite,
    )
    result.pop("capture")
    if json_out:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    say = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    say(
        f"generated {result['steps']} tokens after {result['prompt_tokens']} prompt tokens: "
        f"{result['generated_text']!r}"
    )
    pngs = sum(f.endswith(".png") for f in result["files"])
    say(f"wrote {pngs} PNGs{' and attnmap.html' if 'attnmap.html' in result['files'] else ''} to {result['out']}")


if __name__ == "__main__":
    sys.exit(app())
