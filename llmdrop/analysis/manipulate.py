"""The "Attend First, Consolidate Later" manipulations (Ben Artzy & Schwartz, 2024), as a context manager.

Numbering: "layer k" is decoder layer k (0-based) and the state it manipulates is x^k, the *input* of
decoder layer k (``hidden_states[k]`` in Hugging Face's ``output_hidden_states`` numbering, where
``hidden_states[0]`` is the embedding output). "Previous tokens" are the real (non-pad) tokens of each row
except its last real token, i.e. positions 0..n-2 of the row's n real tokens; the last token is never
touched by ``freeze`` / ``random`` / ``shuffle``.

- ``freeze``  : keep x^{k-1} of every previous token and, for every l >= k, set x^l <- x^{k-1} (so from layer k
  on, the keys/values of earlier positions come from that frozen state). For k = 0 there is no x^{-1}: the
  embeddings x^0 are used, so freeze at 0 equals freeze at 1.
- ``random``  : at layer k, x^k of each previous token becomes a Gaussian direction with the same L2 norm.
- ``shuffle`` : at layer k, the hidden dimensions of each previous token are permuted.
- ``skip-attention`` : attention sublayers (with their norms) of layers k..L-1 are removed for all tokens, with
  :func:`planning.surgery.drop_sublayers` -- the very operation ``llmdrop drop --skip-attention-from k`` exports.
- ``inject``  : at layer k, x^k at a word's positions becomes a donor prompt's x^k at its word's positions.

The random direction / permutation of a token depends only on (seed, its index among the row's real tokens),
never on the batch or the padding, so a prompt gives the same result alone or in any left-padded batch.

Hooks are forward *pre*-hooks on the decoder layers, so transformers' ``output_hidden_states`` (recorded from
layer outputs) shows x^k for k >= 1 *before* the manipulation; :func:`capture_layer_inputs` records the
inputs the layers actually received.
"""

from contextlib import contextmanager

import torch

from llmdrop.compat import call_cache
from llmdrop.errors import LlmdropError
from llmdrop.passes.runner import layer_input
from llmdrop.source.arch import Adapter, adapter_for

KINDS = ("freeze", "random", "shuffle", "skip-attention", "inject")
PREVIOUS_TOKEN_KINDS = ("freeze", "random", "shuffle", "skip-attention")  # what `probe --manipulation all` runs
_STREAM = {"random": 0x5EED_0001, "shuffle": 0x5EED_0002}  # separate random streams per manipulation


def _split(target) -> tuple[torch.nn.Module, Adapter]:
    """(model, adapter) from a LoadedModel or a bare transformers model."""
    if hasattr(target, "model") and hasattr(target, "adapter"):
        return target.model, target.adapter
    return target, adapter_for(target.config)


def token_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each token among its row's real tokens, bool mask of the previous tokens) for a [B, T] mask."""
    mask = mask.bool()
    pos = mask.long().cumsum(1) - 1
    last = mask & (pos == mask.long().sum(1, keepdim=True) - 1)
    return pos.clamp(min=0), mask & ~last


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class Manipulation:
    """Apply one manipulation at layer ``layer`` while the context is open; every forward of the model is affected.

    ``inject`` needs ``donor_states`` ([rows, S, d]: the donor's x^k at its word tokens) and ``positions``
    ([rows, S] indices among each row's real tokens, -1 = unused slot). Row r of a batch uses row ``rows[r]``
    of them (``rows`` defaults to 0..B-1; set the attribute to reorder/subset, as the probe loop does).
    """

    def __init__(self, target, kind: str, layer: int, *, seed: int = 0, donor_states=None, positions=None):
        if kind not in KINDS:
            raise LlmdropError(f"unknown manipulation {kind!r}; choose from {', '.join(KINDS)}")
        self.model, self.adapter = _split(target)
        n = self.model.config.num_hidden_layers
        if not 0 <= layer < n:
            raise LlmdropError(f"layer {layer} is out of range: the model has layers 0-{n - 1}")
        if kind == "inject" and (donor_states is None or positions is None):
            raise LlmdropError("inject needs donor_states and positions")
        self.kind, self.layer, self.seed = kind, layer, seed
        self.donor_states, self.positions = donor_states, None if positions is None else torch.as_tensor(positions)
        self.rows = None
        self._handles, self._mask, self._frozen, self._restore = [], None, None, None
        self._noise: dict[int, torch.Tensor] = {}

    # -- per-token randomness: a function of (seed, token index) only ---------------------------------------
    def _per_token(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        rows = []
        for p in positions.tolist():
            if p not in self._noise:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + p) ^ _STREAM[self.kind])
                self._noise[p] = (
                    torch.randn(dim, generator=g) if self.kind == "random" else torch.randperm(dim, generator=g)
                )
            rows.append(self._noise[p])
        return torch.stack(rows)

    # -- hooks -----------------------------------------------------------------------------------------------
    def _capture_mask(self, module, args, kwargs):
        cache = call_cache(module, args, kwargs)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            # a KV-cache step (e.g. model.generate) would reuse states computed before the manipulation applied
            raise LlmdropError(
                "manipulations need full forwards without a KV cache (use_cache=False); for greedy "
                "generation use llmdrop.analysis.probing.generate"
            )
        mask = kwargs.get("attention_mask")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if ref is None and args:
            ref = args[0]
        if mask is None:
            mask = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
        elif mask.dim() != 2:
            raise LlmdropError("manipulations need a 2-D [batch, seq] attention_mask (or none)")
        self._mask = mask.bool()

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            new = self._apply(index, hidden)
            return None if new is None else _with_hidden(args, kwargs, new)

        return hook

    def _apply(self, index: int, hidden: torch.Tensor):
        if hidden.shape[1] != self._mask.shape[1]:
            raise LlmdropError("manipulations need full forwards without a KV cache (use_cache=False)")
        pos, prev = token_positions(self._mask.to(hidden.device))
        k = self.layer
        if self.kind == "freeze":
            if index == max(k - 1, 0):
                self._frozen = hidden.detach().clone()  # x^{k-1}: the input of layer k-1
            if index >= k and index > 0:
                return torch.where(prev[..., None], self._frozen, hidden)
            return None
        if index != k:
            return None
        if self.kind == "inject":
            return self._inject(hidden)
        b, t = prev.nonzero(as_tuple=True)
        if b.numel() == 0:
            return None
        new = hidden.clone()
        h = hidden[b, t].float()
        if self.kind == "random":
            direction = self._per_token(pos[b, t].cpu(), h.shape[-1]).to(h.device)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            new[b, t] = (direction * h.norm(dim=-1, keepdim=True)).to(hidden.dtype)
        else:  # shuffle
            perm = self._per_token(pos[b, t].cpu(), h.shape[-1]).to(h.device)
            new[b, t] = torch.gather(hidden[b, t], 1, perm)
        return new

    def _inject(self, hidden):
        new = hidden.clone()
        rows = self.rows if self.rows is not None else range(hidden.shape[0])
        for r, src in enumerate(rows):
            cols = self._mask[r].nonzero().squeeze(1)  # real-token index -> column
            for s, p in enumerate(self.positions[src].tolist()):
                if p >= 0:
                    new[r, cols[p]] = self.donor_states[src, s].to(hidden.device, hidden.dtype)
        return new

    # -- context manager ---------------------------------------------------------------------------------------
    def __enter__(self):
        if self._handles or self._restore is not None:
            raise LlmdropError("this manipulation is already applied (nested `with` on the same object)")
        layers = self.adapter.layer_list(self.model)
        if self.kind == "skip-attention":
            self._restore = _drop_attention_from(self.model, self.adapter, self.layer)
            return self
        base = self.model.get_submodule(self.adapter.layers.rsplit(".", 1)[0])
        self._handles.append(base.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._frozen = self._mask = None
        if self._restore is not None:
            self._restore()
            self._restore = None
        return False


def manipulation(target, kind: str, layer: int, **kwargs) -> Manipulation:
    """``with llmdrop.manipulation(loaded, "random", 12, seed=0): ...`` -- see :class:`Manipulation`."""
    return Manipulation(target, kind, layer, **kwargs)


def _drop_attention_from(model, adapter: Adapter, start: int):
    """drop_sublayers(attn=start..L-1) in place; returns a function that puts the original modules back."""
    from llmdrop.planning.plan import skip_attention_layers
    from llmdrop.planning.surgery import _swap_config, drop_sublayers

    layers = adapter.layer_list(model)
    names = adapter.attn
    saved = [{name: getattr(layer, name) for name in names} for layer in layers]
    layer_idx = [getattr(getattr(layer, names[0]), "layer_idx", None) for layer in layers]
    config = model.config
    drop_sublayers(model, adapter, attn=skip_attention_layers(len(layers), start))

    def restore():
        _swap_config(model, config)
        for layer, modules, idx in zip(layers, saved, layer_idx):
            for name, module in modules.items():
                setattr(layer, name, module)
            if idx is not None:
                getattr(layer, names[0]).layer_idx = idx

    return restore


@contextmanager
def capture_layer_inputs(target):
    """Record the hidden state each decoder layer actually receives (after any manipulation), per forward.

    Yields a list; after a forward it holds [x^0, x^1, ..., x^{L-1}] (float32 copies, [B, T, d] each).
    """
    model, adapter = _split(target)
    inputs: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):  # a forward hook sees the (pre-hook modified) inputs
        inputs.append(layer_input(args, kwargs).detach().float().clone())

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in adapter.layer_list(model)]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as alone."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] at the last column (the last real token of a left-padded batch); no KV cache."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()
