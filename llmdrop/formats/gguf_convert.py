"""A Llama-family checkpoint (a model in memory, or a safetensors folder streamed one tensor at a time) as the source
of a GGUF export: llama.cpp's tensor names and metadata, q / k rows in its rotary layout, the tokenizer converted
from ``tokenizer.json``. ``gguf_export.write_gguf`` then writes the plan from it as from a GGUF file.

llama.cpp applies rotary embeddings to adjacent pairs of a head's dimensions ("NORM" rope), transformers' Llama to
its two halves: the rows of q_proj and k_proj are reordered per head so that both compute the same (transformers'
GGUF loader undoes exactly this). The pre-tokenizer (how text is split before BPE) is named by the GGUF metadata, not
described: it is recognised from ``tokenizer.json`` among those llama.cpp knows, and anything else is refused.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmdrop.errors import LlmdropError

from .gguf_export import Source, Tensor

LAYER_NAMES = {  # transformers' name inside decoder layer i -> llama.cpp's, in blk.i
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
GGML_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}


def refusal(config) -> str | None:
    """Why a checkpoint with this config cannot become a GGUF here; None if it can."""
    from llmdrop.source.arch import adapter_for

    model_type = adapter_for(config).model_type  # an llmdrop / nemotron-nas export: its base architecture
    if getattr(config, "attention_calibration", None):
        return "llama.cpp has no attention calibration (`act apply`)"
    if getattr(config, "qkv_bias", False):
        return "llama.cpp's llama architecture has no biases"
    if model_type not in ("llama", "mistral"):
        return f"a GGUF is written from GGUF files, or from Llama-family checkpoints (llama, mistral), not {model_type}"
    if getattr(config, "sliding_window", None):
        return "llama.cpp's llama architecture has no sliding window (this Mistral slides)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "llama.cpp's llama architecture has no biases"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"its rotary embeddings are scaled ({rope['rope_type']}), which llmdrop does not write into a GGUF yet"
    return None


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary layout (two halves per head) -> llama.cpp's (adjacent pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tensors(loaded) -> dict:
    """transformers name -> (shape, dtype, a function giving the tensor): from the model in memory, or read from the
    safetensors files of a streamed skeleton, one at a time."""
    folder = loaded.info.get("weights_folder")
    if folder:
        from llmdrop.source.stored import read_tensor, stored_tensors

        return {name: (s.shape, s.dtype, lambda s=s: read_tensor(s)) for name, s in stored_tensors(folder).items()}
    return {name: (tuple(t.shape), t.dtype, lambda t=t: t.detach()) for name, t in loaded.model.state_dict().items()}


def _ggml_tensor(name: str, stored: tuple, ggml_type: str, heads: int | None) -> Tensor:
    """One tensor in ``ggml_type`` (F32, F16 or BF16, the last as raw 16-bit words); ``heads``: permute its rows."""
    import gguf

    shape, _, get = stored
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type]
    np_dtype = np.dtype({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[ggml_type])

    def load():
        t = get().to(torch_dtype)
        if heads:
            t = permute(t, heads)
        t = t.contiguous()
        return (t.view(torch.uint16) if ggml_type == "BF16" else t).numpy()

    elements = int(np.prod(shape))
    return Tensor(
        name, tuple(shape), np_dtype, elements * np_dtype.itemsize, gguf.GGMLQuantizationType[ggml_type], load, elements
    )


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE (refused if it is none it knows)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"  # Llama 3
    raise LlmdropError(
        f"llama.cpp has no pre-tokenizer llmdrop can name for this tokenizer (pre_tokenizer {kinds}); use --format auto"
    )


def tokenizer_fields(tokenizer, writer, vocab_size: int) -> None:
    """The tokenizer as GGUF metadata: gpt2-style BPE (tokens, types, merges), special tokens, chat template."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="llmdrop-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise LlmdropError("--format gguf needs a fast tokenizer (tokenizer.json) to convert")
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        if (
            model.get("type") != "BPE"
            or model.get("byte_fallback")
            or (data.get("decoder") or {}).get("type") != "ByteLevel"
        ):
            raise LlmdropError("--format gguf converts byte-level BPE tokenizers (GPT-2 / Llama-3 style) only")
        pre = pre_tokenizer(data)
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        types = [gguf.TokenType.UNUSED] * vocab_size
        for text, i in model["vocab"].items():
            if i < vocab_size:
                tokens[i], types[i] = text, gguf.TokenType.NORMAL
        for added in data.get("added_tokens", []):
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


def from_checkpoint(loaded) -> Source:
    """The model llmdrop loaded (in memory or streamed) as a GGUF source, with every layer it has; an export's
    dropped sublayers have no tensors (the plan written from it must drop them: ``with_absent_parts``)."""
    import gguf

    config = loaded.model.config
    why = refusal(config)
    if why:
        raise LlmdropError(f"--format gguf cannot hold this export: {why}")
    n = config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    source = _tensors(loaded)
    ggml_type = GGML_TYPES.get(source["model.embed_tokens.weight"][1], "F32")  # the checkpoint's own precision

    writer = gguf.GGUFWriter(None, "llama")  # used as a recorder of typed metadata, never written
    writer.add_block_count(n)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[ggml_type]))
    tokenizer_fields(loaded.tokenizer, writer, config.vocab_size)
    fields = {key: (v.value, v.type, v.sub_type) for key, v in writer.kv_data[0].items()}

    from llmdrop.source.arch import absent_parts

    absent = absent_parts(config)  # an export's dropped sublayers: their tensors are not there
    tensors = []
    for hf, name in TOP_NAMES.items():
        tensors.append(_ggml_tensor(name, source[hf], "F32" if "norm" in name else ggml_type, None))
    if not getattr(config, "tie_word_embeddings", False):
        tensors.append(_ggml_tensor("output.weight", source["lm_head.weight"], ggml_type, None))
    for i in range(n):
        for hf, name in LAYER_NAMES.items():
            if i in absent["attn"] and name.startswith("attn_") or i in absent["mlp"] and name.startswith("ffn_"):
                continue
            rows = heads if name == "attn_q.weight" else kv if name == "attn_k.weight" else None
            kind = "F32" if name.endswith("norm.weight") else ggml_type  # llama.cpp keeps norms in F32
            tensors.append(_ggml_tensor(f"blk.{i}.{name}", source[f"model.layers.{i}.{hf}"], kind, rows))
    return Source(fields, tensors)
