"""Models exported by llmdrop in the ``nemotron-nas`` (DeciLM) format, for transformers.

vLLM and the other engines bring their own DeciLM code and read only config.json and the weights; transformers
has no native ``nemotron-nas``, so these classes (loaded with ``trust_remote_code=True``) are llmdrop's
dropped-sublayer models over the base architecture's own classes: the same modules, KV cache and logits as
llmdrop's own remote-code format. Needs only torch and transformers: never import llmdrop here.
"""

from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .configuration_nemotron_nas import NemotronNasLlamaConfig, NemotronNasQwen2Config
from .modeling_llmdrop import DroppedSublayersMixin


class DeciLMForCausalLM(DroppedSublayersMixin, LlamaForCausalLM):
    config_class = NemotronNasLlamaConfig


class DeciLMQwen2ForCausalLM(DroppedSublayersMixin, Qwen2ForCausalLM):
    config_class = NemotronNasQwen2Config


# base model_type -> model class (its config class is the model class's config_class)
NEMOTRON_NAS_CLASSES = {"llama": DeciLMForCausalLM, "qwen2": DeciLMQwen2ForCausalLM}
