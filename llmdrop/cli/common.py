"""The Typer app, the options several verbs share, the error handling and the one output sink (``print_json``) of
``llmdrop <verb>``; the verbs are registered by the modules of this package, by group."""

import contextlib
import functools
import inspect
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmdrop import __version__
from llmdrop.errors import LlmdropError

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
Metric = Annotated[
    str,
    typer.Option(
        help="cosine (1 - cos) or angular (arccos(cos) / pi) on calibration text, or gate-norm: attention sublayers "
        "only, from their query-key weights (no calibration text, no forward pass; experimental: on SmolLM2-135M its "
        "picks destroy the model, see docs/selection.md)."
    ),
]
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
        from llmdrop.source.models import LoadSpec

        return {**kwargs, "model": LoadSpec(kwargs.get("model"), **values)}

    return _with_options(fn, _LOAD_OPTIONS, build)


def calib_options(fn):
    """--calib/--samples/--seq-len/--seed, handed to the command as ``calib``, one CalibSpec."""

    def build(kwargs, values):
        from llmdrop.source.calibration import CalibSpec

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
    from llmdrop.passes.distributed import launched_by_torchrun

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
    from llmdrop.passes.distributed import launched_by_torchrun

    if launched_by_torchrun() and ctx.invoked_subcommand not in DISTRIBUTED_VERBS:
        _fail(
            f"llmdrop {ctx.invoked_subcommand} does not run under torchrun (only {', '.join(DISTRIBUTED_VERBS)} "
            "splits its work over the ranks): run it as one process"
        )


def forward(fn, options: dict, **values):
    """Call the api function ``fn`` with the command's options that are its parameters (same names, same meaning:
    the library-first rule), ``values`` replacing or adding some (a parsed list, a built default)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in {**options, **values}.items() if k in params})


def print_json(data, **kwargs) -> None:
    """The one way a verb prints its --json result: indented JSON on stdout (human output goes to stderr)."""
    typer.echo(json.dumps(data, indent=2, **kwargs))


def require_out(out, what: str = "directory") -> str:
    """A required -o/--out is checked alike in every verb: one error line (as ``drop`` / ``quantize`` / ``heal``
    give it), not typer's usage text."""
    if not out:
        raise LlmdropError(f"give an output {what} (-o OUT)")
    return out
