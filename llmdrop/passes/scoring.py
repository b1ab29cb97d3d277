"""Importance of every attention sublayer, MLP sublayer and block, from ONE pass over calibration data.

importance = 1 - mean cosine similarity between the residual stream before a part and right after its
residual add (per token, over the hidden dimension, mean over all tokens). Low importance = the part
barely changes the residual stream = redundant. ``metric="angular"`` uses arccos(cos)/pi instead.
``metric="gate-norm"`` needs no calibration data and no pass at all: attention sublayers only, from their query and
key weights (``gatenorm.py``); its importance has no "mlp" or "block" entry.

Three hooks per layer see three residual-stream states: the layer input (h0), the input of the MLP's
pre-norm, i.e. after the attention's residual add (h1), and the layer output (h2). attn: (h0, h1),
mlp: (h1, h2), block: (h0, h2). Only running sums are kept, never hidden states: each batch's similarities
are summed in float32, and those sums accumulate in float64.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmdrop.errors import LlmdropError
from llmdrop.record import SCORES_FORMAT
from llmdrop.source.arch import absent_parts, mask_absent

from .runner import Collector, layer_input, layer_output, run

FORMAT = SCORES_FORMAT
KINDS = ("attn", "mlp", "block")
METRICS = ("cosine", "angular", "gate-norm")
DATA_FREE = ("gate-norm",)  # metrics read from the weights alone: no calibration tokens, no forward pass


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise LlmdropError(f"unknown metric {metric!r}; use {', '.join(METRICS)}")


def needs_tokens(metric: str) -> bool:
    return metric not in DATA_FREE


def scored_kinds(metric: str) -> tuple[str, ...]:
    """The kinds of parts ``metric`` scores (gate-norm: attention sublayers only)."""
    return ("attn",) if metric == "gate-norm" else KINDS


@dataclass
class Scores:
    model: str
    num_layers: int
    metric: str
    calibration: dict
    importance: dict  # kind -> [float] * num_layers
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"format": FORMAT, **asdict(self)}
        d.update(d.pop("extra"))
        return d

    def save(self, path) -> None:
        from llmdrop.files import write_json

        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "Scores":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LlmdropError(f"cannot read scores file {path}: {e}") from None
        if d.get("format") != FORMAT:
            raise LlmdropError(f"{path} is not a llmdrop scores file (format {d.get('format')!r}, expected {FORMAT!r})")
        known = {"model", "num_layers", "metric", "calibration", "importance"}
        extra = {k: v for k, v in d.items() if k not in known | {"format"}}
        return cls(**{k: d[k] for k in known}, extra=extra)


class Similarity(Collector):
    """The scoring collector: running sums (float64, of float32 batch sums) of the per-token similarity of
    (before, after) pairs, per layer and kind, and the number of tokens seen. Sums of several processes add up
    (``llmdrop.passes.distributed.all_reduce``): the sum of sums, never a mean of means."""

    def __init__(self, num_layers: int, metric: str, absent: dict | None = None):
        self.metric = metric
        self.absent = absent or {}  # parts the model no longer has: reported as None
        self.sums = {k: torch.zeros(num_layers, dtype=torch.float64) for k in KINDS}
        self.tokens = 0

    def add(self, kind: str, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cos = F.cosine_similarity(before.float(), after.float(), dim=-1).clamp(-1.0, 1.0)
        value = cos if self.metric == "cosine" else torch.arccos(cos) / math.pi
        self.sums[kind][layer] += value.sum(dtype=torch.float32).item()

    def importance(self) -> dict:
        means = {k: (v / self.tokens).tolist() for k, v in self.sums.items()}
        if self.metric == "cosine":
            means = {k: [1.0 - m for m in v] for k, v in means.items()}  # angular distance grows with importance
        return mask_absent(means, self.absent)

    def attach(self, layer, index: int, adapter, step) -> list:
        """Three hooks see three residual-stream states of layer ``index``: its input (h0), the input of the MLP's
        pre-norm, i.e. after the attention's residual add (h1), and its output (h2)."""
        state = []  # (h0, h1) of the batch in flight

        def on_input(module, args, kwargs):
            h0 = layer_input(args, kwargs)
            state[:] = [h0]
            if index == 0:
                self.tokens += h0.shape[0] * h0.shape[1]

        def on_attn_added(module, args, kwargs):
            h1 = layer_input(args, kwargs)
            self.add("attn", index, state[0], h1)
            state.append(h1)

        def on_output(module, args, kwargs, out):
            h0, h1 = state
            h2 = layer_output(out)
            self.add("mlp", index, h1, h2)
            self.add("block", index, h0, h2)
            state.clear()

        norm = layer.get_submodule(adapter.mlp_input_norm)
        return [
            layer.register_forward_pre_hook(on_input, with_kwargs=True),
            norm.register_forward_pre_hook(on_attn_added, with_kwargs=True),
            layer.register_forward_hook(on_output, with_kwargs=True),
        ]


def importance(
    loaded, tokens: torch.Tensor | None, *, metric: str = "cosine", batch_size: int = 1, progress: bool = True
):
    """{"attn": [...], "mlp": [...], "block": [...]} for the model's current (possibly dropped) layers, in memory or
    streamed (``runner.run``). Under torchrun each rank scores its share of the batches and the sums are
    all-reduced. A data-free metric (``DATA_FREE``) reads the weights instead, ignores ``tokens`` (None is fine) and
    gives only the kinds it scores (gate-norm: {"attn": [...]})."""
    from .distributed import all_reduce

    check_metric(metric)
    if metric == "gate-norm":
        from .gatenorm import gate_norm

        return {"attn": gate_norm(loaded, progress=progress)}
    loaded.adapter.check_layout(loaded.model)
    stats = Similarity(loaded.num_layers, metric, absent_parts(loaded.model.config))
    run(loaded, tokens, [stats], batch_size=batch_size, progress=progress, desc="scoring")
    all_reduce(stats)
    return stats.importance()


def compute_importance(
    model, adapter, tokens: torch.Tensor, *, metric: str = "cosine", batch_size: int = 1, progress: bool = True
) -> dict:
    """``importance`` of a model in memory."""
    from llmdrop.source.models import LoadedModel

    return importance(
        LoadedModel(model, None, adapter, "", ""), tokens, metric=metric, batch_size=batch_size, progress=progress
    )


def stream_importance(
    spec,
    tokens: torch.Tensor,
    *,
    metric: str = "cosine",
    batch_size: int = 1,
    progress: bool = True,
    skeleton=None,
) -> dict:
    """``importance`` of a model streamed from its files (``streaming.load_skeleton(spec)``, or ``skeleton`` if
    loaded already)."""
    from llmdrop.source.streaming import load_skeleton

    return importance(skeleton or load_skeleton(spec), tokens, metric=metric, batch_size=batch_size, progress=progress)
