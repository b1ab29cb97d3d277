"""Tiny random decoder LLMs of every supported architecture, a matching tokenizer, and a reference for
"this sublayer / block contributes nothing" that uses only forward hooks (no llmdrop code at all).

Sizes: vocab 132 (4 special tokens + "w0".."w127"), hidden 64, intermediate 128, 4 query heads / 2 KV heads
of dim 16. Sliding-window architectures get a window of 4 tokens, so that on ~12-token inputs the sliding
layers really see less context than the full ones, and mix sliding and full layers where the config allows.
"""

from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma2", "gemma3_text", "phi3"]
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
WORDS = [f"w{i}" for i in range(128)]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)
FIRST_WORD_ID = len(SPECIALS)  # ids below this are special tokens
SLIDING_WINDOW = 4

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


# The modules of each sublayer, its norms included, as transformers lays the decoder layer out (written out
# here, independently of llmdrop.source.arch): Gemma 2/3 have a norm before and after each sublayer.
_PRE_NORM = {"attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
_SANDWICH = {
    "attn": ("self_attn", "input_layernorm", "post_attention_layernorm"),
    "mlp": ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}
SUBLAYER_MODULES = {arch: _SANDWICH if arch.startswith("gemma") else _PRE_NORM for arch in ARCHS}


def _config(arch: str, n: int):
    sliding = dict(sliding_window=SLIDING_WINDOW)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=n, **COMMON)
    if arch == "mistral":  # every layer slides (Mistral has no layer_types)
        return MistralConfig(num_hidden_layers=n, **sliding, **COMMON)
    if arch == "qwen2":  # layers >= max_window_layers slide
        return Qwen2Config(num_hidden_layers=n, use_sliding_window=True, max_window_layers=n // 2, **sliding, **COMMON)
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=n, **COMMON)
    if arch == "mixtral":
        return MixtralConfig(num_hidden_layers=n, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if arch == "gemma2":  # alternating sliding / full, starting with sliding
        return Gemma2Config(num_hidden_layers=n, query_pre_attn_scalar=16, **sliding, **COMMON)
    if arch == "gemma3_text":  # sliding, sliding, full, ...
        return Gemma3TextConfig(
            num_hidden_layers=n, query_pre_attn_scalar=16, sliding_window_pattern=3, **sliding, **COMMON
        )
    if arch == "phi3":
        return Phi3Config(num_hidden_layers=n, **COMMON)
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str, num_layers: int = 6, seed: int = 0, attn_implementation: str = "eager"):
    """A random float32 ``*ForCausalLM`` in eval mode; the same (arch, num_layers, seed) gives the same weights."""
    config = _config(arch, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over "w0".."w127" (ids 4..131) with <unk>=0, <s>=1, </s>=2, <pad>=3."""
    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_checkpoint(model, folder):
    """``model`` and the tiny tokenizer as a checkpoint on disk (what users start from); returns ``folder``."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_words_file(folder, n: int = 2000, seed: int = 0):
    """A calibration text of ``n`` random tiny-tokenizer words in ``folder``; returns its path."""
    import random

    rng = random.Random(seed)
    path = folder / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return path


def _layers(model):
    return model.model.layers


def _zero_attention(module, args, kwargs, output):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return torch.zeros_like(hidden), None


def _zero_mlp(module, args, output):
    return torch.zeros_like(output)


def _skip_block(module, args, kwargs, output):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def identity_reference(model, attn=(), mlp=(), blocks=()):
    """Hook ``model`` (source numbering) so that these attention / MLP sublayers add zero to the residual
    stream and these blocks return their input. Returns the hook handles; ``.remove()`` each to undo.

    Gemma's post-sublayer norms need no hook: the RMS norm of a zero vector is zero.
    """
    layers = _layers(model)
    handles = [layers[i].self_attn.register_forward_hook(_zero_attention, with_kwargs=True) for i in attn]
    handles += [layers[i].mlp.register_forward_hook(_zero_mlp) for i in mlp]
    handles += [layers[i].register_forward_hook(_skip_block, with_kwargs=True) for i in blocks]
    return handles


@contextmanager
def identity_hooks(model, attn=(), mlp=(), blocks=()):
    handles = identity_reference(model, attn, mlp, blocks)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
