"""``--compensate``: training-free repair of a cut folded into the weights. ``linear`` is here; ``scale`` (magnitude
compensation of any dropped sublayers) is ``rescale.py``; ``compensate`` runs either.

``--compensate linear``: training-free linear compensation of dropped runs of blocks (ReplaceMe, Shopkhoev et
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

import functools
import math
import time

import torch

from llmdrop.errors import LlmdropError
from llmdrop.passes.runner import Collector, layer_input, layer_output, run
from llmdrop.planning.plan import DropPlan
from llmdrop.planning.rescale import compensate_scale, down_projection

METHODS = ("linear", "scale")
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
    if method == "linear" and not may_drop_blocks:
        raise LlmdropError(
            "--compensate linear replaces dropped blocks; this request drops only attention or only MLP sublayers "
            "(use --blocks / --block-layers, or --joint; --compensate scale works on sublayer drops)"
        )


def check_supported(adapter, method: str = "linear") -> None:
    if method == "linear" and adapter.layout != "sequential pre-norm":
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


@torch.no_grad()
def fold(mlp, transform: torch.Tensor) -> None:
    """Make ``mlp``'s output ``mlp(x) @ transform``: W <- T^T W, b <- b T (computed in float64)."""
    weight, bias = down_projection(mlp)
    weight.copy_(folded_tensor(weight, transform, bias=False))
    if bias is not None:
        bias.copy_(folded_tensor(bias, transform, bias=True))


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


class RunStatistics(Collector):
    """The compensation collector of one dropped run: X = the MLP output of layer ``prev`` (the last kept layer
    before the run), Y = the residual stream after layer ``last`` minus layer ``prev``'s post-attention stream. What
    layer ``prev`` gives waits on the CPU until the same batch leaves layer ``last`` (one batch in memory, every
    batch when streamed); the sums are made on the device of the stream."""

    def __init__(self, hidden: int, prev: int, last: int, skip: int = 0):
        self.stats = _LeastSquares(hidden)
        self.prev, self.last, self.skip = prev, last, skip
        self.waiting = {}  # batch -> {"mid", "m"}

    def attach(self, layer, index, adapter, step) -> list:
        handles = []
        if index == self.prev:

            def on_mid(module, args, kwargs):
                self.waiting.setdefault(step.batch, {})["mid"] = layer_input(args, kwargs).cpu()

            def on_mlp(module, args, out):
                self.waiting[step.batch]["m"] = layer_output(out).cpu()

            handles += [
                layer.get_submodule(adapter.mlp_input_norm).register_forward_pre_hook(on_mid, with_kwargs=True),
                layer.get_submodule(adapter.mlp[0]).register_forward_hook(on_mlp),
            ]
        if index == self.last:

            def on_run_output(module, args, out):
                h = layer_output(out)
                seen = self.waiting.pop(step.batch)
                mid, m = seen["mid"].to(h.device), seen["m"].to(h.device)
                self.stats.add(m[:, self.skip :], (h - mid)[:, self.skip :])

            handles.append(layer.register_forward_hook(on_run_output))
        return handles


def check_streamed(loaded, plan: DropPlan) -> None:
    """A streamed export writes each folded map into the MLP output projection's stored tensor: refuse a model that
    stores it otherwise (sparse-MoE experts), before any pass."""
    from llmdrop.source.stored import stored_tensors

    stored = stored_tensors(loaded.info["weights_folder"])
    for first, _ in runs(plan.blocks):
        name = down_proj_name(loaded.adapter, first - 1)
        if first > 0 and f"{name}.weight" not in stored:
            raise LlmdropError(
                f"--stream --compensate linear writes the map into {name}.weight, which this checkpoint does not "
                f"store ({loaded.adapter.model_type}); compensate without --stream"
            )


def down_proj_name(adapter, layer: int) -> str:
    """The stored name (without .weight / .bias) of layer ``layer``'s MLP output projection."""
    return f"{adapter.layers}.{layer}.{adapter.mlp[0]}.down_proj"


def stored_replacements(adapter, folds: dict) -> dict:
    """The maps of a streamed model as ``stream_export.write_weights`` replacements: stored tensor name -> its
    folded value (the MLP output projection's weight and bias of each layer a map is folded into)."""
    out = {}
    for layer, transform in folds.items():
        name = down_proj_name(adapter, layer)
        out[f"{name}.weight"] = functools.partial(folded_tensor, transform=transform, bias=False)
        out[f"{name}.bias"] = functools.partial(folded_tensor, transform=transform, bias=True)
    return out


def folded_tensor(tensor: torch.Tensor, transform: torch.Tensor, *, bias: bool) -> torch.Tensor:
    """``fold`` on one stored tensor: W -> T^T W, b -> b T (float64, back to the tensor's dtype)."""
    t = transform.to(tensor.device, torch.float64)
    out = (tensor.double() @ t) if bias else torch.matmul(t.T, tensor.double())
    return out.to(tensor.dtype)


def compensate_linear(
    loaded,
    plan: DropPlan,
    tokens: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    skip_first: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Fit a least-squares map for every dropped run of blocks of ``plan`` (the plan itself is applied later by the
    export). A model in memory gets each map folded in place; a streamed one (``runner``) gets it folded into each
    layer as it is read, and the export writes it (``stream_export.write_weights(folds=...)``). ``skip_first``:
    leave the first positions of every calibration block out of the statistics. ``ridge``: shrinkage toward the
    plain drop (see ``_LeastSquares.solve``; 0 is ReplaceMe's plain least squares). Returns the record for
    llmdrop.json and the maps, by the layer they are folded into."""
    from llmdrop.passes.runner import is_streamed
    from llmdrop.planning.select import removed

    model, adapter = loaded.model, loaded.adapter
    check_supported(adapter)
    if not plan.blocks:
        raise LlmdropError("--compensate linear replaces dropped blocks; this plan drops none")
    streamed = is_streamed(loaded)
    if streamed:
        check_streamed(loaded, plan)
    start = time.perf_counter()
    done, records, folds = [], [], {}

    def prepare(layer, index):  # a streamed layer, just read from the files: the maps fitted so far
        if index in folds:
            fold(layer.get_submodule(adapter.mlp[0]), folds[index])

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
        collector = RunStatistics(model.config.hidden_size, prev, last, skip_first)
        with removed(model, adapter, attn=attn, mlp=mlp):
            run(loaded, tokens, [collector], batch_size=batch_size, progress=progress, desc="compensate",
                until=last, prepare=prepare)  # fmt: skip
        stats = collector.stats
        transform, residual = stats.solve(ridge)
        folds[prev] = transform
        if not streamed:
            fold(layers_mlp(model, adapter, prev), transform)
        done.extend(range(first, last + 1))
        record.update(
            folded_into=f"layer {prev} MLP output projection",
            tokens=stats.tokens,
            relative_error_plain_drop=stats.plain / stats.yty,
            relative_error_compensated=residual,
        )
        records.append(record)
    record = {
        "method": "linear",
        "estimate": "least squares, MLP output of the layer before each run -> residual stream after the run "
        "minus that layer's post-attention stream (ReplaceMe); float64 X^T X, X^T Y; ridge toward the identity",
        "ridge": ridge,
        "runs": records,
        "forward_passes": sum("skipped" not in r for r in records) * math.ceil(len(tokens) / batch_size),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return record, folds


def compensate(
    method: str, loaded, plan: DropPlan, tokens: torch.Tensor, *, batch_size: int = 1, progress: bool = True,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[dict, dict]:  # fmt: skip
    """Fit and fold ``method``'s compensation of ``plan`` (a model in memory is changed in place). Returns the record
    for llmdrop.json and, for a streamed model, the export's replacements of stored tensors (else empty)."""
    from llmdrop.passes.runner import is_streamed

    check_supported(loaded.adapter, method)
    if method == "scale":
        return compensate_scale(loaded, plan, tokens, batch_size=batch_size, progress=progress)
    record, folds = compensate_linear(loaded, plan, tokens, batch_size=batch_size, progress=progress, ridge=ridge)
    return record, stored_replacements(loaded.adapter, folds) if is_streamed(loaded) else {}


def layers_mlp(model, adapter, layer: int):
    return adapter.layer_list(model)[layer].get_submodule(adapter.mlp[0])
