"""A data-free attention score after Gate-Norm: each attention sublayer ranked from its weights alone, by how strongly
its queries and keys are coupled. No calibration text, no forward pass.

Gate-Norm (Saikumar & Varghese, "Data-Free Pruning of Self-Attention Layers in LLMs", arXiv 2512.20636, Dec 2025)
"ranks attention sublayers by query-key coupling and removes the least coupled ones", on the Attention Suppression
Hypothesis: deep attention layers learn to mute themselves, and a muted layer's query-key product is small. The
paper's exact formula was not available to us (only its abstract and summaries of it), so this module implements a
query-key coupling score of our own, written out here so that it can be checked by hand:

For layer l with the attention's pre-norm scale g (d values: the RMS norm's weight, or 1 + weight for Gemma), query
projection W_q (H * d_h rows, d columns), key projection W_k (H_kv * d_h rows) and the attention's logit scale s
(1 / sqrt(d_h), or Gemma's query_pre_attn_scalar ** -0.5), head h reads key head k(h) = h // (H / H_kv) (GQA: the key
heads are repeated as the attention repeats them), and

    Q_h = W_q[h d_h : (h + 1) d_h] diag(g),   K_h = W_k[k(h) d_h : (k(h) + 1) d_h] diag(g)     (d_h x d each)
    B_h = s Q_h^T K_h                         (d x d: the bilinear form of head h's attention logits between two
                                               RMS-normalized residual-stream vectors, at relative position 0)
    score_l = mean over the H heads of ||B_h||_F

computed as ||B_h||_F^2 = s^2 trace((Q_h Q_h^T)(K_h K_h^T)), two d_h x d_h Gram matrices, in float64. A small
score means near-uniform attention logits over any input direction: the sublayer's query-key coupling is weak.

What it leaves out, on purpose: the rotary embedding (the form at relative offset 0; RoPE rotates queries and keys
by position), query / key biases (Qwen2), and the values and output projection (what attention writes). Models that
RMS-normalize queries and keys per head (Qwen3, Gemma 3: q_norm / k_norm) take the scale out of W_q and W_k, so
the score is refused for them (``refusal``). It scores attention sublayers only; MLP sublayers and blocks get no
score. Cost: two d_h x d x d_h products per head, well under a second for SmolLM2-135M.
"""

import torch

from llmdrop.errors import LlmdropError
from llmdrop.source.arch import ADAPTERS, absent_parts, base_model_type

NAME = "gate-norm"


def refusal(config) -> str | None:
    """Why ``config`` (a loaded config, or the dict of a config.json; {} before a GGUF or Hub source is loaded) cannot
    be scored by gate-norm, in one sentence; None if it can (or if the config does not tell yet)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    model_type = base_model_type(get("model_type") or "")
    if model_type == "nemotron-nas":
        model_type = get("base_model_type") or "llama"
    adapter = ADAPTERS.get(model_type)
    if adapter is not None and adapter.qk_norm:
        return (
            f"--metric gate-norm reads the query-key coupling from W_q and W_k, but {model_type} RMS-normalizes "
            "queries and keys per head (q_norm / k_norm), which takes their scale out of the weights; use --metric "
            "cosine"
        )
    return None


def check(config) -> None:
    why = refusal(config)
    if why:
        raise LlmdropError(why)


def coupling(wq, wk, norm_scale, *, heads: int, kv_heads: int, head_dim: int, scaling: float) -> float:
    """The mean over query heads of ||s diag(g) W_q,h^T W_k,k(h) diag(g)||_F (see the module docstring)."""
    if heads % kv_heads:
        raise LlmdropError(f"{heads} query heads do not share {kv_heads} key heads evenly")
    g = norm_scale.to(torch.float64)
    q = (wq.to(torch.float64) * g).reshape(heads, head_dim, -1)  # Q_h = W_q,h diag(g)
    k = (wk.to(torch.float64) * g).reshape(kv_heads, head_dim, -1)
    gram_q = q @ q.transpose(1, 2)  # [H, d_h, d_h]
    gram_k = (k @ k.transpose(1, 2)).repeat_interleave(heads // kv_heads, dim=0)
    squared = (gram_q * gram_k).sum(dim=(1, 2))  # trace(A B) of two symmetric matrices
    return (scaling * squared.clamp(min=0).sqrt()).mean().item()


def _shape(config, attn) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scaling = getattr(attn, "scaling", None) or head_dim**-0.5
    return dict(
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        scaling=float(scaling),
    )


def _split(tensors: list, shape: dict) -> tuple:
    """(W_q, W_k) of the adapter's q / k tensors: two tensors, or one fused q, k, v projection."""
    if len(tensors) == 2:
        return tuple(tensors)
    q_rows, k_rows = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return tensors[0][:q_rows], tensors[0][q_rows : q_rows + k_rows]


@torch.no_grad()
def gate_norm(loaded, *, progress: bool = True) -> list[float | None]:
    """The score of every attention sublayer of ``loaded`` (None: one the model no longer has), from its weights:
    the model's own in memory, or, for a streamed skeleton, each layer's q / k projections and attention pre-norm
    read alone from the safetensors files."""
    from tqdm.auto import tqdm

    from llmdrop.passes.runner import is_streamed

    model, adapter = loaded.model, loaded.adapter
    config = model.config
    check(config)
    adapter.check_layout(model)
    absent = set(absent_parts(config)["attn"])
    attn_name, norm_name = adapter.attn[0], adapter.attn[1]
    layers = adapter.layer_list(model)
    read = _stored_reader(loaded) if is_streamed(loaded) else None
    scores = []
    for i in tqdm(range(len(layers)), desc=NAME, unit="layer", disable=not progress):
        if i in absent:
            scores.append(None)
            continue
        attn = layers[i].get_submodule(attn_name)
        shape = _shape(config, attn)
        names = [f"{attn_name}.{p}.weight" for p in adapter.qk] + [f"{norm_name}.weight"]
        if read is None:
            tensors = [layers[i].get_parameter(n).detach() for n in names]
        else:
            tensors = [read(f"{adapter.layers}.{i}.{n}") for n in names]
        *qk, weight = tensors
        wq, wk = _split(qk, shape)
        scores.append(coupling(wq, wk, weight.to(torch.float64) + adapter.norm_offset, **shape))
    return scores


def _stored_reader(loaded):
    """name -> that one tensor, read from the source's safetensors files (no other tensor of the layer is read)."""
    from llmdrop.source.stored import read_tensor, stored_tensors

    stored = stored_tensors(loaded.info["weights_folder"])

    def read(name: str) -> torch.Tensor:
        if name not in stored:
            raise LlmdropError(f"{loaded.info['weights_folder']} stores no tensor {name}; gate-norm cannot read it")
        return read_tensor(stored[name])

    return read
