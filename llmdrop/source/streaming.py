"""Models larger than memory: a skeleton on the meta device, and its layers read one at a time from the safetensors
files (the streamed pass itself is ``runner.run``'s).

The skeleton is ``from_pretrained(device_map="meta")``: config, classes, names and shapes, no weight read.
``prepare_outer`` gives what lies outside the layers (embedding, rotary embedding, final norm) real tensors,
``load_layer`` one layer's tensors; the runner frees each again once every batch has gone through it.

Weights stored in another layout than the one transformers runs (Mixtral's per-expert matrices, fused on load by
transformers' conversion mapping) are converted here, per layer (``_from_disk_layout``).
"""

from pathlib import Path

import torch
from torch import nn

from llmdrop.errors import LlmdropError
from llmdrop.source.stored import DISK_MODULE_NAMES, safetensors_files

from .models import (
    LoadedModel,
    LoadSpec,
    check_hub_source,
    is_llmdrop_export,
    load_error,
    resolve_dtype,
    resolve_source,
)


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

    from llmdrop.compat import META_LOAD

    from .arch import adapter_for

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
    info = {"model_type": model.config.model_type, "weights_folder": str(folder), "device": spec.device}
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


def prepare_outer(model, adapter, stored, device, dtype) -> None:
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


def load_layer(layer: nn.Module, stored, prefix: str, device, dtype) -> None:
    tensors = _from_disk_layout(_read(stored, prefix, device, dtype), layer)
    _materialize(layer, tensors, device, prefix.rstrip("."))
