"""The search of `llmdrop auto`: targets, the quality model, verification and refinement on held-out tokens.

1. The calibration rows are split, by a seeded shuffle, into three disjoint sets: *search* (the cosine prior and the
   single-part losses), *verify* (every plan the search proposes is measured here, never on search rows) and *test*
   (only the chosen plan and the source, once, for the number the report gives).
2. Quality model: the loss increase of each candidate part removed alone, on the search rows (the machinery of
   `--select loss`: the export's own stand-ins swapped in). Candidates: per kind (attention, MLP, block) the
   ``candidates`` lowest by cosine importance; layer 0's attention is never dropped (llama.cpp and vLLM need it).
3. The additive problem is solved exactly (``knapsack``). Single-part losses do not add up (EvoPress), so the best
   few *diverse* plans that meet the target are verified, then refined one move at a time (change one layer's
   option, or move a drop to another layer) while the verified result improves.
"""

import math
import time
from dataclasses import dataclass

import torch

from llmdrop.errors import LlmdropError

from .knapsack import OPTIONS, Plan, best_per_count, predicted_loss

SPLITS = ("search", "verify", "test")


# ---------------------------------------------------------------------------------------------- targets


def parse_fraction(text, option: str) -> float:
    """'10%' or '0.1' -> 0.1; zero, negative or above 100% is one error line."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise LlmdropError(f"bad {option} {text!r}: use a percentage like 10% or a fraction like 0.1") from None
    if not 0 < value <= 1 or math.isnan(value):
        raise LlmdropError(f"bad {option} {text!r}: it must be above 0% and at most 100%")
    return value


@dataclass(frozen=True)
class Target:
    """``speedup`` (at least this many times faster), ``kv`` (at most this fraction of the KV cache) or ``loss``
    (at most this relative perplexity increase on held-out tokens)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, *, speedup=None, max_loss_increase=None, kv_cache=None) -> "Target":
        given = {
            k: v for k, v in (("speedup", speedup), ("loss", max_loss_increase), ("kv", kv_cache)) if v is not None
        }
        if len(given) != 1:
            raise LlmdropError("give one target: --max-loss-increase 10%, --speedup 1.3 or --kv-cache 0.6")
        kind, raw = next(iter(given.items()))
        if kind == "speedup":
            try:
                value = float(raw)
            except ValueError:
                raise LlmdropError(f"bad --speedup {raw!r}: use a number above 1 like 1.3") from None
            if not value > 1 or math.isinf(value):
                raise LlmdropError(f"bad --speedup {raw!r}: it must be above 1 (1.3 = 30% faster)")
            return cls(kind, value)
        return cls(kind, parse_fraction(raw, "--max-loss-increase" if kind == "loss" else "--kv-cache"))

    @property
    def loss_budget(self) -> float:
        """The loss target in nats per token: perplexity x (1 + value)."""
        return math.log1p(self.value)

    def cost_ok(self, costs, counts: tuple[int, int, int]) -> bool:
        """Whether a plan dropping these counts meets a speed / KV target by the cost model (a loss target: always)."""
        if self.kind == "speedup":
            return costs.speedup(counts) >= self.value
        if self.kind == "kv":
            return costs.kv_fraction(counts) <= self.value + 1e-12
        return True

    def key(self, costs, counts: tuple[int, int, int], delta: float) -> tuple | None:
        """What the search minimises for a verified plan; None when it misses the target."""
        if self.kind == "loss":
            return (costs.cost(counts), delta) if delta <= self.loss_budget else None
        return (delta,) if self.cost_ok(costs, counts) else None

    def describe(self) -> str:
        return {
            "speedup": f"at least {self.value:g}x faster",
            "kv": f"at most {self.value:.0%} of the KV cache",
            "loss": f"perplexity at most {self.value:.1%} above the source's",
        }[self.kind]


# ---------------------------------------------------------------------------------------------- tokens


def split_rows(tokens: torch.Tensor, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Disjoint search / verify / test rows of ``tokens`` by a seeded shuffle (``sizes``: rows per split)."""
    needed = sum(sizes.values())
    if len(tokens) < needed:
        raise LlmdropError(
            f"the calibration gives {len(tokens)} rows of {tokens.shape[1]} tokens; search, verify and test need "
            f"{needed} ({', '.join(f'{sizes[s]} {s}' for s in SPLITS)}): give more text or lower --seq-len"
        )
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = {}, 0
    for split in SPLITS:
        out[split] = tokens[sorted(order[start : start + sizes[split]])]
        start += sizes[split]
    return out


class Quality:
    """Loss (nats per token) of the model with a plan's parts removed in memory, per split; counts forward passes."""

    def __init__(self, loaded, rows: dict[str, torch.Tensor], batch_size: int = 1):
        self.loaded, self.rows, self.batch_size = loaded, rows, batch_size
        self.forward_passes = 0
        self.base = {}

    def loss(self, plan: Plan | None, split: str) -> float:
        from llmdrop.planning.select import calibration_loss, removed

        with removed(self.loaded.model, self.loaded.adapter, **(plan.sublayers() if plan else {})):
            value = calibration_loss(self.loaded.model, self.rows[split], self.batch_size)
        self.forward_passes += len(self.rows[split])
        return value

    def delta(self, plan: Plan, split: str) -> float:
        """Loss increase over the source on ``split``."""
        if split not in self.base:
            self.base[split] = self.loss(None, split)
        return self.loss(plan, split) - self.base[split]


# ---------------------------------------------------------------------------------------------- the search


@dataclass
class Verified:
    plan: Plan
    predicted: float  # the sum of single-part losses
    delta: float  # measured on the verify rows
    found_by: str
    measured: float | None = None  # speedup measured on the engine, side by side with the source
    confirmed: float | None = None  # measured again, alone with the source and twice as long

    def row(self, costs) -> dict:
        counts = self.plan.counts
        row = {
            "plan": self.plan.label(),
            "lists": self.plan.lists(),
            "attention_sublayers_dropped": counts[0] + counts[2],
            "mlp_sublayers_dropped": counts[1] + counts[2],
            "blocks_dropped": counts[2],
            "predicted_loss_increase": round(self.predicted, 6),
            "verified_loss_increase": round(self.delta, 6),
            "verified_perplexity_ratio": round(math.exp(self.delta), 6),
            "predicted_speedup": round(costs.speedup(counts), 6),
            "kv_cache_fraction": round(costs.kv_fraction(counts), 6),
            "found_by": self.found_by,
        }
        for key, value in (("measured_speedup", self.measured), ("confirmed_speedup", self.confirmed)):
            if value is not None:
                row[key] = round(value, 6)
        return row


def candidate_options(importance: dict, num_layers: int, candidates: int) -> list[tuple[str, int]]:
    """Per kind, the ``candidates`` parts of lowest cosine importance; layer 0's attention never."""
    out = []
    for kind in OPTIONS:
        layers = [i for i in range(num_layers) if not (kind in ("attn", "block") and i == 0)]
        layers.sort(key=lambda i: (importance[kind][i], i))
        out += [(kind, i) for i in layers[:candidates]]
    return out


class Search:
    """One search: the single-part losses (measured once, on the search rows) and every plan verified so far (on the
    verify rows); ``round`` proposes, verifies and refines for a target, and may be called again with a corrected
    one."""

    def __init__(self, loaded, quality: Quality, costs, *, candidates=16, verify=6, refine=24, progress: bool = True):
        from tqdm.auto import tqdm

        from llmdrop.passes.scoring import compute_importance

        self.quality, self.costs, self.num_layers = quality, costs, loaded.num_layers
        self.verify, self.refine = verify, refine  # plans verified per round, refinement verifications per round
        self.seconds, self.refinement = {}, []
        self.verified: dict[Plan, Verified] = {}
        start = time.perf_counter()
        self.importance = compute_importance(loaded.model, loaded.adapter, quality.rows["search"], progress=False)
        quality.forward_passes += len(quality.rows["search"])
        self.seconds["cosine prior"] = time.perf_counter() - start

        start = time.perf_counter()
        self.deltas = {}
        for option in tqdm(
            candidate_options(self.importance, self.num_layers, candidates),
            disable=not progress,
            desc="single-part losses",
        ):
            self.deltas[option] = quality.delta(Plan(frozenset([option])), "search")
        self.seconds["single-part losses"] = time.perf_counter() - start
        self.table = best_per_count(self.deltas, self.num_layers)

    def check(self, plan: Plan, found_by: str) -> Verified:
        if plan not in self.verified:
            delta = self.quality.delta(plan, "verify")
            self.verified[plan] = Verified(plan, predicted_loss(plan, self.deltas), delta, found_by)
        return self.verified[plan]

    def round(self, target: "Target") -> Verified | None:
        """Verify the best ``verify`` diverse plans of the exact additive optimum that meet ``target`` (and the one-kind
        cosine plans), refine the best; returns the best verified plan for ``target``."""
        start = time.perf_counter()
        for plan in cosine_plans(self.importance, self.deltas, self.costs, target):
            self.check(plan, "cosine")
        for plan in proposals(self.table, self.costs, target, self.verified, self.verify):
            self.check(plan, "knapsack")
        self.seconds["verification"] = self.seconds.get("verification", 0) + time.perf_counter() - start
        start = time.perf_counter()
        self.refinement += refine_plan(
            self.verified, self.deltas, self.costs, target, self.check, self.refine, self.num_layers
        )
        self.seconds["refinement"] = self.seconds.get("refinement", 0) + time.perf_counter() - start
        return incumbent(self.verified.values(), self.costs, target)


def cosine_plans(importance: dict, deltas: dict, costs, target: Target) -> list[Plan]:
    """What `llmdrop drop --attn/--mlp/--blocks N` would drop (the N lowest by cosine importance) for the least N that
    meets a speed / KV target by the cost model: verified beside the search's own plans, so that the result is never
    worse on the verify rows than the one-kind cosine plan of the same speed. Nothing for a loss target."""
    if target.kind == "loss":
        return []
    out = []
    for kind in OPTIONS:
        ranked = sorted((o for o in deltas if o[0] == kind), key=lambda o: (importance[kind][o[1]], o[1]))
        for count in range(1, len(ranked) + 1):
            plan = Plan(frozenset(ranked[:count]))
            if target.cost_ok(costs, plan.counts):
                out.append(plan)
                break
    return out


def proposals(table: dict, costs, target: Target, verified: dict, count: int):
    """The plans to verify, one at a time (a generator: a loss target learns from each verification). Speed / KV
    targets: the plans of least predicted loss that meet the target by the cost model, each differing from the ones
    before by two parts at least. Loss target: the cheapest plan whose predicted loss, scaled by the worst
    verified / predicted ratio so far (single-part losses add up to less than the combination loses), fits the
    budget."""
    states = [(counts, loss, plan) for counts, (loss, plan) in table.items() if any(counts)]
    given = []
    while len(given) < count:
        fresh = [s for s in states if all(s[2].distance(g) >= 2 for g in given)]
        if target.kind == "loss":
            ratios = [v.delta / v.predicted for v in verified.values() if v.predicted > 0]
            scale = max([1.0, *ratios])
            fresh = [s for s in fresh if s[1] * scale <= target.loss_budget]
            fresh.sort(key=lambda s: (costs.cost(s[0]), s[1]))
        else:
            fresh = [s for s in fresh if target.cost_ok(costs, s[0])]
            fresh.sort(key=lambda s: (s[1], costs.cost(s[0])))
        if not fresh:
            return
        given.append(fresh[0][2])
        yield fresh[0][2]


def incumbent(verified, costs, target: Target) -> Verified | None:
    scored = [(target.key(costs, v.plan.counts, v.delta), v) for v in verified]
    scored = [(k, v) for k, v in scored if k is not None]
    return min(scored, key=lambda kv: kv[0])[1] if scored else None


def neighbours(plan: Plan, options: set, num_layers: int) -> list[Plan]:
    """Plans one move away: one layer's option changed (kept, or another measured option), or one drop moved to another
    layer with the same kind."""
    by_layer = {i: k for k, i in plan.parts}
    out = set()
    for layer in range(num_layers):
        here = {(k, i) for k, i in plan.parts if i == layer}
        for kind in (None, *OPTIONS):
            if kind == by_layer.get(layer) or (kind and (kind, layer) not in options):
                continue
            out.add(Plan(frozenset((plan.parts - here) | ({(kind, layer)} if kind else set()))))
    for kind, layer in plan.parts:
        for other in range(num_layers):
            if other not in by_layer and (kind, other) in options:
                out.add(Plan(frozenset((plan.parts - {(kind, layer)}) | {(kind, other)})))
    out.discard(plan)
    return [p for p in out if p.parts]


def refine_plan(verified: dict, deltas: dict, costs, target: Target, check, budget: int, num_layers: int) -> list:
    """Local search from the best verified plan: try the neighbours that the additive model ranks best (and that can
    meet the target), keep the first that verifies better, repeat; at most ``budget`` verifications."""
    steps = []
    while budget > 0:
        best = incumbent(verified.values(), costs, target)
        if best is None:
            return steps
        best_key = target.key(costs, best.plan.counts, best.delta)
        ranked = []
        for plan in neighbours(best.plan, set(deltas), num_layers):
            if plan in verified:
                continue
            counts, guess = plan.counts, predicted_loss(plan, deltas)
            if target.kind == "loss":
                if costs.cost(counts) > best_key[0] + 1e-12:  # only as fast or faster
                    continue
                ranked.append(((costs.cost(counts), guess), plan))
            elif target.cost_ok(costs, counts):
                ranked.append(((guess,), plan))
        ranked.sort(key=lambda r: r[0])
        improved = False
        for _, plan in ranked[: min(budget, 8)]:
            budget -= 1
            tried = check(plan, "refinement")
            key = target.key(costs, plan.counts, tried.delta)
            if key is not None and key < best_key:
                steps.append({"from": best.plan.label(), "to": plan.label(), "verified_loss_increase": tried.delta})
                improved = True
                break
        if not improved:
            return steps
    return steps


def pareto(rows: list[dict], speed_key: str) -> list[dict]:
    """The rows no other row beats on both speed (higher) and loss (lower)."""
    out = []
    for r in rows:
        if not any(
            o is not r
            and o[speed_key] >= r[speed_key]
            and o["verified_loss_increase"] <= r["verified_loss_increase"]
            and (o[speed_key], o["verified_loss_increase"]) != (r[speed_key], r["verified_loss_increase"])
            for o in rows
        ):
            out.append(r)
    return sorted(out, key=lambda r: r[speed_key])
