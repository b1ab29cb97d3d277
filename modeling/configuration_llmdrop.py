"""Configuration of a checkpoint exported by llmdrop with attention and/or MLP sublayers removed.

This file is copied into the checkpoint and loaded by transformers with ``trust_remote_code=True``.
It needs only ``transformers``: never import llmdrop here.

Each class is the base architecture's own config with a distinct ``model_type`` (so loading without
remote code fails loudly instead of running with missing weights) and three extra fields:

- ``drop_attn_list`` / ``drop_mlp_list``: 0-based layers whose attention / MLP sublayer is gone;
- ``llmdrop_sublayers``: where the layers live and which modules make up each sublayer
  (``{"layers": "model.layers", "attn": [module, *norms], "mlp": [module, *norms]}``).
"""

import copy

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)


def kept_attention_layers(config):
    """Layer indices that still have attention, in order; index j here is KV-cache layer j."""
    dropped = set(getattr(config, "drop_attn_list", None) or ())
    return [i for i in range(config.num_hidden_layers) if i not in dropped]


def kv_cache_config(config):
    """A shallow copy of ``config`` describing only the layers that keep attention.

    transformers builds every KV cache (DynamicCache, StaticCache, generate()) from
    ``config.get_text_config(decoder=True)``, so returning this view there makes the cache hold
    exactly the kept attention layers, with their own layer types (sliding / full).
    """
    kept = kept_attention_layers(config)
    view = copy.copy(config)
    # __dict__ directly: setting the fields one by one would trip config validation midway.
    view.__dict__.update(num_hidden_layers=len(kept), drop_attn_list=[], drop_mlp_list=[])
    if getattr(config, "layer_types", None) is not None:
        view.__dict__["layer_types"] = [config.layer_types[i] for i in kept]
    return view


class DroppedSublayersConfigMixin:
    def get_text_config(self, decoder=None, encoder=None):
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and config is self and getattr(self, "drop_attn_list", None):
            return kv_cache_config(self)
        return config


class LlmdropLlamaConfig(DroppedSublayersConfigMixin, LlamaConfig):
    model_type = "llmdrop_llama"


class LlmdropMistralConfig(DroppedSublayersConfigMixin, MistralConfig):
    model_type = "llmdrop_mistral"


class LlmdropQwen2Config(DroppedSublayersConfigMixin, Qwen2Config):
    model_type = "llmdrop_qwen2"


class LlmdropQwen3Config(DroppedSublayersConfigMixin, Qwen3Config):
    model_type = "llmdrop_qwen3"


class LlmdropMixtralConfig(DroppedSublayersConfigMixin, MixtralConfig):
    model_type = "llmdrop_mixtral"


class LlmdropGemma2Config(DroppedSublayersConfigMixin, Gemma2Config):
    model_type = "llmdrop_gemma2"


class LlmdropGemma3TextConfig(DroppedSublayersConfigMixin, Gemma3TextConfig):
    model_type = "llmdrop_gemma3_text"


class LlmdropPhi3Config(DroppedSublayersConfigMixin, Phi3Config):
    model_type = "llmdrop_phi3"


# base model_type -> config class; export.py and the modeling file look classes up here.
CONFIG_CLASSES = {
    cls.model_type.removeprefix("llmdrop_"): cls
    for cls in (
        LlmdropLlamaConfig,
        LlmdropMistralConfig,
        LlmdropQwen2Config,
        LlmdropQwen3Config,
        LlmdropMixtralConfig,
        LlmdropGemma2Config,
        LlmdropGemma3TextConfig,
        LlmdropPhi3Config,
    )
}


def _register_weight_conversions():
    """Load (and save) an export's weights in the layout its base architecture uses on the Hub.

    transformers 5 converts the checkpoint layout of some architectures on load (Mixtral: the per-expert
    ``block_sparse_moe.experts.N.w1/w2/w3`` become fused ``mlp.experts.gate_up_proj/down_proj``) and converts
    back on save, looked up by ``model_type``; custom code gets no conversion unless one is registered for it.
    Without this, such an export would load with randomly initialised experts.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversions keeps the runtime layout on disk
        return
    for base, cls in CONFIG_CLASSES.items():
        mapping = get_checkpoint_conversion_mapping(base)
        if mapping and get_checkpoint_conversion_mapping(cls.model_type) is None:
            register_checkpoint_conversion_mapping(cls.model_type, mapping)


_register_weight_conversions()
