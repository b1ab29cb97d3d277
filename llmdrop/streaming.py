"""The layer-streamed runner: score a model one decoder layer at a time, read from its safetensors files.

The model is a skeleton on the meta device (``from_pretrained(device_map="meta")``: config, classes, names and
shapes, no weight read). What comes before the first layer runs through the model's own ``forward``: its
embedding (Gemma's scaling included), rotary embedding, position ids and causal / sliding-window masks. A
stand-in replaces every decoder layer and records what the model hands it, so each layer later gets exactly the
arguments (the mask of its own attention type, its position embeddings) it would get in a whole-model pass.
Then, for each layer in turn, only that layer's tensors are read onto the device, every calibration batch goes
through it with the scoring collector's hooks on (``scoring.hook_layer``, the same sums as in memory), and the
layer is freed. Hidden states between layers wait on the CPU in the model's dtype, one batch at a time on the
device.

Peak device memory: one layer (or the embedding, which is freed before the first layer is read) plus one batch's
activations. Peak host memory: the calibration activations (samples x seq_len x hidden in the model's dtype) plus
one layer (or the embedding).

Weights stored in another layout than the one transformers runs (Mixtral's per-expert matrices, fused on load by
transformers' conversion mapping) are converted here, per layer (``_from_disk_layout``).
"""

import time
from pathlib import Path

import torch
from torch import nn

from .arch import absent_parts
from .distributed import all_reduce
from .errors import LlmdropError
from .models import (
    LoadedModel,
    LoadSpec,
    check_hub_source,
    is_llmdrop_export,
    load_error,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from .scoring import METRICS, Similarity, batch_starts, hook_layer
from .stream_export import DISK_MODULE_NAMES, safetensors_files, stored_tensors


class _Stop(Exception):
    """Raised by the last layer's stand-in: nothing after the layers is needed."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its input and its arguments, passes the input on."""

    def __init__(self, index: int, last: bool, layer: nn.Module, record: dict):
        super().__init__()
        self.index, self.last, self.record = index, last, record
        for name in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):  # what forwards read off layers
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.record["hidden"] = hidden_states
        self.record.setdefault("layers", []).append((args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def check_streamable(model, calib=None) -> LoadSpec:
    """The LoadSpec of a model argument that can stream (scored on ``calib``, if given), or one clear line why not."""
    from .models import as_spec

    if isinstance(model, LoadedModel):
        raise LlmdropError("a model already in memory cannot be streamed; pass its name or folder")
    if calib is not None and calib.source == "self":
        raise LlmdropError(
            "--stream cannot sample 'self' calibration text (sampling runs the whole model for every token); "
            "give --calib FILE (or hf:DATASET)"
        )
    spec = as_spec(model)
    weights_folder(spec)  # GGUF, no safetensors: refused before any work
    return spec


def weights_folder(spec: LoadSpec) -> Path:
    """The local folder holding the source's safetensors files (downloaded for a Hub id); refuses what cannot
    stream with one line."""
    path, gguf = resolve_source(spec.model, spec.gguf_file)
    if gguf:
        raise LlmdropError("a GGUF file cannot be streamed (it is dequantized whole on load); leave out --stream")
    folder = Path(path)
    if not folder.exists():  # a Hub id: the files it needs, as transformers would download them
        check_hub_source(path, spec.model)
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # offline, unknown repo: one line
            raise LlmdropError(f"could not download the safetensors files of {path!r}: {e}") from None
    if not safetensors_files(folder):
        raise LlmdropError(f"{path} holds no .safetensors weights to stream (only those can be read layer by layer)")
    return folder


def can_stream(spec: LoadSpec) -> Path | None:
    """The weights folder when an export can be written from the source files (a plain safetensors checkpoint on
    disk, not an llmdrop export with remote code, not GGUF); else None."""
    try:
        path, gguf = resolve_source(spec.model, spec.gguf_file)
    except LlmdropError:
        return None
    if gguf or not Path(path).is_dir() or is_llmdrop_export(path) or spec.trust_remote_code:
        return None
    return Path(path) if safetensors_files(path) else None


def load_skeleton(spec: LoadSpec, *, device: str = "meta") -> LoadedModel:
    """The model on the meta device (no weight read) with its tokenizer and adapter: what streamed scoring and
    streamed export work from. ``info["weights_folder"]`` is where its tensors are read from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .arch import adapter_for
    from .compat import META_LOAD

    folder = weights_folder(spec)
    path, _ = resolve_source(spec.model, spec.gguf_file)
    trust = spec.trust_remote_code or is_llmdrop_export(path)  # an llmdrop export scored again
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=resolve_dtype(spec.dtype),
            attn_implementation=spec.attn_implementation,
            **META_LOAD,
            trust_remote_code=trust,
        )
    except (OSError, ValueError, KeyError) as e:
        raise load_error(spec.model, path, e) from e
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"model_type": model.config.model_type, "weights_folder": str(folder)}
    return LoadedModel(model, tokenizer, adapter_for(model.config), spec.model, path, None, info=info)


def _from_disk_layout(tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Stored names / layouts -> ``module``'s state_dict names, for one layer (transformers' conversion_mapping):
    Mixtral's ``block_sparse_moe.experts.E.w1/w3/w2`` become ``mlp.experts.gate_up_proj`` / ``down_proj``."""
    renamed = {}
    for name, t in tensors.items():
        first, _, rest = name.partition(".")
        renamed[f"{DISK_MODULE_NAMES.get(first, first)}.{rest}" if rest else first] = t
    wanted = module.state_dict(keep_vars=True)
    for key in [k for k in wanted if k.endswith("experts.gate_up_proj") and k not in renamed]:
        base = key.removesuffix("gate_up_proj")
        n = sum(1 for k in renamed if k.startswith(base) and k.endswith(".w1.weight"))
        w1 = torch.stack([renamed.pop(f"{base}{e}.w1.weight") for e in range(n)])
        w3 = torch.stack([renamed.pop(f"{base}{e}.w3.weight") for e in range(n)])
        renamed[key] = torch.cat([w1, w3], dim=1)
        renamed[f"{base}down_proj"] = torch.stack([renamed.pop(f"{base}{e}.w2.weight") for e in range(n)])
    return renamed


def _read(stored, prefix: str, device, dtype) -> dict[str, torch.Tensor]:
    """The stored tensors under ``prefix`` (names without it), on ``device``, floating ones in ``dtype``."""
    from safetensors import safe_open

    out = {}
    by_file = {}
    for name, st in stored.items():
        if name.startswith(prefix):
            by_file.setdefault(st.file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                out[name[len(prefix) :]] = t.to(device, dtype if t.is_floating_point() else t.dtype)
    return out


def _materialize(module: nn.Module, tensors: dict, device, where: str) -> None:
    """Give a meta module real tensors: ``tensors`` for its state_dict; anything left must be a non-persistent
    buffer (set up before, by the model's own initialisation)."""
    module.load_state_dict(tensors, strict=False, assign=True)
    still = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if still:
        raise LlmdropError(f"streaming found no stored tensor for {where}.{still[0]}; this checkpoint cannot stream")
    module.to(device)


def _prepare_outer(model, adapter, stored, device, dtype) -> None:
    """Everything of the base model except its layers (embedding, rotary embedding, final norm) on the device."""
    base_name = adapter.layers.rsplit(".", 1)[0]
    base = model.get_submodule(base_name)
    layers_attr = adapter.layers.rsplit(".", 1)[1]
    for name, child in base.named_children():
        if name == layers_attr:
            continue
        child.to_empty(device=device)
        with torch.no_grad():
            for sub in child.modules():  # non-persistent buffers (rotary frequencies, Gemma's embedding scale)
                if list(sub.buffers(recurse=False)):
                    model._init_weights(sub)
        _materialize(child, _read(stored, f"{base_name}.{name}.", device, dtype), device, f"{base_name}.{name}")


def _load_layer(layer: nn.Module, stored, prefix: str, device, dtype) -> None:
    tensors = _from_disk_layout(_read(stored, prefix, device, dtype), layer)
    _materialize(layer, tensors, device, prefix.rstrip("."))


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def stream_importance(
    spec: LoadSpec,
    tokens: torch.Tensor,
    *,
    metric: str = "cosine",
    batch_size: int = 1,
    progress: bool = True,
    skeleton: LoadedModel | None = None,
) -> dict:
    """``compute_importance``'s result, one layer at a time from the files (under torchrun: this rank's share of
    the batches, sums all-reduced). ``skeleton``: from ``load_skeleton(spec)``, if loaded already."""
    if metric not in METRICS:
        raise LlmdropError(f"unknown metric {metric!r}; use {' or '.join(METRICS)}")
    loaded = skeleton or load_skeleton(spec)
    model, adapter = loaded.model, loaded.adapter
    adapter.check_layout(model)
    device = resolve_device(spec.device)
    dtype = model.dtype
    stored = stored_tensors(loaded.info["weights_folder"])
    _prepare_outer(model, adapter, stored, device, dtype)
    parent_name, attr = adapter.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    n = len(layers)
    starts = batch_starts(len(tokens), batch_size)
    stats = Similarity(n, metric, absent_parts(loaded.model.config))

    # 1. the model's own forward up to the first layer, once per batch: layer-0 inputs (kept on the CPU) and each
    # layer's arguments (they depend only on the batch's shape: no padding mask is ever passed)
    hidden, arguments = [], {}
    setattr(parent, attr, nn.ModuleList(_Recorder(i, i == n - 1, layers[i], {}) for i in range(n)))
    try:
        for start in starts:
            batch = tokens[start : start + batch_size].to(device)
            record = {}
            for r in getattr(parent, attr):
                r.record = record
            try:
                parent(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            hidden.append(record["hidden"].to("cpu", dtype))
            arguments.setdefault(tuple(batch.shape), record["layers"])
            stats.tokens += batch.numel()
    finally:
        setattr(parent, attr, layers)
        for name, child in parent.named_children():  # the embedding is as big as a layer: free it before them
            if name != attr:
                child.to("meta")

    # 2. one layer at a time
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    for i in tqdm(range(n), desc="scoring (streamed)", unit="layer", disable=not progress):
        layer = layers[i]
        _load_layer(layer, stored, f"{adapter.layers}.{i}.", device, dtype)
        handles = hook_layer(layer, i, adapter, stats)
        try:
            for b, h in enumerate(hidden):
                args, kwargs = arguments[(h.shape[0], h.shape[1])][i]
                out = layer(h.to(device), *_to_device(args, device), **_to_device(kwargs, device))
                out = out[0] if isinstance(out, tuple) else out
                hidden[b] = out.to("cpu", dtype)
        finally:
            for handle in handles:
                handle.remove()
            layer.to("meta")  # frees the layer's memory
    loaded.info["stream_seconds"] = round(time.monotonic() - t0, 3)
    all_reduce(stats)
    return stats.importance()
