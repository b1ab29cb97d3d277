"""Where the parts of each supported architecture live: one small adapter per ``model_type``.

Dropping a sublayer means replacing its module *and the norms that belong to it* by modules that add
nothing to the residual stream, so the adapter names those norms. Llama-style layers have one
pre-norm per sublayer; Gemma-2/3 have a "sandwich" (a norm before and after each sublayer).

The adapter also declares the residual layout it assumes (``sequential``: attention's residual add, then the
MLP's), because scoring reads the stream between the two adds. A layer that runs attention and MLP in
parallel on the same input has no such point; such a model is refused instead of being scored 0.
"""

from dataclasses import dataclass

import torch

from llmdrop.errors import LlmdropError

EXPORT_PREFIX = "llmdrop_"  # model_type prefix of exports with sublayers dropped


@dataclass(frozen=True)
class Adapter:
    model_type: str
    layers: str = "model.layers"  # the nn.ModuleList of decoder layers
    attn: tuple[str, ...] = ("self_attn", "input_layernorm")  # the sublayer first, then its norms
    mlp: tuple[str, ...] = ("mlp", "post_attention_layernorm")
    final_norm: str = "model.norm"
    layout: str = "sequential pre-norm"  # or "sequential sandwich" (a norm before and after each sublayer)
    # what the weight-only attention score (passes/gatenorm.py) reads: the query and key projections inside the
    # attention module (one name: a fused q, k, v projection, rows in that order), the pre-norm's scale
    # (norm_offset + weight: Gemma's RMS norm multiplies by 1 + weight), and whether queries and keys are
    # RMS-normalized per head before their product (q_norm / k_norm), which takes their scale out of the weights
    qk: tuple[str, ...] = ("q_proj", "k_proj")
    norm_offset: float = 0.0
    qk_norm: bool = False

    @property
    def mlp_input_norm(self) -> str:
        """The module whose input is the residual stream right after the attention's residual add."""
        return self.mlp[1]

    def layer_list(self, model):
        return model.get_submodule(self.layers)

    def check_layout(self, model) -> None:
        """Refuse a model whose layers do not have the sequential residual layout this adapter measures."""
        config = model.config
        parallel = [k for k in _PARALLEL_FLAGS if getattr(config, k, False)]
        if parallel:
            raise LlmdropError(
                f"{config.model_type} with {parallel[0]}=True runs attention and MLP in parallel; llmdrop "
                f"measures each sublayer between two residual adds ({self.layout}) and cannot score it"
            )
        layer = self.layer_list(model)[0]
        for name in (*self.attn, *self.mlp):
            if not hasattr(layer, name):
                raise LlmdropError(
                    f"{config.model_type} layers have no `{name}` module: not the {self.layout} layout "
                    f"llmdrop's {self.model_type} adapter expects"
                )

    def logits(self, model, hidden, *, final_norm: bool = True):
        """The model's next-token logits from a residual-stream state (the final norm unless ``final_norm=False``,
        the LM head, and Gemma's soft-capping): the one place llmdrop computes logits from hidden states."""
        if final_norm:
            hidden = model.get_submodule(self.final_norm)(hidden)
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def sublayers_spec(self) -> dict:
        """What an export's config.json stores so that the remote code can find the sublayers."""
        return {"layers": self.layers, "attn": list(self.attn), "mlp": list(self.mlp)}


# config flags of architectures that run attention and MLP side by side on the same input
_PARALLEL_FLAGS = ("parallel_attn", "use_parallel_residual", "parallel_residual", "parallel_block")

_SANDWICH = {
    "attn": ("self_attn", "input_layernorm", "post_attention_layernorm"),
    "mlp": ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "layout": "sequential sandwich",
    "norm_offset": 1.0,
}

ADAPTERS = {
    a.model_type: a
    for a in (
        Adapter("llama"),
        Adapter("mistral"),
        Adapter("qwen2"),
        Adapter("qwen3", qk_norm=True),
        Adapter("mixtral"),  # the sparse-MoE block sits at `mlp` and counts as the MLP sublayer
        Adapter("phi3", qk=("qkv_proj",)),
        Adapter("gemma2", **_SANDWICH),
        Adapter("gemma3_text", **_SANDWICH, qk_norm=True),
    )
}


def absent_parts(config) -> dict[str, list[int]]:
    """The sublayers an llmdrop or nemotron-nas export no longer has, in its own numbering: ``{"attn": [...],
    "mlp": [...]}``. ``config``: a loaded config, or the dict of a config.json (nemotron-nas keeps them in
    ``block_configs`` on disk; its loaded config derives the lists)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    attn, mlp = list(get("drop_attn_list") or ()), list(get("drop_mlp_list") or ())
    blocks = get("block_configs")
    if isinstance(config, dict) and blocks and not (attn or mlp):
        attn = [i for i, b in enumerate(blocks) if (b.get("attention") or {}).get("no_op")]
        mlp = [i for i, b in enumerate(blocks) if (b.get("ffn") or {}).get("no_op")]
    return {"attn": sorted(attn), "mlp": sorted(mlp)}


def mask_absent(importance: dict, absent: dict) -> dict:
    """``importance`` with the absent parts set to None (a part that is not there scores nothing, not 0)."""
    return {
        kind: [None if i in set(absent.get(kind, ())) else v for i, v in enumerate(values)]
        for kind, values in importance.items()
    }


def base_model_type(model_type: str) -> str:
    return model_type.removeprefix(EXPORT_PREFIX)


def adapter_for(config) -> Adapter:
    """The adapter for a loaded model's config (llmdrop exports use their base architecture's)."""
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    if model_type == "nemotron-nas":  # llmdrop's nemotron-nas exports name their base architecture
        model_type = getattr(config, "base_model_type", "llama")
    if model_type not in ADAPTERS:
        hint = " (multimodal Gemma 3: export its text model, model_type gemma3_text)" if model_type == "gemma3" else ""
        raise LlmdropError(
            f"unsupported architecture model_type={model_type!r}{hint}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
