"""The additive problem of `llmdrop auto`, solved exactly.

Every layer takes one option: keep it, drop its attention, drop its MLP, or drop the whole block; every option has a
predicted loss increase (its single-part loss, measured). The cost model charges every layer the same for each
option (the layers of a decoder are alike; a whole block saves more than its two sublayers, as the layer itself
goes), so a plan's cost depends only on how many options of each kind it takes. A dynamic program over (layers seen,
attention-only drops, MLP-only drops, blocks) therefore gives, for every count of each kind, the plan of least
predicted loss: at most (L + 1)³ states, four options each, no solver and no rounding. Any target (a speed, a KV
cache size, a loss budget) then picks among those plans.
"""

from dataclasses import dataclass

# the kinds of drop a layer can take; a plan's counts are in this order
OPTIONS = ("attn", "mlp", "block")


@dataclass(frozen=True)
class Plan:
    """A set of dropped parts, (kind, layer) with kind in OPTIONS; at most one per layer."""

    parts: frozenset

    @property
    def counts(self) -> tuple[int, int, int]:
        """(attention-only drops, MLP-only drops, blocks)."""
        return tuple(sum(1 for k, _ in self.parts if k == kind) for kind in OPTIONS)

    def lists(self) -> dict:
        """{"blocks", "attn", "mlp"}: sorted layer lists, as a DropPlan takes them."""
        return {
            name: sorted(i for k, i in self.parts if k == kind)
            for name, kind in (("blocks", "block"), ("attn", "attn"), ("mlp", "mlp"))
        }

    def sublayers(self) -> dict:
        """{"attn", "mlp"}: the sublayers it removes (a block is both), as ``planning.select.removed`` takes them."""
        return {kind: sorted(i for k, i in self.parts if k in (kind, "block")) for kind in ("attn", "mlp")}

    def label(self) -> str:
        """'blocks 3,12 + attn 5-7' (layer runs collapsed)."""
        out = [f"{name} {runs(layers)}" for name, layers in self.lists().items() if layers]
        return " + ".join(out) or "none"

    def distance(self, other: "Plan") -> int:
        return len(self.parts ^ other.parts)


def runs(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5,9'."""
    out, start = [], None
    for i, v in enumerate(layers):
        start = v if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ",".join(out)


def predicted_loss(plan: Plan, deltas: dict) -> float:
    return sum(deltas[p] for p in plan.parts)


def best_per_count(deltas: dict, num_layers: int) -> dict[tuple[int, int, int], tuple[float, Plan]]:
    """For every count of each kind (``Plan.counts``) reachable with the measured options ``deltas`` ({(kind, layer):
    predicted loss increase}; an option that is not there cannot be chosen), the least total predicted loss and a plan
    reaching it. Exact: the DP keeps, per counts, the best partial plan over the layers seen so far."""
    best = {(0, 0, 0): (0.0, ())}
    for layer in range(num_layers):
        options = [(k, d) for (k, i), d in deltas.items() if i == layer]
        step = dict(best)  # keep the layer
        for counts, (loss, parts) in best.items():
            for kind, delta in options:
                k = OPTIONS.index(kind)
                key, value = (*counts[:k], counts[k] + 1, *counts[k + 1 :]), loss + delta
                if key not in step or value < step[key][0]:
                    step[key] = (value, (*parts, (kind, layer)))
        best = step
    return {key: (loss, Plan(frozenset(parts))) for key, (loss, parts) in best.items()}
