"""A drop plan written as a GGUF file that llama.cpp runs, straight from a GGUF source.

The source's tensors are copied as they are stored (quantized ones stay quantized: no dequantize / requantize), its
tokenizer and metadata kept; the tensors of removed blocks and dropped sublayers are left out and the blocks
renumbered. Whole-block drops keep the source architecture. Sublayer drops become llama.cpp's ``deci``
architecture (NVIDIA's Nemotron-NAS GGUFs), which states per layer ``attention.head_count`` /
``head_count_kv`` (0: no attention) and ``feed_forward_length``:

- attention dropped: head counts 0 and no attention tensors. llama.cpp skips the layer's attention and gives it
  no K cache (its V cache too with flash attention on);
- MLP dropped, attention kept: llama.cpp's ``deci`` graph mishandles ``feed_forward_length = 0`` here (it skips
  adding the attention output to the residual: the layer acts as if the whole block were gone; and it aborts
  in the last layer), so the MLP is written as one of width ``ZERO_FFN`` whose weights are all zero: it adds
  exactly nothing, at a negligible cost;
- attention dropped in the first kept layer: llama.cpp reads the head size from it, so the plan is refused.

``deci`` uses llama.cpp's NORM rotary layout, the one Llama-family GGUFs store q / k in; other architectures (a
Qwen2 GGUF stores them for NEOX rope) can lose whole blocks only.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan

ZERO_FFN = 32  # width of the all-zero MLP that stands for a dropped one (a multiple of every block size but K-quants)
SUBLAYER_ARCHS = ("llama", "deci")  # GGUF architectures whose layers `deci` can hold
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_ATTN_TENSORS = ("attn_",)  # attn_norm, attn_q / k / v, attn_output, attn_q_norm, ...
_FFN_WEIGHTS = ("ffn_gate.", "ffn_up.", "ffn_down.")  # ffn_norm stays: the zero MLP is normed as the real one was


@dataclass
class Tensor:
    """One tensor to write: its GGUF name, how it is stored, and how to get its data (read when written)."""

    name: str
    shape: tuple  # numpy shape of the data (for quantized types: rows x bytes)
    dtype: np.dtype
    nbytes: int
    ggml_type: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]
    elements: int = 0  # of the tensor it stores (its shape in elements, whatever the type)


@dataclass
class Source:
    """What a GGUF export is written from: metadata (key -> (value, type, array item type)) and tensors, in GGUF
    naming. From a GGUF file (``from_file``) or from a checkpoint in memory (``gguf_convert.from_checkpoint``)."""

    fields: dict
    tensors: list[Tensor]
    endianess: object = 0  # gguf.GGUFEndian.LITTLE

    @classmethod
    def from_file(cls, path) -> "Source":
        reader = read_source(path)
        fields = {
            f.name: (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
            for f in reader.fields.values()
            if not f.name.startswith("GGUF.")
        }
        tensors = [
            Tensor(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type, lambda t=t: t.data, t.n_elements)
            for t in reader.tensors
        ]
        return cls(fields, tensors, reader.endianess)

    def value(self, key: str):
        return self.fields[key][0] if key in self.fields else None

    @property
    def arch(self) -> str:
        return self.value("general.architecture")

    @property
    def num_layers(self) -> int:
        return self.value(f"{self.arch}.block_count")

    def per_layer(self, key: str) -> list:
        """A per-layer hyperparameter of the architecture as a list (GGUF stores a scalar when all layers agree)."""
        v = self.value(f"{self.arch}.{key}")
        return list(v) if isinstance(v, list) else [v] * self.num_layers

    def kv_heads(self) -> list:
        kv = self.per_layer("attention.head_count_kv")
        return self.per_layer("attention.head_count") if kv[0] is None else kv

    def head_dim(self) -> int:
        heads = self.per_layer("attention.head_count")
        key = self.value(f"{self.arch}.attention.key_length")
        return key or self.value(f"{self.arch}.embedding_length") // next(h for h in heads if h)


def read_source(path) -> "gguf.GGUFReader":  # noqa: F821
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise LlmdropError(f"{path} is not a GGUF file llmdrop can read ({type(e).__name__}: {e})") from None


def refusal(source: Source, plan: DropPlan) -> str | None:
    """Why llama.cpp could not run ``plan`` written from this GGUF source; None if it can."""
    if (plan.attn or plan.mlp) and source.arch not in SUBLAYER_ARCHS:
        return (
            f"llama.cpp holds dropped attention / MLP sublayers in its `deci` architecture, which has the Llama "
            f"layout; this GGUF is {source.arch!r} (whole --blocks only)"
        )
    first = plan.kept_layers[0]
    if first in plan.attn or not source.per_layer("attention.head_count")[first]:
        return f"llama.cpp reads the head size from the first layer, whose attention (layer {first}) would be gone"
    return None


def plan_layers(source: Source, plan: DropPlan) -> dict:
    """Per exported layer: head counts and MLP width as llama.cpp will read them."""
    heads, kv, ffn = (
        source.per_layer("attention.head_count"),
        source.kv_heads(),
        source.per_layer("feed_forward_length"),
    )
    attn, mlp = set(plan.attn), set(plan.mlp)
    kept = plan.kept_layers
    return {
        "attention.head_count": [0 if i in attn else heads[i] for i in kept],
        "attention.head_count_kv": [0 if i in attn else kv[i] for i in kept],
        "feed_forward_length": [ZERO_FFN if i in mlp else ffn[i] for i in kept],
    }


# Quantized types whose blocks hold their scale (and minimum) as float16 at the start: a tensor of these is multiplied
# by a constant by multiplying those fields, its quants untouched (``--compensate scale``).
_BLOCK_SCALES = {"Q4_0": 1, "Q5_0": 1, "Q8_0": 1, "Q4_1": 2, "Q5_1": 2}  # float16 fields: d, or d and m


# the GGUF tensors that write each sublayer's output (llama.cpp's names; a MoE's stacked experts included)
_GGUF_WRITERS = {
    "attn": ("attn_output.weight", "attn_output.bias"),
    "mlp": ("ffn_down.weight", "ffn_down.bias", "ffn_down_exps.weight"),
}


def check_rescalable(path) -> None:
    """Before any pass: refuse a GGUF source whose output projections ``scaled_data`` cannot rescale."""
    for t in read_source(path).tensors:
        if t.name.split(".", 2)[-1] in _GGUF_WRITERS["attn"] + _GGUF_WRITERS["mlp"]:
            _check_rescalable(t.name, t.tensor_type.name)


def _check_rescalable(name: str, kind: str) -> None:
    if kind not in ("F32", "F16", *_BLOCK_SCALES):
        raise LlmdropError(
            f"--compensate scale cannot rescale {name}: its type {kind} keeps its scales inside packed "
            f"super-blocks; llmdrop rescales {', '.join(['F32', 'F16', *_BLOCK_SCALES])} GGUF tensors"
        )


def scaled_data(t: Tensor, factor: float) -> np.ndarray:
    """Tensor ``t``'s stored data times ``factor``, in its own type: float tensors multiplied, quantized blocks with
    their float16 scale (and minimum) multiplied. Other types (K-quants) are refused."""
    import gguf

    kind = t.ggml_type.name
    data = np.array(t.load())  # a copy: the source is memory-mapped read-only
    _check_rescalable(t.name, kind)
    if kind in ("F32", "F16"):
        return (data.astype(np.float64) * factor).astype(data.dtype)
    block_bytes = gguf.GGML_QUANT_SIZES[t.ggml_type][1]
    blocks = data.reshape(-1, block_bytes)
    fields = blocks[:, : 2 * _BLOCK_SCALES[kind]].copy().view(np.float16)
    blocks[:, : 2 * _BLOCK_SCALES[kind]] = (fields.astype(np.float64) * factor).astype(np.float16).view(np.uint8)
    return blocks.reshape(data.shape)


def gguf_scales(record: dict, num_layers: int) -> dict[str, float]:
    """``--compensate scale``'s folds (its llmdrop.json record) as GGUF source tensor name -> factor."""
    from llmdrop.planning.plan import factors_after

    out = {}
    for pos, factor in factors_after(record["runs"], num_layers).items():
        for name in _GGUF_WRITERS["attn" if pos % 2 == 0 else "mlp"]:
            out[f"blk.{pos // 2}.{name}"] = factor
    return out


def write_gguf(source, plan: DropPlan, out: Path, *, scales: dict[str, float] | None = None) -> dict:
    """Write ``plan`` applied to ``source`` (a GGUF file, or a ``Source``) to ``out``; returns what the file holds
    (for the record). ``scales``: source tensor name -> a factor its values are multiplied by (``--compensate
    scale``'s folds)."""
    import gguf

    if not isinstance(source, Source):
        source = Source.from_file(source)
    arch, n = source.arch, source.num_layers
    if n != plan.num_layers:
        raise LlmdropError(f"the plan is for {plan.num_layers} layers, the GGUF source has {n}")
    why = refusal(source, plan)
    if why:
        raise LlmdropError(f"--format gguf cannot hold this export: {why}")
    target = "deci" if plan.attn or plan.mlp else arch
    layers = plan_layers(source, plan)
    kept, new_index = plan.kept_layers, plan.layer_map()
    head_dim = source.head_dim()

    writer = gguf.GGUFWriter(out, target)
    per_layer_keys = {f"{arch}.{k}" for k in ("block_count", *layers)}
    for name, (contents, kind, sub) in source.fields.items():
        if name == "general.architecture" or name in per_layer_keys:
            continue
        key = target + name[len(arch) :] if name.startswith(arch + ".") else name
        if kind == gguf.GGUFValueType.ARRAY and key.startswith(target + ".") and len(contents) == n:
            contents = [contents[i] for i in kept]  # another per-layer array (e.g. a sliding-window pattern)
        writer.add_key_value(key, contents, kind, sub_type=sub)
    writer.add_block_count(len(kept))
    if target == "deci":
        writer.add_head_count(layers["attention.head_count"])
        writer.add_head_count_kv(layers["attention.head_count_kv"])
        writer.add_feed_forward_length(layers["feed_forward_length"])
        if source.value(f"{arch}.attention.key_length") is None:  # deci cannot derive them from layer 0 alone
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:
        for key, values in layers.items():
            scalar = len(set(values)) == 1 and not isinstance(source.value(f"{arch}.{key}"), list)
            writer.add_key_value(
                f"{target}.{key}",
                values[0] if scalar else values,
                gguf.GGUFValueType.UINT32 if scalar else gguf.GGUFValueType.ARRAY,
                sub_type=None if scalar else gguf.GGUFValueType.UINT32,
            )

    tensors = []
    for t in source.tensors:
        match = _BLOCK.fullmatch(t.name)
        if not match:
            tensors.append(t)
            continue
        i, rest = int(match[1]), match[2]
        if i not in new_index:
            continue
        if i in plan.attn and rest.startswith(_ATTN_TENSORS):
            continue
        if i in plan.mlp and rest.startswith(_FFN_WEIGHTS):
            continue
        if t.name in (scales or {}):
            t = replace(t, load=lambda t=t, f=scales[t.name]: scaled_data(t, f))
        tensors.append(replace(t, name=f"blk.{new_index[i]}.{rest}"))
    types = sorted({t.ggml_type.name for t in tensors})
    names = {t.name for t in tensors}
    embd = source.value(f"{arch}.embedding_length")
    ones = np.ones(embd, np.float32)
    for i in plan.mlp:  # a checkpoint whose MLP was dropped before has no norm for it: the zero MLP needs one
        norm = f"blk.{new_index[i]}.ffn_norm.weight"
        if norm not in names:
            tensors.append(
                Tensor(
                    norm, ones.shape, ones.dtype, ones.nbytes, gguf.GGMLQuantizationType.F32, lambda: ones, ones.size
                )
            )
    zeros_in, zeros_out = np.zeros((ZERO_FFN, embd), np.float16), np.zeros((embd, ZERO_FFN), np.float16)
    for i in plan.mlp:
        b = new_index[i]
        for name, zeros in (("ffn_gate", zeros_in), ("ffn_up", zeros_in), ("ffn_down", zeros_out)):
            f16 = gguf.GGMLQuantizationType.F16
            tensors.append(
                Tensor(f"blk.{b}.{name}.weight", zeros.shape, zeros.dtype, zeros.nbytes, f16, lambda: zeros, zeros.size)
            )

    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.load(), tensor_endianess=source.endianess)
    writer.close()
    return {"architecture": target, "tensors": len(tensors), "dtype": "as stored: " + ", ".join(types), **layers}


def check_written(path: Path, expected: dict) -> None:
    """Read the written file back: the tensors and per-layer counts it holds are the ones meant."""
    written = Source.from_file(path)
    if written.arch != expected["architecture"] or len(written.tensors) != expected["tensors"]:
        raise LlmdropError(f"export refused: {path.name} does not read back as written (please report this bug)")
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if written.per_layer(key) != expected[key]:
            raise LlmdropError(f"export refused: {path.name}'s {key} does not read back as written")
    names = {t.name for t in written.tensors}
    for b, heads in enumerate(expected["attention.head_count"]):
        if heads and f"blk.{b}.attn_q.weight" not in names:
            raise LlmdropError(f"export refused: {path.name} lacks layer {b}'s attention")
