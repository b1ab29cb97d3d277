"""Attention calibration (ACT, Yu et al. 2024): scale down the attention that chosen heads pay to sinks.

Copied into checkpoints exported by ``llmdrop act apply`` (whose ``auto_map`` names the model classes at the
end of this file) and used by llmdrop itself in memory, so that an export computes exactly what llmdrop
measured. Needs only torch and transformers: never import llmdrop. Exports without calibration do not
carry this file.

For a calibrated head and query i (post-softmax attention A, keys j):

- sink score, *causal*: s_j(i) = mean of A_qj over the queries q <= i that may see key j (mask allowed),
  measured on the uncalibrated attention. The paper's reference averages over *all* queries q >= j,
  future ones included; using only queries up to i makes token i's output independent of later tokens,
  so a KV-cached decode gives the logits of a full forward. The column sums of earlier queries are kept
  in a small per-module state (reset whenever a forward starts a new sequence).
- sinks of row i: keys j with s_j(i) > threshold, except the *first* token of the row (its first
  non-padding position, "position 0" / BOS), which is left exactly as it is.
- calibration: A_ij <- beta * A_ij on the sinks; the freed mass (1 - beta) * sum_sinks A_ij goes to the
  other keys of the row (not sinks, not the first token) in proportion to their attention, so the row
  still sums to 1. A row with no such other key is left unchanged.

Only the calibrated layers use this eager path: their attention modules get a config copy whose
``_attn_implementation`` is ``"llmdrop_act"`` (registered below); every other layer keeps its own
(SDPA by default).
"""

import copy

import torch
from transformers import AttentionInterface

from .modeling_llmdrop import MODEL_CLASSES

NAME = "llmdrop_act"
DEFAULT_BETA = 0.4
DEFAULT_THRESHOLD = 0.1


def calibrate_rows(attn: torch.Tensor, sinks: torch.Tensor, keep: torch.Tensor, beta: float) -> torch.Tensor:
    """Calibrated copy of ``attn`` (rows over the last dim) with ``sinks`` scaled by ``beta``.

    ``keep`` marks keys that are neither scaled nor receive mass (the first token); masked keys should have
    zero attention already. The freed mass goes to the remaining keys in proportion to their attention.
    """
    sinks = sinks & ~keep
    others = ~sinks & ~keep
    sink_mass = (attn * sinks).sum(-1, keepdim=True)
    other_mass = (attn * others).sum(-1, keepdim=True)
    ok = other_mass > 0  # nowhere to put the freed mass: leave the row alone
    gain = torch.where(ok, 1 + (1 - beta) * sink_mass / other_mass.clamp_min(torch.finfo(attn.dtype).tiny), 1.0)
    scale = torch.where(sinks & ok, beta, torch.where(others, gain, 1.0))
    return attn * scale


def _allowed(attention_mask, batch: int, q_len: int, k_len: int, sliding_window, device) -> torch.Tensor:
    """Boolean [batch, 1, q, k]: may query q see key k. Masks come as bool (SDPA), additive float (eager) or None
    (SDPA's implicit causal mask, aligned to the last query)."""
    if attention_mask is None:
        q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        k_pos = torch.arange(k_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        return allowed[None, None].expand(batch, 1, q_len, k_len)
    mask = attention_mask[:, :, :, :k_len]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, :1].expand(batch, 1, q_len, k_len)


def _state(module, batch: int, n_heads: int, q_len: int, k_len: int, device) -> dict:
    """Column sums of earlier queries of this sequence (per module); a forward whose keys are exactly its
    queries starts a new sequence."""
    state = getattr(module, "_act_state", None)
    if k_len == q_len or state is None:
        if k_len != q_len:
            raise RuntimeError(
                "attention calibration: a cached forward without the earlier part of the sequence "
                "(start each sequence with a forward over its whole prompt)"
            )
        state = {
            "sums": torch.zeros(batch, n_heads, 0, device=device),
            "counts": torch.zeros(batch, 1, 0, device=device),
            "first": torch.full((batch,), -1, dtype=torch.long, device=device),
        }
    if state["sums"].shape[0] != batch:
        raise RuntimeError("attention calibration: the batch size changed in the middle of a cached sequence")
    if k_len > state["sums"].shape[-1] + q_len:
        raise RuntimeError("attention calibration: more keys than tokens seen in this sequence")
    return state


def act_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **kwargs
):
    """Eager attention (GQA, softcapping, sliding windows via the mask) with calibration of ``module.act_heads``."""
    batch, n_heads, q_len, head_dim = query.shape
    k_len = key.shape[-2]
    groups = n_heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if scaling is None:
        scaling = head_dim**-0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = _allowed(attention_mask, batch, q_len, k_len, sliding_window, query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1) * allowed  # a fully masked (padding) row becomes all zero

    heads = list(module.act_heads)
    state = _state(module, batch, len(heads), q_len, k_len, query.device)
    seen = state["sums"].shape[-1]
    total = seen + q_len  # tokens of this sequence so far; the keys are the last k_len of them
    allowed_f = allowed.float()
    a = attn[:, heads]
    # running column sums / counts over queries up to each query (earlier forwards from the state)
    sums = torch.nn.functional.pad(state["sums"], (0, q_len))[..., total - k_len :]
    counts = torch.nn.functional.pad(state["counts"], (0, q_len))[..., total - k_len :]
    run_sums = sums[:, :, None, :] + a.cumsum(dim=2)
    run_counts = counts[:, :, None, :] + allowed_f.cumsum(dim=2)
    sink_score = run_sums / run_counts.clamp_min(1)
    sinks = (sink_score > module.act_threshold) & allowed
    # the first token of each row: the first key any query of this sequence could see
    key_pos = torch.arange(k_len, device=query.device) + (total - k_len)
    row_first = torch.where(allowed[:, 0].any(-1), key_pos[allowed[:, 0].int().argmax(-1)], -1)  # [batch, q]
    prev_first = state["first"][:, None].expand(batch, q_len)
    candidates = torch.where(row_first >= 0, row_first, torch.iinfo(torch.long).max)
    candidates = torch.where(prev_first >= 0, torch.minimum(candidates, prev_first), candidates)
    first = torch.cummin(candidates, dim=1).values  # [batch, q]
    keep = key_pos[None, None, None, :] == first[:, None, :, None]
    attn = attn.clone()
    attn[:, heads] = calibrate_rows(a, sinks, keep, module.act_beta)

    # remember this forward's queries for the next (cached) one
    new_sums = torch.nn.functional.pad(state["sums"], (0, q_len)).clone()
    new_counts = torch.nn.functional.pad(state["counts"], (0, q_len)).clone()
    new_sums[..., total - k_len :] += a.sum(dim=2)
    new_counts[..., total - k_len :] += allowed_f.sum(dim=2)
    last_first = first[:, -1]
    module._act_state = {
        "sums": new_sums,
        "counts": new_counts,
        "first": torch.where(last_first == torch.iinfo(torch.long).max, -1, last_first),
    }

    attn = attn.to(query.dtype)
    if dropout and module.training:
        attn = torch.nn.functional.dropout(attn, p=dropout)
    out = torch.matmul(attn, value).transpose(1, 2).contiguous()
    return out, attn


AttentionInterface.register(NAME, act_attention_forward)


def _attention_modules(model, layers_path: str, attn_name: str):
    return [getattr(layer, attn_name) for layer in model.get_submodule(layers_path)]


def enable_attention_calibration(
    model,
    heads,
    beta: float = DEFAULT_BETA,
    threshold: float = DEFAULT_THRESHOLD,
    layers_path: str = "model.layers",
    attn_name: str = "self_attn",
) -> list:
    """Calibrate ``heads`` ([[layer, head], ...], layer = index in the model's layer list) in place.

    Returns the calibrated attention modules; ``disable_attention_calibration(model)`` undoes it.
    """
    modules = _attention_modules(model, layers_path, attn_name)
    n_heads = model.config.num_attention_heads
    by_layer = {}
    for layer, head in heads:
        if not 0 <= layer < len(modules):
            raise ValueError(f"attention calibration: layer {layer} is out of range (layers 0-{len(modules) - 1})")
        if not 0 <= head < n_heads:
            raise ValueError(f"attention calibration: head {head} is out of range (heads 0-{n_heads - 1})")
        if not hasattr(modules[layer], "q_proj") and not hasattr(modules[layer], "qkv_proj"):
            raise ValueError(f"attention calibration: layer {layer} has no attention (it was dropped)")
        by_layer.setdefault(layer, set()).add(head)
    disable_attention_calibration(model, layers_path, attn_name)
    calibrated = []
    for layer, layer_heads in sorted(by_layer.items()):
        module = modules[layer]
        module._act_config = module.config  # to restore
        config = copy.copy(module.config)
        config._attn_implementation = NAME
        module.config = config
        module.act_heads, module.act_beta, module.act_threshold = sorted(layer_heads), float(beta), float(threshold)
        module.act_layer = layer  # the layer this calibration was chosen for (layer_idx may be a KV-cache index)
        calibrated.append(module)
    return calibrated


def disable_attention_calibration(model, layers_path: str = "model.layers", attn_name: str = "self_attn") -> None:
    for module in _attention_modules(model, layers_path, attn_name):
        if hasattr(module, "_act_config"):
            module.config = module._act_config
            for name in ("_act_config", "act_heads", "act_beta", "act_threshold", "act_layer", "_act_state"):
                module.__dict__.pop(name, None)


def apply_config_calibration(model, config) -> None:
    """Honour ``config.attention_calibration`` ({"heads", "beta", "threshold"}) of an exported checkpoint."""
    spec = getattr(config, "attention_calibration", None)
    if not spec or not spec.get("heads"):
        return
    sublayers = getattr(config, "llmdrop_sublayers", None) or {"layers": "model.layers", "attn": ["self_attn"]}
    enable_attention_calibration(
        model,
        spec["heads"],
        spec.get("beta", DEFAULT_BETA),
        spec.get("threshold", DEFAULT_THRESHOLD),
        sublayers["layers"],
        sublayers["attn"][0],
    )


class CalibratedAttentionMixin:
    def __init__(self, config):
        super().__init__(config)
        apply_config_calibration(self, config)


# base model_type -> the export's model class plus calibration; same class names as modeling_llmdrop's. The config
# classes are subclasses of their own too: transformers maps a remote config class to the model class loaded first
# with it (AutoModel's registry), so sharing modeling_llmdrop's config class would let an uncalibrated export loaded
# earlier in the same process (from a folder of the same name) stand in for this one.
def _calibrated(cls):
    config_class = type(cls.config_class.__name__, (cls.config_class,), {"__module__": __name__})
    return type(cls.__name__, (CalibratedAttentionMixin, cls), {"__module__": __name__, "config_class": config_class})


CALIBRATED_MODEL_CLASSES = {base: _calibrated(cls) for base, cls in MODEL_CLASSES.items()}
globals().update({cls.__name__: cls for cls in CALIBRATED_MODEL_CLASSES.values()})
globals().update({cls.config_class.__name__: cls.config_class for cls in CALIBRATED_MODEL_CLASSES.values()})
