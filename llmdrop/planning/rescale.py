"""``--compensate scale``: magnitude compensation of every dropped run of sublayers (after Prune&Comp, Chen et al.
2025, and LinearPatch's channel-wise scaling, NeurIPS 2025), folded into the weights that are already there.

A dropped run (consecutive attention / MLP sublayers, a block is both) no longer adds its outputs to the residual
stream, so the stream that reaches the next kept sublayer is smaller than the one the model was trained with: the
"magnitude gap". Every later sublayer then adds its output to a stream that is too small, and its relative
contribution grows. The fix: scale the stream at the cut by alpha, the mean over calibration tokens of
||stream after the run|| / ||stream before it||.

Multiplying the stream by alpha cannot be stored as such (no new tensor), but it need not be: every reader of the
residual stream after the cut is a normalisation (the pre-norms of later sublayers and the final norm) that
ignores a common scale, so "stream x alpha, later outputs as they are" gives the same logits as "stream as it is,
every later sublayer output / alpha". The latter is a fold: the output projection of every later kept sublayer
(attention ``o_proj``, MLP ``down_proj``, every expert's) is divided by the product of the alphas of the runs
before it, and for Gemma's sandwich layout the norm after each sublayer is scaled instead. The export keeps its
format and costs nothing at run time. The fold is exact up to the norms' epsilon.

A per-channel scale (LinearPatch's diag(d), with or without its Hadamard rotation) cannot be folded like this: a
norm divides by the root mean square over channels, which a per-channel scale changes token by token. LinearPatch's
own code applies it as an extra matrix in a hook; docs/selection.md measures it against this scalar.

Runs are fitted in order on the model with the earlier runs removed and compensated, each pass stopping right
after the run (as ``--compensate linear``); with ``--stream`` the folds reach each layer as it is read and the
export writes them into the stored tensors.
"""

import math
import time

import torch

from llmdrop.errors import LlmdropError
from llmdrop.modeling.modeling_llmdrop import DroppedAttention, DroppedMLP
from llmdrop.passes.runner import Collector, layer_input, layer_output, run
from llmdrop.planning.plan import DropPlan, factors_after, position_name, sublayer_runs


def hook_run_ends(layer, index: int, adapter, first: int, last: int, before, after) -> list:
    """Hook decoder layer ``index`` so that ``before(stream)`` sees the residual stream before positions first..last
    and ``after(stream)`` the stream after them. Before: layer first//2's input (the run starts with attention) or
    its post-attention stream (the MLP pre-norm's input); after: the post-attention stream of layer last//2 (the run
    ends with attention) or that layer's output."""
    handles = []
    if index == first // 2:
        module = layer if first % 2 == 0 else layer.get_submodule(adapter.mlp_input_norm)
        handles.append(module.register_forward_pre_hook(lambda m, a, k: before(layer_input(a, k)), with_kwargs=True))
    if index == last // 2:
        if last % 2 == 0:
            module = layer.get_submodule(adapter.mlp_input_norm)
            handles.append(module.register_forward_pre_hook(lambda m, a, k: after(layer_input(a, k)), with_kwargs=True))
        else:
            handles.append(layer.register_forward_hook(lambda m, a, out: after(layer_output(out))))
    return handles


class GapStatistics(Collector):
    """Mean over tokens of ||stream after positions first..last|| / ||stream before them||."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.waiting = {}  # batch -> per-token norms before the run
        self.ratio_sum, self.tokens = 0.0, 0

    def attach(self, layer, index, adapter, step) -> list:
        def before(stream):
            self.waiting[step.batch] = stream.double().norm(dim=-1)

        def after(stream):
            norms = stream.double().norm(dim=-1)
            self.ratio_sum += (norms / self.waiting.pop(step.batch).to(norms.device).clamp_min(1e-30)).sum().item()
            self.tokens += norms.numel()

        return hook_run_ends(layer, index, adapter, self.first, self.last, before, after)


def down_projection(mlp) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (``[hidden, inter]``, or ``[experts, hidden, inter]`` for fused MoE experts) that writes the MLP
    output, and its bias."""
    down = getattr(mlp, "down_proj", None)
    if isinstance(down, torch.nn.Linear):
        return down.weight, down.bias
    experts = getattr(mlp, "experts", None)
    if isinstance(getattr(experts, "down_proj", None), torch.Tensor) and not getattr(experts, "has_bias", False):
        return experts.down_proj, None
    raise LlmdropError(f"--compensate: cannot find the output projection of {type(mlp).__name__}")


def writers(layer, adapter, kind: str) -> list[tuple[torch.Tensor, float]]:
    """The tensors that scale sublayer ``kind``'s (attn / mlp) output when multiplied, with the offset their value
    carries (Gemma's norms multiply by 1 + weight): the sublayer's output projection weight and bias, or for the
    sandwich layout the norm after the sublayer. Empty when the sublayer is a dropped stand-in."""
    module_name, *norms = getattr(adapter, kind)
    if adapter.layout == "sequential sandwich":
        norm = layer.get_submodule(norms[-1])
        return [(norm.weight, adapter.norm_offset)] if isinstance(getattr(norm, "weight", None), torch.Tensor) else []
    module = layer.get_submodule(module_name)
    if isinstance(module, (DroppedAttention, DroppedMLP)):
        return []
    if kind == "attn":
        out = module.o_proj
        return [(p, 0.0) for p in (out.weight, out.bias) if p is not None]
    return [(p, 0.0) for p in down_projection(module) if p is not None]


def stored_writers(adapter, layer: int, kind: str) -> list[tuple[str, float]]:
    """``writers`` by stored tensor name (the streamed export): dense layouts only."""
    module_name, *norms = getattr(adapter, kind)
    prefix = f"{adapter.layers}.{layer}"
    if adapter.layout == "sequential sandwich":
        return [(f"{prefix}.{norms[-1]}.weight", adapter.norm_offset)]
    proj = "o_proj" if kind == "attn" else "down_proj"
    return [(f"{prefix}.{module_name}.{proj}.{part}", 0.0) for part in ("weight", "bias")]


def scaled(tensor: torch.Tensor, factor: float, offset: float) -> torch.Tensor:
    """The tensor whose effect is ``factor`` times this one's: w * f, or (offset + w) * f - offset (float64)."""
    return ((tensor.double() + offset) * factor - offset).to(tensor.dtype)


@torch.no_grad()
def fold_layer(layer, adapter, index: int, factors: dict[int, float]) -> None:
    """Scale the outputs of layer ``index``'s kept sublayers by their factors (``factors``: position -> factor)."""
    for kind, pos in (("attn", 2 * index), ("mlp", 2 * index + 1)):
        if factors.get(pos, 1.0) != 1.0:
            for tensor, offset in writers(layer, adapter, kind):
                tensor.copy_(scaled(tensor, factors[pos], offset))


def check_streamed(loaded, plan: DropPlan) -> None:
    """A streamed export scales stored tensors by name: refuse a model that stores its output projections otherwise
    (sparse-MoE experts), before any pass."""
    from llmdrop.source.stored import stored_tensors

    stored = stored_tensors(loaded.info["weights_folder"])
    first_cut = sublayer_runs(plan)[0][1]
    for pos in range(first_cut + 1, 2 * loaded.num_layers):
        layer, kind = pos // 2, ("attn", "mlp")[pos % 2]
        name = stored_writers(loaded.adapter, layer, kind)[0][0]
        if name not in stored and not _dropped(plan, kind, layer):
            raise LlmdropError(
                f"--stream --compensate scale scales {name}, which this checkpoint does not store "
                f"({loaded.adapter.model_type}); compensate without --stream"
            )


def _dropped(plan: DropPlan, kind: str, layer: int) -> bool:
    return layer in plan.blocks or layer in (plan.attn if kind == "attn" else plan.mlp)


def stored_replacements(adapter, factors: dict[int, float]) -> dict:
    """The folds of a streamed model as ``stream_export.write_weights`` replacements."""
    out = {}
    for pos, factor in factors.items():  # a dropped sublayer's tensors are not exported: harmless, and skipped
        for name, offset in stored_writers(adapter, pos // 2, "attn" if pos % 2 == 0 else "mlp"):
            out[name] = lambda t, f=factor, o=offset: scaled(t, f, o)
    return out


def compensate_scale(
    loaded, plan: DropPlan, tokens: torch.Tensor, *, batch_size: int = 1, progress: bool = True
) -> tuple[dict, dict]:
    """Fit alpha for every dropped run of ``plan`` and fold it (the plan itself is applied later by the export). A
    model in memory is folded in place; a streamed one gets the folds as it is read, and the export writes them.
    Returns the record for llmdrop.json and the streamed export's replacements (empty in memory)."""
    from llmdrop.passes.runner import is_streamed
    from llmdrop.planning.select import removed

    model, adapter = loaded.model, loaded.adapter
    if plan.empty:
        raise LlmdropError("--compensate scale rescales what follows a dropped part; this plan drops nothing")
    streamed = is_streamed(loaded)
    if streamed:
        check_streamed(loaded, plan)
    start, fitted, attn, mlp = time.perf_counter(), [], [], []
    layers = adapter.layer_list(model)

    def prepare(layer, index):  # a streamed layer, just read from the files: the folds fitted so far
        fold_layer(layer, adapter, index, factors_after(fitted, loaded.num_layers))

    for first, last in sublayer_runs(plan):
        collector = GapStatistics(first, last)
        with removed(model, adapter, attn=attn, mlp=mlp):
            run(loaded, tokens, [collector], batch_size=batch_size, progress=progress, desc="compensate",
                until=last // 2, prepare=prepare)  # fmt: skip
        alpha = collector.ratio_sum / collector.tokens
        if not streamed:  # fold this run's 1 / alpha into every later kept sublayer now
            for i in range(last // 2, loaded.num_layers):
                fold_layer(layers[i], adapter, i, {p: 1.0 / alpha for p in (2 * i, 2 * i + 1) if p > last})
        fitted.append({"positions": [first, last], "scale": alpha, "tokens": collector.tokens})
        attn += [p // 2 for p in range(first, last + 1) if p % 2 == 0]
        mlp += [p // 2 for p in range(first, last + 1) if p % 2 == 1]
    record = {
        "method": "scale",
        "estimate": "per run: mean over calibration tokens of ||residual stream after the run|| / ||before it|| "
        "(alpha), on the model with the earlier runs dropped and compensated",
        "folded_into": "every later kept sublayer's output projection (attention o_proj, MLP down_proj; the "
        "post-sublayer norm for sandwich layouts), divided by the product of the alphas before it",
        "runs": [
            {"from": position_name(r["positions"][0]), "to": position_name(r["positions"][1]), **r} for r in fitted
        ],
        "forward_passes": len(fitted) * math.ceil(len(tokens) / batch_size),
        "seconds": round(time.perf_counter() - start, 3),
    }
    factors = factors_after(fitted, loaded.num_layers)
    return record, stored_replacements(adapter, factors) if streamed else {}
