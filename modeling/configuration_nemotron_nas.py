"""Configuration of an llmdrop export in the ``nemotron-nas`` (DeciLM) format, which vLLM, SGLang, TensorRT-LLM and
llama.cpp's converter read natively: one ``block_configs`` entry per layer, whose ``attention.no_op`` /
``ffn.no_op`` say that the layer has no attention / no MLP.

Copied into the checkpoint and loaded with ``trust_remote_code=True`` (by transformers and by vLLM, which reads
the entries attribute-style: ``block_configs[i].attention.no_op``). Needs only ``transformers``: never import
llmdrop here. The drop lists that llmdrop's modeling code needs are derived from ``block_configs`` and never
written back, so the two can never disagree.
"""

from types import SimpleNamespace

from transformers import LlamaConfig, Qwen2Config

from .configuration_llmdrop import DroppedSublayersConfigMixin

# Where the sublayers of a Llama-family layer live (see llmdrop_sublayers in configuration_llmdrop.py).
SUBLAYERS = {
    "layers": "model.layers",
    "attn": ["self_attn", "input_layernorm"],
    "mlp": ["mlp", "post_attention_layernorm"],
}
_DERIVED = ("drop_attn_list", "drop_mlp_list", "llmdrop_sublayers")


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _plain(value):
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


class BlockConfigsMixin:
    """``block_configs`` as attribute objects in memory, plain JSON on disk; drop lists derived from them."""

    def __post_init__(self, **kwargs):
        for key in _DERIVED:
            kwargs.pop(key, None)
        super().__post_init__(**kwargs)
        blocks = [_namespace(b) for b in (getattr(self, "block_configs", None) or [])]
        # __dict__ directly: these are derived, not constructor fields (and must not trip config validation)
        self.__dict__.update(
            block_configs=blocks,
            drop_attn_list=[i for i, b in enumerate(blocks) if b.attention.no_op],
            drop_mlp_list=[i for i, b in enumerate(blocks) if b.ffn.no_op],
            llmdrop_sublayers=SUBLAYERS,
        )

    def to_dict(self):
        d = super().to_dict()
        for key in _DERIVED:
            d.pop(key, None)
        d["block_configs"] = [_plain(b) for b in self.__dict__.get("block_configs") or []]
        return d


class NemotronNasLlamaConfig(BlockConfigsMixin, DroppedSublayersConfigMixin, LlamaConfig):
    model_type = "nemotron-nas"
    base_model_type = "llama"  # Llama and Mistral (without a sliding window) sources


class NemotronNasQwen2Config(BlockConfigsMixin, DroppedSublayersConfigMixin, Qwen2Config):
    model_type = "nemotron-nas"
    base_model_type = "qwen2"  # q/k/v biases (``qkv_bias``), no o_proj bias
