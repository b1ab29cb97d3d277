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
from pathlib import Path

import numpy as np

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan

ZERO_FFN = 32  # width of the all-zero MLP that stands for a dropped one (a multiple of every block size but K-quants)
SUBLAYER_ARCHS = ("llama", "deci")  # GGUF architectures whose layers `deci` can hold
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_ATTN_TENSORS = ("attn_",)  # attn_norm, attn_q / k / v, attn_output, attn_q_norm, ...
_FFN_WEIGHTS = ("ffn_gate.", "ffn_up.", "ffn_down.")  # ffn_norm stays: the zero MLP is normed as the real one was


def read_source(path) -> "gguf.GGUFReader":  # noqa: F821
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise LlmdropError(f"{path} is not a GGUF file llmdrop can read ({type(e).__name__}: {e})") from None


def value(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def per_layer(reader, arch: str, key: str, n: int) -> list:
    """A per-layer hyperparameter as a list of n values (GGUF stores a scalar when every layer has the same)."""
    v = value(reader, f"{arch}.{key}")
    return list(v) if isinstance(v, list) else [v] * n


def refusal(reader, plan: DropPlan) -> str | None:
    """Why llama.cpp could not run ``plan`` written from this GGUF source; None if it can."""
    arch = value(reader, "general.architecture")
    if (plan.attn or plan.mlp) and arch not in SUBLAYER_ARCHS:
        return (
            f"llama.cpp holds dropped attention / MLP sublayers in its `deci` architecture, which has the Llama "
            f"layout; this GGUF is {arch!r} (whole --blocks only)"
        )
    first = plan.kept_layers[0]
    heads = per_layer(reader, arch, "attention.head_count", plan.num_layers)
    if first in plan.attn or not heads[first]:
        return f"llama.cpp reads the head size from the first layer, whose attention (layer {first}) would be gone"
    return None


def plan_layers(reader, plan: DropPlan) -> dict:
    """Per exported layer: head counts and MLP width as llama.cpp will read them."""
    arch = value(reader, "general.architecture")
    n = plan.num_layers
    heads = per_layer(reader, arch, "attention.head_count", n)
    kv = per_layer(reader, arch, "attention.head_count_kv", n)
    if kv[0] is None:
        kv = heads
    ffn = per_layer(reader, arch, "feed_forward_length", n)
    attn, mlp = set(plan.attn), set(plan.mlp)
    kept = plan.kept_layers
    return {
        "attention.head_count": [0 if i in attn else heads[i] for i in kept],
        "attention.head_count_kv": [0 if i in attn else kv[i] for i in kept],
        "feed_forward_length": [ZERO_FFN if i in mlp else ffn[i] for i in kept],
    }


def write_gguf(source, plan: DropPlan, out: Path) -> dict:
    """Write ``plan`` applied to the GGUF file ``source`` to ``out``; returns what the file holds (for the record)."""
    import gguf

    reader = read_source(source)
    arch = value(reader, "general.architecture")
    n = value(reader, f"{arch}.block_count")
    if n != plan.num_layers:
        raise LlmdropError(f"the plan is for {plan.num_layers} layers, the GGUF file has {n}")
    why = refusal(reader, plan)
    if why:
        raise LlmdropError(f"--format gguf cannot hold this export: {why}")
    target = "deci" if plan.attn or plan.mlp else arch
    layers = plan_layers(reader, plan)
    kept, new_index = plan.kept_layers, plan.layer_map()
    head_dim = _head_dim(reader, arch)

    writer = gguf.GGUFWriter(out, target)
    per_layer_keys = {f"{arch}.{k}" for k in ("block_count", *layers)}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in per_layer_keys:
            continue
        key = target + field.name[len(arch) :] if field.name.startswith(arch + ".") else field.name
        contents = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if kind == gguf.GGUFValueType.ARRAY and key.startswith(target + ".") and len(contents) == n:
            contents = [contents[i] for i in kept]  # another per-layer array (e.g. a sliding-window pattern)
        writer.add_key_value(key, contents, kind, sub_type=sub)
    writer.add_block_count(len(kept))
    if target == "deci":
        writer.add_head_count(layers["attention.head_count"])
        writer.add_head_count_kv(layers["attention.head_count_kv"])
        writer.add_feed_forward_length(layers["feed_forward_length"])
        if value(reader, f"{arch}.attention.key_length") is None:  # deci cannot derive them from layer 0 alone
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:
        for key, values in layers.items():
            scalar = len(set(values)) == 1 and not isinstance(value(reader, f"{arch}.{key}"), list)
            writer.add_key_value(
                f"{target}.{key}",
                values[0] if scalar else values,
                gguf.GGUFValueType.UINT32 if scalar else gguf.GGUFValueType.ARRAY,
                sub_type=None if scalar else gguf.GGUFValueType.UINT32,
            )

    tensors = []  # (name, raw tensor of the source or a new numpy array)
    for t in reader.tensors:
        match = _BLOCK.fullmatch(t.name)
        if not match:
            tensors.append((t.name, t))
            continue
        i, rest = int(match[1]), match[2]
        if i not in new_index:
            continue
        if i in plan.attn and rest.startswith(_ATTN_TENSORS):
            continue
        if i in plan.mlp and rest.startswith(_FFN_WEIGHTS):
            continue
        tensors.append((f"blk.{new_index[i]}.{rest}", t))
    embd = value(reader, f"{arch}.embedding_length")
    for i in plan.mlp:
        zeros_in, zeros_out = np.zeros((ZERO_FFN, embd), np.float16), np.zeros((embd, ZERO_FFN), np.float16)
        b = new_index[i]
        tensors += [(f"blk.{b}.ffn_gate.weight", zeros_in), (f"blk.{b}.ffn_up.weight", zeros_in)]
        tensors.append((f"blk.{b}.ffn_down.weight", zeros_out))

    for name, t in tensors:
        if isinstance(t, np.ndarray):
            writer.add_tensor_info(name, t.shape, t.dtype, t.nbytes)
        else:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t in tensors:
        writer.write_tensor_data(t if isinstance(t, np.ndarray) else t.data, tensor_endianess=reader.endianess)
    writer.close()
    types = sorted({t.tensor_type.name for _, t in tensors if not isinstance(t, np.ndarray)})
    return {"architecture": target, "tensors": len(tensors), "dtype": "as stored: " + ", ".join(types), **layers}


def _head_dim(reader, arch: str) -> int:
    key = value(reader, f"{arch}.attention.key_length")
    if key:
        return key
    heads = per_layer(reader, arch, "attention.head_count", value(reader, f"{arch}.block_count"))
    return value(reader, f"{arch}.embedding_length") // next(h for h in heads if h)


def check_written(path: Path, expected: dict) -> None:
    """Read the written file back: the tensors and per-layer counts it holds are the ones meant."""
    reader = read_source(path)
    arch = value(reader, "general.architecture")
    n = value(reader, f"{arch}.block_count")
    if arch != expected["architecture"] or len(reader.tensors) != expected["tensors"]:
        raise LlmdropError(f"export refused: {path.name} does not read back as written (please report this bug)")
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if per_layer(reader, arch, key, n) != expected[key]:
            raise LlmdropError(f"export refused: {path.name}'s {key} does not read back as written")
    names = {t.name for t in reader.tensors}
    for b, heads in enumerate(expected["attention.head_count"]):
        if heads and f"blk.{b}.attn_q.weight" not in names:
            raise LlmdropError(f"export refused: {path.name} lacks layer {b}'s attention")
