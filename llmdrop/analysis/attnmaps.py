"""Attention maps with a logit lens: what each generated token looked at, layer by layer.

For every greedy generation step i (the forward pass that predicts generated token i) we keep

- the attention row of the current query (the last position, whose output predicts token i) over every
  key 0..T_i-1, for every layer and head (``T_i = prompt length + i``);
- the logit lens of every layer at every position: the top-k of ``softmax(lm_head(norm(h_l)))`` where
  ``h_l`` is the raw output of decoder layer l, plus the model's own prediction (its real logits).

In a causal model with a KV cache, the hidden states of past positions never change, so the lens is
computed once per position (prompt positions in the prefill, then one new position per step).

Outputs: ``attn_{i}_{j}.png`` (step i, window j, like dillonalaird/llama-attn-maps) and one
self-contained ``attnmap.html`` viewer (no network: data inline, attention rows zlib-compressed uint8).
"""

import base64
import contextlib
import functools
import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from llmdrop.compat import cache_kwarg, output_cache, quiet_cache_rename
from llmdrop.errors import LlmdropError
from llmdrop.passes.runner import layer_output

FORMATS = ("png", "html")
HTML_NAME = "attnmap.html"
VIEWER_TEMPLATE = "attnmap_viewer.html"
DATA_MARKER = "/*__ATTNMAP_DATA__*/"


@dataclass
class AttnCapture:
    """Everything the PNGs and the viewer show, for one greedy generation."""

    token_ids: list[int]  # prompt + generated tokens
    n_prompt: int
    num_layers: int
    num_heads: int
    dropped: list[int]  # layers without attention (llmdrop exports)
    attn: list[np.ndarray]  # per step i: float32 [L, H, T_i]; NaN in dropped layers
    lens_ids: np.ndarray  # int64 [positions, L + 1, k]; row L = the model's real prediction
    lens_probs: np.ndarray  # float32, same shape
    info: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.attn)

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.n_prompt :]


# ---------------------------------------------------------------- prompt and heads


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of the prompt; with ``chat`` the tokenizer's chat template (one user turn + generation prompt)."""
    if not prompt:
        raise LlmdropError("--prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LlmdropError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # the template already holds BOS and friends: do not add them a second time
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def parse_heads(heads, num_heads: int):
    """'max' | 'mean' | a head index (0-based) checked against the model."""
    text = str(heads).strip().lower()
    if text in ("max", "mean"):
        return text
    try:
        index = int(text)
    except ValueError:
        raise LlmdropError(f"--heads must be max, mean or a head index, not {heads!r}") from None
    if not 0 <= index < num_heads:
        raise LlmdropError(
            f"--heads {index} is out of range: the model has {num_heads} attention heads (0-{num_heads - 1})"
        )
    return index


def reduce_heads(attn: np.ndarray, heads) -> np.ndarray:
    """[L, H, T] -> [L, T]: the max or mean over heads, or one head. Dropped layers (NaN) stay NaN."""
    if heads == "max":
        return attn.max(axis=1)
    if heads == "mean":
        return attn.mean(axis=1)
    return attn[:, heads]


def windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) token windows over ``length`` positions, like the reference: starts 0, stride, 2*stride, ...
    until the sequence is covered; the last window is shifted back to end at ``length``. One window if it fits."""
    if window < 1 or stride < 1:
        raise LlmdropError("--window and --stride must be at least 1")
    if length <= window:
        return [(0, length)]
    n = math.ceil((length - window) / stride) + 1
    return [(min(j * stride, length - window), min(j * stride, length - window) + window) for j in range(n)]


def png_names(capture: AttnCapture, window: int, stride: int, all_windows: bool = True) -> list[str]:
    names = []
    for i, a in enumerate(capture.attn):
        wins = windows(a.shape[-1], window, stride)
        js = range(len(wins)) if all_windows else [len(wins) - 1]
        names += [f"attn_{i}_{j}.png" for j in js]
    return names


# ---------------------------------------------------------------- capture


@contextlib.contextmanager
def eager_attention(model):
    """Attention weights exist only on the eager path: switch to it for the capture run, then back."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


def _topk(logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.float(), dim=-1)
    p, i = probs.topk(k, dim=-1)
    return i.cpu().numpy(), p.cpu().numpy()


@torch.no_grad()
@quiet_cache_rename()
def capture(
    model, adapter, tokenizer, prompt_ids: list[int], *, max_new_tokens: int = 20, top_k: int = 5, progress: bool = True
) -> AttnCapture:
    """Greedy generation step by step (KV cache), recording attention rows and the logit lens."""
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise LlmdropError("--max-new-tokens must be at least 1")
    config = model.config
    L, H = config.num_hidden_layers, config.num_attention_heads
    dropped = sorted(getattr(config, "drop_attn_list", None) or ())
    layers = adapter.layer_list(model)
    k = min(top_k, model.get_output_embeddings().out_features)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None and gen_config.eos_token_id is not None:
        eos = gen_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    outputs, weights = {}, {}

    def keep_output(module, args, out, l):
        outputs[l] = layer_output(out)

    def keep_query_row(module, args, out, l):
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        # only the last query's row [heads, keys]: the full [heads, T, T] of a long prefill would not fit
        weights[l] = None if w is None else w[0, :, -1, :].detach()

    hooks = [layer.register_forward_hook(functools.partial(keep_output, l=l)) for l, layer in enumerate(layers)]
    hooks += [
        layer.get_submodule(adapter.attn[0]).register_forward_hook(functools.partial(keep_query_row, l=l))
        for l, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    attn_steps, lens_ids, lens_probs = [], [], []
    past, cache_name = None, cache_kwarg(model)
    try:
        with eager_attention(model):
            for _ in tqdm(range(max_new_tokens), desc="attnmap: generating", disable=not progress, leave=False):
                new = ids if past is None else ids[-1:]
                outputs.clear()
                weights.clear()
                out = model(input_ids=torch.tensor([new], device=device), use_cache=True, **{cache_name: past})
                past = output_cache(out)
                T = len(ids)
                step = np.full((L, H, T), np.nan, dtype=np.float32)
                for l in range(L):
                    w = weights.get(l)
                    if w is None:
                        if l not in dropped:
                            raise LlmdropError(f"layer {l} returned no attention weights (eager attention is needed)")
                        continue
                    row = w.float().cpu().numpy()  # the current query's row, every head
                    # a sliding-window cache keeps only the last keys: the rest got no attention at all
                    step[l] = 0.0
                    step[l, :, T - row.shape[-1] :] = row
                attn_steps.append(step)
                # logit lens at the new positions: norm + LM head on each layer's raw output
                ids_p = np.empty((len(new), L + 1, k), dtype=np.int64)
                probs_p = np.empty((len(new), L + 1, k), dtype=np.float32)
                for l in range(L):
                    logits = adapter.logits(model, outputs[l][0])
                    ids_p[:, l], probs_p[:, l] = _topk(logits, k)
                ids_p[:, L], probs_p[:, L] = _topk(out.logits[0], k)
                lens_ids.append(ids_p)
                lens_probs.append(probs_p)
                nxt = int(out.logits[0, -1].argmax())
                ids.append(nxt)
                if nxt in eos:
                    break
    finally:
        for h in hooks:
            h.remove()
    return AttnCapture(
        ids,
        len(prompt_ids),
        L,
        H,
        dropped,
        attn_steps,
        np.concatenate(lens_ids),
        np.concatenate(lens_probs),
        info={"model_type": config.model_type},
    )


# ---------------------------------------------------------------- token text


def token_texts(tokenizer, ids) -> dict[int, str]:
    """Readable text of each token id: decoded, with newlines / tabs made visible."""
    texts = {}
    for i in sorted(set(int(x) for x in ids)):
        s = tokenizer.decode([i], skip_special_tokens=False)
        if not s:
            s = str(tokenizer.convert_ids_to_tokens(i))
        texts[i] = s.replace("\r", "\\r").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return texts


def _short(text: str, n: int = 8) -> str:
    text = text if text.strip() else text.replace(" ", "\u2423")  # a lone space is visible as ␣
    return text if len(text) <= n else text[: n - 1] + "\u2026"


# ---------------------------------------------------------------- PNG


def render_png(
    capture: AttnCapture, texts: dict[int, str], step: int, start: int, end: int, path: Path, heads="max"
) -> None:
    """One image: rows = layers 0..L-1 + the final prediction, columns = positions start..end-1 of step ``step``."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    L = capture.num_layers
    attn = reduce_heads(capture.attn[step], heads)[:, start:end]  # [L, W]
    grid = np.vstack([attn, np.full((1, end - start), np.nan)])  # the final row has no attention
    n_cols = end - start
    # fixed margins in inches instead of tight_layout, which would draw every label twice
    left, right, top, bottom = 1.25, 0.85, 0.5, 0.7
    w, h = left + right + 0.62 * n_cols, top + bottom + 0.24 * (L + 1)
    fig = Figure(figsize=(w, h), dpi=110)
    ax = fig.add_axes((left / w, bottom / h, 1 - (left + right) / w, 1 - (top + bottom) / h))
    cax = fig.add_axes((1 - (right - 0.15) / w, bottom / h, 0.15 / w, 1 - (top + bottom) / h))
    cmap = matplotlib.colormaps["YlOrRd"].with_extremes(bad="#e6e6e6")  # dropped attention layers, final row
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for r in range(L + 1):
        for c in range(n_cols):
            p = start + c
            tok = texts[int(capture.lens_ids[p, r, 0])]
            value = grid[r, c]
            colour = "white" if np.isfinite(value) and value > 0.6 else ("#555555" if r in capture.dropped else "black")
            ax.text(c, r, _short(tok), ha="center", va="center", fontsize=6, color=colour, parse_math=False)
    ax.set_yticks(range(L + 1))
    ax.set_yticklabels(
        [f"{l} (attn dropped)" if l in capture.dropped else str(l) for l in range(L)] + ["final prediction"], fontsize=7
    )
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(
        [f"{start + c}\n{_short(texts[capture.token_ids[start + c]])}" for c in range(n_cols)], fontsize=6
    )
    for label in ax.get_xticklabels():
        label.set_parse_math(False)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L + 1, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    q = capture.n_prompt + step - 1  # the query position
    target = capture.token_ids[capture.n_prompt + step]
    head_text = {"max": "max over heads", "mean": "mean over heads"}.get(heads, f"head {heads}")
    title = (
        f"step {step}: query = position {q} {texts[capture.token_ids[q]]!r} -> predicts {texts[target]!r}\n"
        f"colour: attention of the query ({head_text}); label: logit-lens top-1 of that layer at that position"
    )
    ax.set_title(title, fontsize=8, loc="left")
    ax.set_xlabel("key position / token", fontsize=7)
    fig.colorbar(image, cax=cax)
    with warnings.catch_warnings():  # tokens in scripts the default font lacks (CJK, ...) draw as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path)


# ---------------------------------------------------------------- HTML viewer


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def viewer_payload(
    capture: AttnCapture, texts: dict[int, str], *, model: str, prompt: str, chat: bool, window: int, stride: int, heads
) -> dict:
    """The viewer's data: only the current query's attention rows (uint8 0-255, zlib), lens top-k per position.

    Rows are stored step by step, then kept layer, then head: step i holds K * H * T_i bytes.
    """
    kept = [l for l in range(capture.num_layers) if l not in capture.dropped]
    rows = np.concatenate([np.rint(np.clip(a[kept], 0, 1) * 255).astype(np.uint8).ravel() for a in capture.attn])
    return {
        "format": "llmdrop.attnmap/1",
        "model": model,
        "prompt": prompt,
        "chat": chat,
        "num_layers": capture.num_layers,
        "num_heads": capture.num_heads,
        "dropped": capture.dropped,
        "n_prompt": capture.n_prompt,
        "steps": capture.steps,
        "token_ids": capture.token_ids,
        "vocab": {str(i): t for i, t in texts.items()},
        "top_k": int(capture.lens_ids.shape[-1]),
        "lens_ids": _b64(capture.lens_ids.astype("<i4")),
        "lens_probs": _b64(np.rint(capture.lens_probs * 65535).astype("<u2")),
        "attn": base64.b64encode(zlib.compress(rows.tobytes(), 6)).decode("ascii"),
        "window": window,
        "stride": stride,
        "heads": str(heads),
    }


def render_html(payload: dict) -> str:
    template = resources.files("llmdrop").joinpath("data", VIEWER_TEMPLATE).read_text(encoding="utf-8")
    # "</" inside the JSON would end the <script> element early; "<\/" is the same JSON string
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return template.replace(DATA_MARKER, data)


# ---------------------------------------------------------------- API


def _formats(formats) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise LlmdropError(f"--format takes png, html or png,html, not {formats!r}")
    return items


def attnmap(
    model=None,
    *,
    prompt: str,
    out: str,
    chat: bool = False,
    max_new_tokens: int = 20,
    formats="png,html",
    heads="max",
    window: int = 32,
    stride: int = 5,
    all_windows: bool = True,
    top_k: int = 5,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate greedily from ``prompt`` and write attention maps with a logit lens to ``out``.

    ``formats``: png (``attn_{i}_{j}.png``: step i, window j) and/or html (one self-contained viewer).
    ``heads``: max | mean | a head index. ``all_windows``: every window of each step, else only the last one
    (the one ending at the query).
    Returns a summary: files written, prompt / generated tokens, text.
    """
    from llmdrop.files import atomic_dir, check_output_dir
    from llmdrop.source.models import as_loaded, model_input

    fmts = _formats(formats)
    parse_heads(heads, 1 << 30)  # the form now, the range once the model is loaded
    windows(window + 1, window, stride)  # validates window / stride before the (slow) load
    out_dir = Path(out)
    check_output_dir(out_dir, overwrite, inputs=[model_input(model)])
    loaded = as_loaded(model, attn_implementation="eager")  # a model loaded already is switched for the capture
    head_choice = parse_heads(heads, loaded.model.config.num_attention_heads)
    prompt_ids = encode_prompt(loaded.tokenizer, prompt, chat)
    cap = capture(
        loaded.model,
        loaded.adapter,
        loaded.tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        progress=progress,
    )
    texts = token_texts(loaded.tokenizer, list(cap.token_ids) + cap.lens_ids.ravel().tolist())

    files = []
    with atomic_dir(out_dir, overwrite, inputs=[loaded.path]) as tmp:
        if "png" in fmts:
            from tqdm.auto import tqdm

            jobs = []
            for i, a in enumerate(cap.attn):
                wins = windows(a.shape[-1], window, stride)
                chosen = list(enumerate(wins)) if all_windows else [(len(wins) - 1, wins[-1])]
                jobs += [(i, j, s, e) for j, (s, e) in chosen]
            for i, j, s, e in tqdm(jobs, desc="attnmap: PNG", disable=not progress, leave=False):
                render_png(cap, texts, i, s, e, tmp / f"attn_{i}_{j}.png", heads=head_choice)
                files.append(f"attn_{i}_{j}.png")
        if "html" in fmts:
            payload = viewer_payload(
                cap,
                texts,
                model=loaded.source,
                prompt=prompt,
                chat=chat,
                window=window,
                stride=stride,
                heads=head_choice,
            )
            (tmp / HTML_NAME).write_text(render_html(payload), encoding="utf-8")
            files.append(HTML_NAME)
    return {
        "out": str(out_dir),
        "files": files,
        "steps": cap.steps,
        "prompt_tokens": cap.n_prompt,
        "generated_ids": cap.generated,
        "generated_text": loaded.tokenizer.decode(cap.generated, skip_special_tokens=False),
        "num_layers": cap.num_layers,
        "num_heads": cap.num_heads,
        "dropped_attn": cap.dropped,
        "heads": str(head_choice),
        "capture": cap,
    }
