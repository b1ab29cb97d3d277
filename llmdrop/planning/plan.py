"""Turn importance scores and a request ("drop 8 attention layers", "3,5,20-29") into a DropPlan."""

import math
from dataclasses import dataclass, field

from llmdrop.errors import LlmdropError


@dataclass
class DropPlan:
    """What to remove, in the *source* model's 0-based layer numbering."""

    num_layers: int
    blocks: list[int] = field(default_factory=list)
    attn: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    method: str = "explicit"

    def __post_init__(self):
        for name in ("blocks", "attn", "mlp"):
            values = sorted(set(getattr(self, name)))
            bad = [i for i in values if not 0 <= i < self.num_layers]
            if bad:
                raise LlmdropError(
                    f"{name} layer {bad[0]} is out of range: the model has layers 0-{self.num_layers - 1}"
                )
            setattr(self, name, values)
        # A layer that loses both sublayers is a whole block: remove it physically instead.
        both = set(self.attn) & set(self.mlp)
        self.blocks = sorted(set(self.blocks) | both)
        self.attn = [i for i in self.attn if i not in self.blocks]
        self.mlp = [i for i in self.mlp if i not in self.blocks]
        if len(self.blocks) >= self.num_layers:
            raise LlmdropError(f"the plan removes all {self.num_layers} layers; keep at least one")

    @property
    def empty(self) -> bool:
        return not (self.blocks or self.attn or self.mlp)

    @property
    def kept_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.blocks)]

    def layer_map(self) -> dict[int, int]:
        """source layer -> exported layer, for the layers that survive."""
        return {src: dst for dst, src in enumerate(self.kept_layers)}

    def exported_sublayers(self) -> tuple[list[int], list[int]]:
        """(attn, mlp) drop lists in the exported (renumbered) numbering."""
        m = self.layer_map()
        return [m[i] for i in self.attn], [m[i] for i in self.mlp]

    def without_empty_layers(self, absent: dict) -> "DropPlan":
        """This plan with every layer it would leave with neither attention nor MLP (one sublayer dropped here, the
        other gone already in the source export: ``absent``) removed as a whole block instead."""
        empty = {i for i in self.attn if i in absent.get("mlp", ())} | {
            i for i in self.mlp if i in absent.get("attn", ())
        }
        if not empty:
            return self
        return DropPlan(
            self.num_layers,
            blocks=[*self.blocks, *empty],
            attn=[i for i in self.attn if i not in empty],
            mlp=[i for i in self.mlp if i not in empty],
            method=self.method,
        )

    def with_absent_parts(self, absent: dict) -> "DropPlan":
        """This plan plus the sublayers the source (an export) lacks already: what a format that states every
        layer's parts (GGUF) must leave out."""
        if not (absent.get("attn") or absent.get("mlp")):
            return self
        blocks = set(self.blocks)
        return DropPlan(
            self.num_layers,
            blocks=self.blocks,
            attn=sorted((set(self.attn) | set(absent.get("attn", ()))) - blocks),
            mlp=sorted((set(self.mlp) | set(absent.get("mlp", ()))) - blocks),
            method=self.method,
        )

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "blocks": self.blocks,
            "attn": self.attn,
            "mlp": self.mlp,
            "method": self.method,
        }

    def describe(self) -> str:
        parts = [
            f"{len(v)} {k}" for k, v in (("blocks", self.blocks), ("attention", self.attn), ("MLP", self.mlp)) if v
        ]
        return ", ".join(parts) or "nothing"


def parse_layers(text: str | None, num_layers: int | None = None) -> list[int]:
    """'3,5,20-29' -> [3, 5, 20, ..., 29]; ranges are inclusive. Empty or None -> []."""
    if not text:
        return []
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise LlmdropError(f"bad layer list {text!r}: use 0-based numbers and ranges like 3,5,20-29") from None
    if num_layers is not None:
        bad = [i for i in out if not 0 <= i < num_layers]
        if bad:
            raise LlmdropError(f"layer {bad[0]} is out of range: the model has layers 0-{num_layers - 1}")
    return sorted(set(out))


def _lowest(importance: list[float | None], n: int, exclude: set[int], what: str) -> list[int]:
    # None: a part the model no longer has (an export dropped it already), never a candidate
    candidates = [i for i in range(len(importance)) if i not in exclude and importance[i] is not None]
    if n > len(candidates):
        raise LlmdropError(f"cannot drop {n} {what}: only {len(candidates)} are left to choose from")
    # ties broken by layer index so the choice is deterministic
    return sorted(sorted(candidates, key=lambda i: (importance[i], i))[:n])


def select(
    importance: dict,
    *,
    attn: int = 0,
    mlp: int = 0,
    blocks: int = 0,
    joint: int = 0,
    attn_layers: list[int] = (),
    mlp_layers: list[int] = (),
    block_layers: list[int] = (),
) -> DropPlan:
    """Explicit lists first, then the N lowest-importance blocks, attention, MLP and joint sublayers. ``importance``
    may lack the kinds its metric does not score (gate-norm: attention only) as long as no count needs them."""
    num_layers = len(next(iter(importance.values())))
    for kind, n in (("block", blocks), ("attn", attn or joint), ("mlp", mlp or joint)):
        if n and kind not in importance:
            raise LlmdropError(f"these scores rank no {kind} parts (only {', '.join(importance)}): cannot count them")
    importance = {kind: importance.get(kind, [None] * num_layers) for kind in ("attn", "mlp", "block")}
    for name, n in (("attn", attn), ("mlp", mlp), ("blocks", blocks), ("joint", joint)):
        if n < 0:
            raise LlmdropError(f"--{name} must be >= 0 (got {n})")
    chosen_blocks = set(block_layers)
    chosen_blocks |= set(_lowest(importance["block"], blocks, chosen_blocks, "blocks"))
    chosen_attn = set(attn_layers) | set(
        _lowest(importance["attn"], attn, chosen_blocks | set(attn_layers), "attention sublayers")
    )
    chosen_mlp = set(mlp_layers) | set(
        _lowest(importance["mlp"], mlp, chosen_blocks | set(mlp_layers), "MLP sublayers")
    )
    if joint:
        pool = [
            (importance[kind][i], i, kind)
            for kind, chosen in (("attn", chosen_attn), ("mlp", chosen_mlp))
            for i in range(num_layers)
            if i not in chosen_blocks | chosen and importance[kind][i] is not None
        ]
        if joint > len(pool):
            raise LlmdropError(f"cannot drop {joint} sublayers jointly: only {len(pool)} are left to choose from")
        for _, i, kind in sorted(pool)[:joint]:
            (chosen_attn if kind == "attn" else chosen_mlp).add(i)
    explicit = bool(attn_layers or mlp_layers or block_layers)
    counted = bool(attn or mlp or blocks or joint)
    method = "explicit+scores" if explicit and counted else ("explicit" if explicit else "scores")
    plan = DropPlan(num_layers, sorted(chosen_blocks), sorted(chosen_attn), sorted(chosen_mlp), method)
    if plan.empty:
        raise LlmdropError("nothing to drop: give --attn/--mlp/--blocks/--joint N or explicit layer lists")
    return plan


def skip_attention_layers(num_layers: int, start: int) -> list[int]:
    """The attention layers that ``skip-attention`` from ``start`` removes (and the export drops)."""
    if not 0 <= start < num_layers:
        raise LlmdropError(f"--skip-attention-from {start} is out of range: the model has layers 0-{num_layers - 1}")
    return list(range(start, num_layers))


def layers(value, num_layers: int) -> list[int]:
    """A CLI string ('3,5,20-29') or a Python list of layers, checked against the model."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return parse_layers(text, num_layers)


# --------------------------------------------------------------------------- sublayer positions (--compensate scale)


def sublayer_runs(plan: DropPlan) -> list[tuple[int, int]]:
    """The plan's dropped sublayers as runs of positions (2 l: layer l's attention, 2 l + 1: its MLP), in order."""
    gone = sorted({2 * i for i in (*plan.blocks, *plan.attn)} | {2 * i + 1 for i in (*plan.blocks, *plan.mlp)})
    out = []
    for pos in gone:
        if out and out[-1][1] == pos - 1:
            out[-1] = (out[-1][0], pos)
        else:
            out.append((pos, pos))
    return out


def position_name(pos: int) -> str:
    return f"{'attn' if pos % 2 == 0 else 'mlp'} {pos // 2}"


def run_label(run: dict) -> str:
    """A recorded run's parts for people: "attn 5", "block 3", "blocks 12-15", or "mlp 5 - attn 7"."""
    (kind_a, a), (kind_b, b) = (run[k].split() for k in ("from", "to"))
    if (kind_a, kind_b) == ("attn", "mlp"):  # whole blocks
        return f"block {a}" if a == b else f"blocks {a}-{b}"
    return run["from"] if run["from"] == run["to"] else f"{run['from']} - {run['to']}"


def factors_after(runs: list[dict], num_layers: int) -> dict[int, float]:
    """position -> the product of 1 / alpha over the runs (``positions`` [first, last], ``scale``) that end before
    it (1.0 omitted)."""
    out = {}
    for pos in range(2 * num_layers):
        f = math.prod(1.0 / r["scale"] for r in runs if r["positions"][1] < pos)
        if f != 1.0:
            out[pos] = f
    return out
