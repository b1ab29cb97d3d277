"""Selectors: which parts to drop, beyond the one-shot cosine ranking of ``plan.select``.

- ``cosine``: the lowest importance (``llmdrop.passes.scoring``), chosen in one shot (LLM-Drop).
- ``loss``: greedy search on the calibration loss (BlockPruner, SLEB, FinerCut): at every step, remove the
  candidate whose removal gives the lowest next-token cross-entropy on a subset of the calibration tokens,
  with the parts already chosen removed. The parts are made identities with the very stand-ins an export uses
  (``DroppedAttention`` / ``DroppedMLP``, norms -> ``Identity``), swapped in and back out for each evaluation.
  The candidates are pre-filtered to the ``candidates`` lowest by cosine importance.
- ``angular-contiguous``: the run of n blocks l..l+n-1 whose input and output, on the last token of each
  calibration sample, are closest: min over l of mean arccos(cos(h_l, h_{l+n})) / pi (Gromov et al. 2024).
- ``reverse``: the last parts before the final layer (the last layer itself is kept; "Reassessing Layer
  Pruning", Lu et al. 2024).

Every selector returns a DropPlan and a record (selector, parameters, per-candidate numbers, time) that goes
into the export's ``llmdrop.json``.
"""

import math
import time
from contextlib import contextmanager

import torch
from torch import nn

from llmdrop.errors import LlmdropError
from llmdrop.modeling.modeling_llmdrop import DroppedAttention, DroppedMLP
from llmdrop.passes.runner import Collector, layer_input, layer_output, run

from .plan import DropPlan

DEFAULT_LOSS_SAMPLES = 8


# --------------------------------------------------------------------------- in-memory removal


@contextmanager
def removed(model, adapter, attn=(), mlp=()):
    """Make these attention / MLP sublayers (current numbering; a block is both) add nothing to the residual
    stream, with the stand-ins of llmdrop's exports, and put the original modules back on exit."""
    layers = adapter.layer_list(model)
    saved = []
    try:
        for kind, which, stand_in in (("attn", attn, DroppedAttention), ("mlp", mlp, DroppedMLP)):
            module, *norms = getattr(adapter, kind)
            for i in which:
                for name, new in ((module, stand_in()), *((norm, nn.Identity()) for norm in norms)):
                    saved.append((layers[i], name, getattr(layers[i], name)))
                    setattr(layers[i], name, new)
        yield model
    finally:
        for layer, name, original in reversed(saved):
            setattr(layer, name, original)


def _parts(dropped: set) -> dict:
    """{(kind, layer)} with kind in attn / mlp / block -> removed()'s keyword arguments."""
    attn = sorted({i for k, i in dropped if k in ("attn", "block")})
    mlp = sorted({i for k, i in dropped if k in ("mlp", "block")})
    return {"attn": attn, "mlp": mlp}


def _plan(num_layers: int, dropped: set, method: str) -> DropPlan:
    parts = _parts(dropped)
    return DropPlan(num_layers, blocks=[], attn=parts["attn"], mlp=parts["mlp"], method=method)


def _name(kind: str, layer: int) -> str:
    return f"{kind}{layer}"


# --------------------------------------------------------------------------- loss


@torch.no_grad()
def calibration_loss(model, tokens: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy of ``model`` on ``tokens`` (nats per token)."""
    from llmdrop.passes.evaluation import perplexity

    return perplexity(model, tokens, batch_size=batch_size, progress=False)["nll"]


def _eligible(kind: str, num_layers: int, dropped: set, absent: dict | None = None) -> list[tuple[str, int]]:
    """The parts of this kind that are still there (joint: attention and MLP sublayers): neither chosen already
    (``dropped``) nor missing from the model (``absent``: an export's own drops; a block that lost one sublayer
    still has the other)."""
    gone = _parts(dropped)
    absent = absent or {}
    out = []
    for k in ("attn", "mlp") if kind == "joint" else (kind,):
        for i in range(num_layers):
            if k == "block":
                if i not in gone["attn"] and i not in gone["mlp"]:
                    out.append((k, i))
            elif i not in gone[k] and i not in absent.get(k, ()):
                out.append((k, i))
    return out


def default_candidates(count: int) -> int:
    """Pre-filter size when --candidates is not given: twice the number of parts to drop."""
    return 2 * count


def loss_search(
    model,
    adapter,
    tokens: torch.Tensor,
    importance: dict,
    *,
    attn: int = 0,
    mlp: int = 0,
    blocks: int = 0,
    joint: int = 0,
    candidates: int | None = None,
    loss_samples: int = DEFAULT_LOSS_SAMPLES,
    batch_size: int = 1,
    progress: bool = True,
    absent: dict | None = None,
) -> tuple[DropPlan, dict]:
    """Greedy removal by calibration loss; ``importance`` (cosine scores) pre-filters the candidates; ``absent``
    parts (an export's own drops) are never candidates."""
    from tqdm.auto import tqdm

    num_layers = len(importance["block"])
    subset = tokens[:loss_samples]
    dropped: set = set()
    requests = [(k, c) for k, c in (("block", blocks), ("attn", attn), ("mlp", mlp), ("joint", joint)) if c]
    # The pools are fixed per request when it starts; their sizes fix the number of evaluations up front.
    pools, plan_sizes, ahead = [], [], set()
    for kind, count in requests:
        eligible = _eligible(kind, num_layers, ahead, absent)
        k = min(len(eligible), candidates or default_candidates(count))
        if count > k:
            raise LlmdropError(
                f"cannot drop {count} {kind} parts by loss from {k} candidates"
                + (" (raise --candidates)" if k < len(eligible) else "")
            )
        pool = sorted(eligible, key=lambda p: (importance[p[0]][p[1]], p[1]))[:k]
        pools.append(pool)
        plan_sizes.append(sum(k - s for s in range(count)))
        # assume the request's lowest-cosine parts go, only to size the next pools (the real choice may differ)
        ahead |= set(pool[:count])
    evaluations = sum(plan_sizes)
    batches = math.ceil(len(subset) / batch_size)
    start = time.perf_counter()
    base = calibration_loss(model, subset, batch_size)
    steps = []
    bar = tqdm(total=evaluations, desc="loss search", unit="eval", disable=not progress)
    try:
        for (kind, count), pool in zip(requests, pools):
            pool = [p for p in pool if p in _eligible(kind, num_layers, dropped, absent)]
            if count > len(pool):
                raise LlmdropError(f"cannot drop {count} {kind} parts by loss: only {len(pool)} candidates are left")
            for _ in range(count):
                losses = {}
                for part in pool:
                    with removed(model, adapter, **_parts(dropped | {part})):
                        losses[part] = calibration_loss(model, subset, batch_size)
                    bar.update()
                best = min(pool, key=lambda p: (losses[p], pool.index(p)))  # ties: the lower cosine importance
                dropped.add(best)
                pool.remove(best)
                steps.append(
                    {
                        "kind": best[0],
                        "layer": best[1],
                        "loss": losses[best],
                        "candidates": {_name(*p): round(v, 6) for p, v in losses.items()},
                    }
                )
    finally:
        bar.close()
    plan = _plan(num_layers, dropped, "loss")
    record = {
        "selector": "loss",
        "objective": "mean next-token cross-entropy on the calibration subset (nats/token)",
        "candidates": {kind: [_name(*p) for p in pool] for (kind, _), pool in zip(requests, pools)},
        "loss_samples": len(subset),
        "loss_tokens": subset.numel(),
        "base_loss": base,
        "evaluations": evaluations,
        "forward_passes": (evaluations + 1) * batches,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return plan, record


# --------------------------------------------------------------------------- angular-contiguous


class LastTokenStates(Collector):
    """The angular-distance collector: the last token's residual stream entering every layer and leaving the last
    one, per calibration sample (float32 on the CPU: one vector per sample and layer)."""

    def __init__(self, num_layers: int):
        self.n = num_layers
        self.states = {}  # (layer, batch) -> [batch rows, hidden]; layer n: the last layer's output

    def attach(self, layer, index, adapter, step) -> list:
        def on_input(module, args, kwargs):
            self.states[index, step.batch] = layer_input(args, kwargs)[:, -1].float().cpu()

        def on_output(module, args, out):
            self.states[self.n, step.batch] = layer_output(out)[:, -1].float().cpu()

        handles = [layer.register_forward_pre_hook(on_input, with_kwargs=True)]
        if index == self.n - 1:
            handles.append(layer.register_forward_hook(on_output))
        return handles

    def distances(self) -> torch.Tensor:
        """[L+1, L+1] mean over samples of arccos(cos(h_a, h_b)) / pi."""
        sums, samples = torch.zeros(self.n + 1, self.n + 1, dtype=torch.float64), 0
        for b in sorted({b for _, b in self.states}):
            h = torch.nn.functional.normalize(torch.stack([self.states[i, b] for i in range(self.n + 1)]), dim=-1)
            cos = torch.einsum("abh,cbh->acb", h, h).clamp(-1.0, 1.0)  # [L+1, L+1, B]
            sums += (torch.arccos(cos) / math.pi).sum(-1).double()
            samples += h.shape[1]
        return sums / samples


def last_token_distances(loaded, tokens: torch.Tensor, *, batch_size: int = 1, progress: bool = True):
    """[L+1, L+1] mean over samples of arccos(cos(h_a, h_b)) / pi on the last token, h_l the input of layer l and
    h_L the last layer's output (the residual stream before the final norm); in memory or streamed."""
    states = LastTokenStates(loaded.num_layers)
    run(loaded, tokens, [states], batch_size=batch_size, progress=progress, desc="angular")
    return states.distances()


def angular_contiguous(
    loaded, tokens: torch.Tensor, blocks: int, *, batch_size: int = 1, progress: bool = True
) -> tuple[DropPlan, dict]:
    num_layers = loaded.num_layers
    if not 0 < blocks < num_layers:
        raise LlmdropError(f"cannot drop {blocks} contiguous blocks of {num_layers}: keep at least one")
    start = time.perf_counter()
    d = last_token_distances(loaded, tokens, batch_size=batch_size, progress=progress)
    per_start = [d[ell, ell + blocks].item() for ell in range(num_layers - blocks + 1)]
    best = min(range(len(per_start)), key=lambda ell: (per_start[ell], ell))
    plan = DropPlan(num_layers, blocks=list(range(best, best + blocks)), method="angular-contiguous")
    record = {
        "selector": "angular-contiguous",
        "n": blocks,
        "distance": "mean over samples of arccos(cos(h_l, h_l+n)) / pi on the last token; h_L before the final norm",
        "start": best,
        "distances": {str(ell): round(v, 6) for ell, v in enumerate(per_start)},
        "forward_passes": math.ceil(len(tokens) / batch_size),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return plan, record


# --------------------------------------------------------------------------- reverse


def reverse(
    num_layers: int, *, attn: int = 0, mlp: int = 0, blocks: int = 0, joint: int = 0, absent: dict | None = None
) -> tuple[DropPlan, dict]:
    """The last parts before the final layer: blocks L-2, L-3, ...; then attention / MLP sublayers of the layers
    below, from the top; joint takes sublayers in reverse order of execution (MLP L-2, attention L-2, MLP L-3...).
    The final layer is never chosen."""
    dropped: set = set()
    for kind, count in (("block", blocks), ("attn", attn), ("mlp", mlp), ("joint", joint)):
        order = _eligible(kind, num_layers - 1, dropped, absent)
        order.sort(key=lambda p: (-p[1], p[0] == "attn"))  # highest layer first; in a layer, MLP before attention
        if count > len(order):
            raise LlmdropError(
                f"cannot drop {count} {kind} parts in reverse order: {len(order)} are left below the final layer"
            )
        dropped |= set(order[:count])
    plan = _plan(num_layers, dropped, "reverse")
    chosen = [_name(*p) for p in sorted(dropped, key=lambda p: (-p[1], p[0]))]
    return plan, {"selector": "reverse", "rule": "the last parts before the final layer (kept)", "order": chosen}


# --------------------------------------------------------------------------- iterative


def iterative(loaded, tokens, request, *, progress: bool = True) -> tuple[DropPlan, list[dict], dict]:
    """Drop one part at a time, re-scoring the (in-memory) dropped model after each drop; returns the plan, the
    steps and the first scores."""
    from llmdrop.passes.scoring import compute_importance
    from llmdrop.planning.surgery import drop_sublayers

    n = loaded.num_layers
    dropped = {"attn": set(), "mlp": set()}
    steps, first = [], None
    for kind, count in (
        ("block", request.blocks),
        ("attn", request.attn),
        ("mlp", request.mlp),
        ("joint", request.joint),
    ):
        for _ in range(count):
            imp = compute_importance(
                loaded.model,
                loaded.adapter,
                tokens,
                metric=request.metric,
                batch_size=request.batch_size,
                progress=progress,
            )
            first = first or imp
            kinds = ("attn", "mlp") if kind == "joint" else (kind,)
            candidates = []
            for k in kinds:
                for i in range(n):
                    gone = imp["attn"][i] is None and imp["mlp"][i] is None  # None: dropped (now or in the source)
                    if not gone and imp[k][i] is not None:
                        candidates.append((imp[k][i], i, k))
            if not candidates:
                raise LlmdropError(f"cannot drop more {kind} parts: none left")
            value, layer, k = min(candidates)
            for part in ("attn", "mlp") if k == "block" else (k,):
                dropped[part].add(layer)
            steps.append({"kind": k, "layer": layer, "importance": value})
            drop_sublayers(loaded.model, loaded.adapter, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]))
    plan = DropPlan(n, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]), method="iterative")
    return plan, steps, first


def describe_records(selection: dict | None, compensation: dict | None) -> list[str]:
    """One human line each about how the parts were chosen and compensated (for `llmdrop drop`)."""
    from llmdrop.planning.plan import run_label

    lines = []
    if selection and selection["selector"] != "cosine":
        cost = f", {selection['forward_passes']} forward passes" if "forward_passes" in selection else ""
        seconds = selection.get("seconds_total", selection.get("seconds", 0.0))
        lines.append(f"chosen by --select {selection['selector']} in {seconds:.1f} s{cost}")
    for entry in (compensation or {}).get("runs", []):
        if compensation["method"] == "scale":
            lines.append(
                f"{run_label(entry)} compensated: residual stream x {entry['scale']:.3f} ({entry['tokens']} "
                "tokens), folded into the later output projections"
            )
            continue
        first, last = entry["layers"]
        if "skipped" in entry:
            lines.append(f"blocks {first}-{last} not compensated: {entry['skipped']}")
        else:
            lines.append(
                f"blocks {first}-{last} compensated in the {entry['folded_into']}: calibration error "
                f"{entry['relative_error_plain_drop']:.3f} -> {entry['relative_error_compensated']:.3f} (relative, "
                f"{entry['tokens']} tokens)"
            )
    return lines
