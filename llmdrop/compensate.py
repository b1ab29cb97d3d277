"""``--compensate linear``: training-free linear compensation of dropped runs of blocks (ReplaceMe, Shopkhoev et
al., NeurIPS 2025), folded into the weights so that the architecture does not change.

For a run of dropped blocks s..e, layer p = s-1 is the last kept layer before it. In this residual layout
(sequential pre-norm: Llama, Mistral, Qwen2/3, Mixtral, Phi-3)

    h_mid = h + attn(norm1(h))          (layer p, after its attention's residual add)
    m     = mlp(norm2(h_mid))           (layer p's MLP output, before its residual add)
    out_p = h_mid + m

and the run maps out_p to h_e+1 (the residual stream after block e). ReplaceMe estimates a hidden x hidden
matrix T with m T ~ h_e+1 - h_mid, by least squares over every calibration token:

    T = argmin ||M T - (H_e+1 - H_mid)||^2 = (M^T M)^+ M^T (H_e+1 - H_mid)

so that the pruned layer p gives h_mid + m T ~ h_e+1. Since m = down_proj(z) = z W^T (+ b), m T = z (T^T W)^T
(+ b T): replacing W by T^T W (and b by b T; for Mixtral, every expert's down_proj) is the whole fold, the
layer stays a plain layer and the export stays vanilla (or nemotron-nas). Only M^T M and M^T (H_e+1 - H_mid)
are accumulated, in float64 (hidden^2 each), never the activations.

Runs are compensated from the first to the last; the statistics of a run are collected on the model with the
earlier runs already removed and compensated (and the plan's sublayer drops applied), stopping the forward
right after the run. A run that starts at layer 0 (no layer before it) or whose previous layer loses its MLP
is left uncompensated and says so in the record.

Not covered: Gemma 2/3 (sandwich norms): the MLP output passes through ``post_feedforward_layernorm``, a
per-token RMS norm, before the residual add, so no hidden x hidden map can be folded behind it.
"""

import math
import time

import torch

from .errors import LlmdropError
from .plan import DropPlan

METHODS = ("linear",)
# Shrinkage of the map toward the identity (the plain drop), relative to the mean diagonal of X^T X. Plain least
# squares (0, ReplaceMe's lstsq) overfits a few thousand calibration tokens: on SmolLM2 it made held-out perplexity
# worse on every sensible plan; 1.0 was the best of 0 / 0.1 / 1 on every plan measured (docs/selection.md).
DEFAULT_RIDGE = 1.0


def check_method(method: str | None, *, may_drop_blocks: bool = True, ridge: float = DEFAULT_RIDGE) -> None:
    """Before any model work: a known method, a valid ridge, and a request that can drop whole blocks at all."""
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise LlmdropError(f"--compensate-ridge must be a number >= 0, got {ridge!r}")
    if method is None:
        return
    if method not in METHODS:
        raise LlmdropError(f"unknown --compensate {method!r}; use {', '.join(METHODS)}")
    if not may_drop_blocks:
        raise LlmdropError(
            "--compensate linear replaces dropped blocks; this request drops only attention or only MLP sublayers "
            "(use --blocks / --block-layers, or --joint)"
        )


def check_supported(adapter) -> None:
    if adapter.layout != "sequential pre-norm":
        raise LlmdropError(
            f"--compensate linear folds a map into the MLP output of the layer before a dropped run; "
            f"{adapter.model_type} ({adapter.layout}) normalises that output before the residual add, so the map "
            "cannot be folded"
        )


def runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 5), (9, 9)]: contiguous runs, first and last layer."""
    out = []
    for i in sorted(blocks):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def down_projection(mlp) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (``[hidden, inter]``, or ``[experts, hidden, inter]`` for fused MoE experts) that writes the MLP
    output, and its bias."""
    down = getattr(mlp, "down_proj", None)
    if isinstance(down, torch.nn.Linear):
        return down.weight, down.bias
    experts = getattr(mlp, "experts", None)
    if isinstance(getattr(experts, "down_proj", None), torch.Tensor) and not getattr(experts, "has_bias", False):
        return experts.down_proj, None
    raise LlmdropError(f"--compensate linear: cannot find the output projection of {type(mlp).__name__}")


@torch.no_grad()
def fold(mlp, transform: torch.Tensor) -> None:
    """Make ``mlp``'s output ``mlp(x) @ transform``: W <- T^T W, b <- b T (computed in float64)."""
    weight, bias = down_projection(mlp)
    t = transform.to(weight.device, torch.float64)
    weight.copy_(torch.matmul(t.T, weight.double()).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.double() @ t).to(bias.dtype))


class _Stop(Exception):
    """Raised by a hook once the run's output is seen: the rest of the forward is not needed."""


class _LeastSquares:
    """X^T X, X^T Y and Y^T Y (float64) of the rows of X = MLP output, Y = target, over all tokens."""

    def __init__(self, hidden: int):
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.xty = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.yty = 0.0
        self.tokens = 0
        self.plain = 0.0  # ||X - Y||^2: the error of a plain drop (T = identity)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        self.xtx += (x.T @ x).cpu()
        self.xty += (x.T @ y).cpu()
        self.yty += (y * y).sum().item()
        self.plain += ((x - y) ** 2).sum().item()
        self.tokens += x.shape[0]

    def solve(self, ridge: float = 0.0) -> tuple[torch.Tensor, float]:
        """T and the relative residual ||X T - Y||^2 / ||Y||^2. ``ridge`` > 0 shrinks T toward the identity (the
        plain drop): T = argmin ||X T - Y||^2 + lam ||T - I||^2, lam = ridge * trace(X^T X) / hidden."""
        if ridge:
            eye = torch.eye(self.xtx.shape[0], dtype=torch.float64)
            lam = ridge * torch.trace(self.xtx) / self.xtx.shape[0]
            t = torch.linalg.solve(self.xtx + lam * eye, self.xty + lam * eye)
        else:
            t = torch.linalg.pinv(self.xtx, hermitian=True) @ self.xty
        residual = self.yty - 2 * (t * self.xty).sum().item() + (t * (self.xtx @ t)).sum().item()
        return t, max(residual, 0.0) / self.yty


@torch.no_grad()
def _statistics(
    model, adapter, tokens, prev: int, last: int, *, batch_size: int, progress: bool, skip: int = 0
) -> _LeastSquares:
    from tqdm.auto import tqdm

    layers = adapter.layer_list(model)
    mlp = layers[prev].get_submodule(adapter.mlp[0])
    norm = layers[prev].get_submodule(adapter.mlp_input_norm)
    stats = _LeastSquares(model.config.hidden_size)
    seen = {}

    def on_mid(module, args, kwargs):
        seen["mid"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def on_mlp(module, args, out):
        seen["m"] = out[0] if isinstance(out, tuple) else out

    def on_run_output(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        stats.add(seen["m"][:, skip:], (h - seen["mid"])[:, skip:])
        raise _Stop

    handles = [
        norm.register_forward_pre_hook(on_mid, with_kwargs=True),
        mlp.register_forward_hook(on_mlp),
        layers[last].register_forward_hook(on_run_output),
    ]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="compensate", unit="batch", disable=not progress):
            try:
                model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def compensate_linear(
    loaded,
    plan: DropPlan,
    tokens: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    skip_first: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> dict:
    """Fold a least-squares map for every dropped run of blocks of ``plan`` into ``loaded.model`` (in place; the
    plan itself is applied later by the export). ``skip_first``: leave the first positions of every calibration
    block out of the statistics. ``ridge``: shrinkage toward the plain drop (see ``_LeastSquares.solve``; 0 is
    ReplaceMe's plain least squares). Returns the record for llmdrop.json."""
    from .select import removed

    model, adapter = loaded.model, loaded.adapter
    check_supported(adapter)
    if not plan.blocks:
        raise LlmdropError("--compensate linear replaces dropped blocks; this plan drops none")
    start = time.perf_counter()
    done, records = [], []
    for first, last in runs(plan.blocks):
        prev = first - 1
        record = {"layers": [first, last]}
        if prev < 0:
            record["skipped"] = "the run starts at layer 0: there is no layer before it to fold the map into"
        elif prev in plan.mlp:
            record["skipped"] = (
                f"layer {prev}, before the run, loses its MLP: there is no output projection to fold into"
            )
        if "skipped" in record:
            records.append(record)
            continue
        attn = sorted(set(plan.attn) | set(done))
        mlp = sorted(set(plan.mlp) | set(done))
        with removed(model, adapter, attn=attn, mlp=mlp):
            stats = _statistics(
                model, adapter, tokens, prev, last, batch_size=batch_size, progress=progress, skip=skip_first
            )
        transform, residual = stats.solve(ridge)
        fold(layers_mlp(model, adapter, prev), transform)
        done.extend(range(first, last + 1))
        record.update(
            folded_into=f"layer {prev} MLP output projection",
            tokens=stats.tokens,
            relative_error_plain_drop=stats.plain / stats.yty,
            relative_error_compensated=residual,
        )
        records.append(record)
    return {
        "method": "linear",
        "estimate": "least squares, MLP output of the layer before each run -> residual stream after the run "
        "minus that layer's post-attention stream (ReplaceMe); float64 X^T X, X^T Y; ridge toward the identity",
        "ridge": ridge,
        "runs": records,
        "forward_passes": sum("skipped" not in r for r in records) * math.ceil(len(tokens) / batch_size),
        "seconds": round(time.perf_counter() - start, 3),
    }


def layers_mlp(model, adapter, layer: int):
    return adapter.layer_list(model)[layer].get_submodule(adapter.mlp[0])
