"""Apply a DropPlan to a loaded model, in memory and in place.

Whole blocks are removed from the layer list and the rest renumbered (the config's per-layer lists are
sliced to match). Attention / MLP sublayers are replaced by llmdrop's remote-code stand-ins, and the
model's config becomes the export's config class, so the in-memory model IS the exported model:
same modules, same KV-cache layout, same logits.
"""

from torch import nn

from llmdrop.modeling.configuration_llmdrop import CONFIG_CLASSES
from llmdrop.modeling.modeling_llmdrop import apply_dropped_sublayers
from llmdrop.planning.plan import DropPlan
from llmdrop.source.arch import Adapter

# config keys that are never part of an export (GGUF loading leaves a quantization_config behind)
_NOT_EXPORTED = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "quantization_config",
    "block_configs",
    "qkv_bias",
)  # the last two: nemotron-nas sources, rebuilt by that exporter


def _swap_config(model: nn.Module, new) -> None:
    """Point the model and every submodule holding the old config at the new one."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _is_per_layer_list(key: str, value, num_layers: int) -> bool:
    return isinstance(value, list) and len(value) == num_layers and "layer" in key


def remove_blocks(model: nn.Module, adapter: Adapter, blocks: list[int]) -> None:
    """Delete whole decoder layers and renumber the survivors (a plain, vanilla architecture)."""
    if not blocks:
        return
    config = model.config
    n = config.num_hidden_layers
    keep = [i for i in range(n) if i not in set(blocks)]
    layers = adapter.layer_list(model)
    parent, name = adapter.layers.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, nn.ModuleList(layers[i] for i in keep))
    for new_idx, layer in enumerate(model.get_submodule(adapter.layers)):
        for module in (layer, layer.get_submodule(adapter.attn[0])):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    updates = {"num_hidden_layers": len(keep)}
    for key, value in config.__dict__.items():
        if _is_per_layer_list(key, value, n):
            updates[key] = [value[i] for i in keep]
    # An export that already lacks some sublayers: carry its drop lists into the new numbering.
    new_index = {old: new for new, old in enumerate(keep)}
    for key in ("drop_attn_list", "drop_mlp_list"):
        if getattr(config, key, None):
            updates[key] = [new_index[i] for i in config.__dict__[key] if i in new_index]
    config.__dict__.update(updates)  # all at once: one by one would trip config validation midway


def dropped_config(config, adapter: Adapter, attn: list[int], mlp: list[int]):
    """The export config class for ``config`` with these sublayers (plus any already dropped) removed."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_EXPORTED}
    # from the attributes: a nemotron-nas config derives them from block_configs and does not serialise them
    fields["drop_attn_list"] = sorted(set(attn) | set(getattr(config, "drop_attn_list", None) or ()))
    fields["drop_mlp_list"] = sorted(set(mlp) | set(getattr(config, "drop_mlp_list", None) or ()))
    fields["llmdrop_sublayers"] = adapter.sublayers_spec()
    new = CONFIG_CLASSES[adapter.model_type](**fields)
    new._attn_implementation = config._attn_implementation
    return new


def drop_sublayers(model: nn.Module, adapter: Adapter, attn: list[int] = (), mlp: list[int] = ()) -> None:
    """Replace attention / MLP sublayers (current numbering) by stand-ins; may be called repeatedly."""
    config = dropped_config(model.config, adapter, attn, mlp)
    _swap_config(model, config)
    apply_dropped_sublayers(model, config)


def apply_plan(model: nn.Module, adapter: Adapter, plan: DropPlan) -> None:
    if plan.num_layers != model.config.num_hidden_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, the model has {model.config.num_hidden_layers}")
    attn, mlp = plan.exported_sublayers()
    remove_blocks(model, adapter, plan.blocks)
    if attn or mlp or hasattr(model.config, "llmdrop_sublayers"):  # the latter: source is an export already
        drop_sublayers(model, adapter, attn, mlp)
