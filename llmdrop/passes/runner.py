"""One runner for every hooked pass over calibration tokens; collectors observe.

``run`` pushes token batches through a model's decoder layers and lets collectors watch each layer through hooks.
How the model is run is the runner's business, what is collected the collectors':

- in memory: the model's own forward, batch after batch, every collector hooked on every layer;
- streamed: the model is a skeleton on the meta device (``streaming.load_skeleton``); what comes before the first
  layer runs through the model's own forward once per batch (embedding, rotary embedding, masks: a stand-in per
  layer records the arguments it is handed), then each layer in turn is read from the safetensors files, every
  batch goes through it with the collectors hooked on it, and it is freed. Peak memory: one layer plus the
  calibration activations (on the CPU, in the model's dtype);
- under torchrun each rank runs its share of the batches (``batch_starts``); collectors that keep sums
  reduce them over the ranks themselves.

The order differs (batch-major in memory, layer-major streamed), so a collector keys what it keeps by
``Step.batch`` (the batch in flight, the same index in both orders) and never assumes one order. ``until`` stops
after that layer (nothing after it is needed); ``prepare(layer, index)`` edits a streamed layer right after it is
read (an edit of a model in memory is made on the model itself).
"""

import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from llmdrop.source.models import LoadedModel


@dataclass
class Step:
    """What the runner is doing now: the index of the batch in flight (shared with every collector)."""

    batch: int = 0


class Collector:
    """Observes a pass. ``attach`` hooks decoder layer ``index`` and returns the handles (the runner removes them)."""

    def attach(self, layer: nn.Module, index: int, adapter, step: Step) -> list:
        raise NotImplementedError


class _Stop(Exception):
    """Raised once the last layer a pass needs has run: nothing after it is needed."""


def layer_input(args, kwargs) -> torch.Tensor:
    """The residual stream a decoder layer (or a norm) is called with."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_output(out) -> torch.Tensor:
    """The residual stream a decoder layer returns (a tensor, or a tuple starting with it)."""
    return out[0] if isinstance(out, tuple) else out


def batch_starts(n_tokens: int, batch_size: int) -> list[int]:
    """First row of every batch; under torchrun, only this rank's share (every world_size-th batch)."""
    from .distributed import rank_and_world

    rank, world = rank_and_world()
    return list(range(0, n_tokens, batch_size))[rank::world]


def is_streamed(loaded: LoadedModel) -> bool:
    return bool(loaded.info.get("weights_folder"))


@torch.no_grad()
def run(
    loaded: LoadedModel,
    tokens: torch.Tensor,
    collectors: list[Collector],
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "pass",
    until: int | None = None,
    prepare=None,
    device=None,
) -> None:
    """Push ``tokens`` through layers 0..``until`` (default: all) of ``loaded`` with ``collectors`` observing."""
    layers = loaded.adapter.layer_list(loaded.model)
    last = len(layers) - 1 if until is None else until
    starts = batch_starts(len(tokens), batch_size)
    step = Step()
    if is_streamed(loaded):
        _run_streamed(loaded, tokens, starts, batch_size, collectors, step, last, prepare, device, progress, desc)
    else:
        _run_in_memory(loaded, tokens, starts, batch_size, collectors, step, last, progress, desc)


def _run_in_memory(loaded, tokens, starts, batch_size, collectors, step, last, progress, desc) -> None:
    from tqdm.auto import tqdm

    model, adapter = loaded.model, loaded.adapter
    layers = adapter.layer_list(model)

    def stop(module, args, out):
        raise _Stop

    device = next(model.parameters()).device
    with ExitStack() as hooks:
        for i in range(last + 1):
            for handle in (h for c in collectors for h in c.attach(layers[i], i, adapter, step)):
                hooks.callback(handle.remove)
        if last < len(layers) - 1:
            hooks.callback(layers[last].register_forward_hook(stop).remove)
        for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
            step.batch = b
            try:
                model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1)
            except _Stop:
                pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its input and its arguments, passes the input on."""

    def __init__(self, index: int, last: bool, layer: nn.Module, record: dict):
        super().__init__()
        self.index, self.last, self.record = index, last, record
        for name in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):  # what forwards read off layers
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.record["hidden"] = hidden_states
        self.record.setdefault("layers", []).append((args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _run_streamed(loaded, tokens, starts, batch_size, collectors, step, last, prepare, device, progress, desc):
    from tqdm.auto import tqdm

    from llmdrop.source.models import resolve_device
    from llmdrop.source.stored import stored_tensors
    from llmdrop.source.streaming import load_layer, prepare_outer

    model, adapter = loaded.model, loaded.adapter
    device = resolve_device(device or loaded.info.get("device", "auto"))
    dtype = model.dtype
    stored = stored_tensors(loaded.info["weights_folder"])
    prepare_outer(model, adapter, stored, device, dtype)
    parent_name, attr = adapter.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    n = len(layers)

    # 1. the model's own forward up to the first layer, once per batch: layer-0 inputs (kept on the CPU) and each
    # layer's arguments (they depend only on the batch's shape: no padding mask is ever passed)
    hidden, arguments = [], {}
    setattr(parent, attr, nn.ModuleList(_Recorder(i, i == n - 1, layers[i], {}) for i in range(n)))
    try:
        for start in starts:
            batch = tokens[start : start + batch_size].to(device)
            record = {}
            for r in getattr(parent, attr):
                r.record = record
            try:
                parent(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            hidden.append(record["hidden"].to("cpu", dtype))
            arguments.setdefault(tuple(batch.shape), record["layers"])
    finally:
        setattr(parent, attr, layers)
        for name, child in parent.named_children():  # the embedding is as big as a layer: free it before them
            if name != attr:
                child.to("meta")

    # 2. one layer at a time
    t0 = time.monotonic()
    for i in tqdm(range(last + 1), desc=f"{desc} (streamed)", unit="layer", disable=not progress):
        layer = layers[i]
        load_layer(layer, stored, f"{adapter.layers}.{i}.", device, dtype)
        if prepare is not None:
            prepare(layer, i)
        with ExitStack() as hooks:
            for handle in (h for c in collectors for h in c.attach(layer, i, adapter, step)):
                hooks.callback(handle.remove)
            for b, h in enumerate(hidden):
                step.batch = b
                args, kwargs = arguments[(h.shape[0], h.shape[1])][i]
                out = layer(h.to(device), *_to_device(args, device), **_to_device(kwargs, device))
                hidden[b] = layer_output(out).to("cpu", dtype)
        layer.to("meta")  # frees the layer's memory
    loaded.info["stream_seconds"] = round(time.monotonic() - t0, 3)
