"""Models exported by llmdrop with attention and/or MLP sublayers removed.

Copied into the checkpoint and loaded by transformers with ``trust_remote_code=True``; needs only
torch and transformers. Each class is the base architecture's own transformers class; after it is
built, the dropped sublayers (and the norms that belong to them) are replaced by modules without
weights that add nothing to the residual stream, and the kept attention layers are renumbered so
that KV-cache layer j belongs to the j-th kept attention (see ``kv_cache_config``).
"""

from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_llmdrop import (
    LlmdropGemma2Config,
    LlmdropGemma3TextConfig,
    LlmdropLlamaConfig,
    LlmdropMistralConfig,
    LlmdropMixtralConfig,
    LlmdropPhi3Config,
    LlmdropQwen2Config,
    LlmdropQwen3Config,
    kept_attention_layers,
)


def _zeros_like(hidden_states):
    # A broadcast view of one zero: the residual add stays correct and nothing is allocated.
    return hidden_states.new_zeros(()).expand_as(hidden_states)


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sublayer: contributes nothing and touches no KV cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return _zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP (or sparse-MoE) sublayer: contributes nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return _zeros_like(hidden_states)


def _attentions_per_layer(model, args, output):
    """transformers records one attention map per attention module that ran; give one entry per layer, like
    hidden_states, with None where the attention is dropped, so that attentions[i] is layer i's. A forward hook,
    not a forward override: the model's forward signature stays what callers (and tracers) inspect."""
    attentions = getattr(output, "attentions", None)
    config = model.config
    dropped = set(getattr(config, "drop_attn_list", None) or ())
    if attentions is not None and dropped and len(attentions) == config.num_hidden_layers - len(dropped):
        kept = iter(attentions)
        output.attentions = tuple(None if i in dropped else next(kept) for i in range(config.num_hidden_layers))
    return output


def apply_dropped_sublayers(model, config):
    """Replace the sublayers listed in ``config`` (drop_attn_list, drop_mlp_list) in ``model``, in place."""
    spec = config.llmdrop_sublayers
    layers = model.get_submodule(spec["layers"])
    for kind, lst, stand_in in (("attn", "drop_attn_list", DroppedAttention), ("mlp", "drop_mlp_list", DroppedMLP)):
        module, *norms = spec[kind]
        for i in getattr(config, lst, None) or ():
            setattr(layers[i], module, stand_in())
            for norm in norms:
                setattr(layers[i], norm, nn.Identity())
    attn = spec["attn"][0]
    for cache_idx, i in enumerate(kept_attention_layers(config)):
        getattr(layers[i], attn).layer_idx = cache_idx
    if not getattr(model, "_llmdrop_attentions_hooked", False) and hasattr(model, "lm_head"):  # the *ForCausalLM
        model.register_forward_hook(_attentions_per_layer)
        model._llmdrop_attentions_hooked = True
    return model


class DroppedSublayersMixin:
    def __init__(self, config):
        super().__init__(config)
        apply_dropped_sublayers(self, config)


class LlmdropLlamaForCausalLM(DroppedSublayersMixin, LlamaForCausalLM):
    config_class = LlmdropLlamaConfig


class LlmdropMistralForCausalLM(DroppedSublayersMixin, MistralForCausalLM):
    config_class = LlmdropMistralConfig


class LlmdropQwen2ForCausalLM(DroppedSublayersMixin, Qwen2ForCausalLM):
    config_class = LlmdropQwen2Config


class LlmdropQwen3ForCausalLM(DroppedSublayersMixin, Qwen3ForCausalLM):
    config_class = LlmdropQwen3Config


class LlmdropMixtralForCausalLM(DroppedSublayersMixin, MixtralForCausalLM):
    config_class = LlmdropMixtralConfig


class LlmdropGemma2ForCausalLM(DroppedSublayersMixin, Gemma2ForCausalLM):
    config_class = LlmdropGemma2Config


class LlmdropGemma3ForCausalLM(DroppedSublayersMixin, Gemma3ForCausalLM):
    config_class = LlmdropGemma3TextConfig


class LlmdropPhi3ForCausalLM(DroppedSublayersMixin, Phi3ForCausalLM):
    config_class = LlmdropPhi3Config


# base model_type -> model class
MODEL_CLASSES = {
    cls.config_class.model_type.removeprefix("llmdrop_"): cls
    for cls in (
        LlmdropLlamaForCausalLM,
        LlmdropMistralForCausalLM,
        LlmdropQwen2ForCausalLM,
        LlmdropQwen3ForCausalLM,
        LlmdropMixtralForCausalLM,
        LlmdropGemma2ForCausalLM,
        LlmdropGemma3ForCausalLM,
        LlmdropPhi3ForCausalLM,
    )
}
