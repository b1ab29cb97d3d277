"""The Python API: one function per CLI verb, same parameters. Each chains the pipeline stages."""

from pathlib import Path

from .data import calibration_blocks, blocks_from_texts, load_texts
from .errors import LlmdropError
from .export import check_output_dir, export
from .models import LoadedModel, load_model
from .plan import DropPlan, parse_layers, select
from .scoring import Scores, compute_importance
from .surgery import drop_sublayers

# `self` text is sampled token by token, so it gets a smaller default than real text (paper: 128 x 2048).
DEFAULT_CALIBRATION = {"self": (32, 256), "text": (128, 2048)}
DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "english_sample.txt"


def _load(model, loaded, **load_kwargs) -> LoadedModel:
    return loaded if loaded is not None else load_model(model, **load_kwargs)


def _as_layers(value, num_layers: int) -> list[int]:
    """A CLI string ('3,5,20-29') or a Python list of layers, checked against the model."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return parse_layers(text, num_layers)


def calibration_defaults(calib: str, samples: int | None, seq_len: int | None) -> tuple[int, int]:
    d_samples, d_len = DEFAULT_CALIBRATION["self" if calib == "self" else "text"]
    return samples or d_samples, seq_len or d_len


def score(
    model: str | None = None,
    *,
    calib: str = "self",
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    metric: str = "cosine",
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    out: str | None = None,
    plot: str | None = None,
    loaded: LoadedModel | None = None,
    progress: bool = True,
) -> Scores:
    """Importance of every attention sublayer, MLP sublayer and block of ``model`` (lower = more redundant)."""
    loaded = _load(model, loaded, device=device, dtype=dtype, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    samples, seq_len = calibration_defaults(calib, samples, seq_len)
    blocks = calibration_blocks(calib, loaded.tokenizer, samples=samples, seq_len=seq_len, seed=seed, model=loaded.model)
    importance = compute_importance(loaded.model, loaded.adapter, blocks, metric=metric, batch_size=batch_size,
                                    progress=progress)
    calibration = {"source": calib, "samples": samples, "seq_len": seq_len, "seed": seed, "tokens": blocks.numel()}
    scores = Scores(loaded.source, loaded.num_layers, metric, calibration, importance)
    if out:
        scores.save(out)
    if plot:
        from .report import plot_scores

        plot_scores(scores, plot)
    return scores


def _iterative_plan(loaded: LoadedModel, blocks, *, attn: int, mlp: int, n_blocks: int, joint: int, metric: str,
                    batch_size: int, progress: bool) -> tuple[DropPlan, list[dict], dict]:
    """Drop one part at a time, re-scoring the (in-memory) dropped model after each drop."""
    n = loaded.num_layers
    dropped = {"attn": set(), "mlp": set()}
    steps, first = [], None
    requests = [("block", n_blocks), ("attn", attn), ("mlp", mlp), ("joint", joint)]
    for kind, count in requests:
        for _ in range(count):
            imp = compute_importance(loaded.model, loaded.adapter, blocks, metric=metric, batch_size=batch_size,
                                     progress=progress)
            first = first or imp
            kinds = ("attn", "mlp") if kind == "joint" else (kind,)
            candidates = []
            for k in kinds:
                for i in range(n):
                    gone = i in dropped["attn"] and i in dropped["mlp"]
                    if not gone and (k == "block" or i not in dropped[k]):
                        candidates.append((imp[k][i], i, k))
            if not candidates:
                raise LlmdropError(f"cannot drop more {kind} parts: none left")
            value, layer, k = min(candidates)
            for part in (("attn", "mlp") if k == "block" else (k,)):
                dropped[part].add(layer)
            steps.append({"kind": k, "layer": layer, "importance": value})
            drop_sublayers(loaded.model, loaded.adapter, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]))
    plan = DropPlan(n, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]), method="iterative")
    return plan, steps, first


def drop(
    model: str | None = None,
    out: str | None = None,
    *,
    attn: int = 0,
    mlp: int = 0,
    blocks: int = 0,
    joint: int = 0,
    attn_layers: str | list[int] | None = None,
    mlp_layers: str | list[int] | None = None,
    block_layers: str | list[int] | None = None,
    scores: str | Scores | None = None,
    iterative: bool = False,
    skip_attention_from: int | None = None,
    calib: str = "self",
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    metric: str = "cosine",
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    loaded: LoadedModel | None = None,
    progress: bool = True,
) -> tuple[Path, DropPlan]:
    """Choose what to drop (by score or explicitly) and export the result to ``out``.

    ``skip_attention_from=K`` drops the attention sublayers of layers K..L-1 (the "skip-attention" manipulation).
    """
    if not out:
        raise LlmdropError("give an output directory (-o OUT)")
    check_output_dir(Path(out), overwrite)  # fail before the slow part
    for text in (attn_layers, mlp_layers, block_layers):
        if isinstance(text, str):
            parse_layers(text)  # syntax errors before loading; ranges are checked once the model is known
    loaded = _load(model, loaded, device=device, dtype=dtype, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    n = loaded.num_layers
    lists = {k: _as_layers(v, n) for k, v in (("attn_layers", attn_layers), ("mlp_layers", mlp_layers),
                                             ("block_layers", block_layers))}
    counted = attn or mlp or blocks or joint
    extra = {}
    if skip_attention_from is not None:
        # the same attention drops as `probe --manipulation skip-attention` at that layer (llmdrop.manipulate)
        if counted or iterative:
            raise LlmdropError("--skip-attention-from combines only with explicit layer lists, not with "
                               "--attn/--mlp/--blocks/--joint counts or --iterative")
        from .manipulate import skip_attention_layers

        lists["attn_layers"] = sorted(set(lists["attn_layers"]) | set(skip_attention_layers(n, skip_attention_from)))
        extra["skip_attention_from"] = skip_attention_from
    if isinstance(scores, (str, Path)):
        scores = Scores.load(scores)
    if scores is not None and scores.num_layers != n:
        raise LlmdropError(f"the scores are for {scores.num_layers} layers but the model has {n}")
    if iterative:
        if not counted or any(lists.values()):
            raise LlmdropError("--iterative needs counts (--attn/--mlp/--blocks/--joint N) and no explicit lists")
        samples, seq_len = calibration_defaults(calib, samples, seq_len)
        calib_blocks = calibration_blocks(calib, loaded.tokenizer, samples=samples, seq_len=seq_len, seed=seed,
                                          model=loaded.model)
        plan, steps, first = _iterative_plan(loaded, calib_blocks, attn=attn, mlp=mlp, n_blocks=blocks, joint=joint,
                                             metric=metric, batch_size=batch_size, progress=progress)
        calibration = {"source": calib, "samples": samples, "seq_len": seq_len, "seed": seed,
                       "tokens": calib_blocks.numel()}
        scores = Scores(loaded.source, n, metric, calibration, first)
        extra["iterative_steps"] = steps
    elif counted:
        if scores is None:
            scores = score(loaded=loaded, calib=calib, samples=samples, seq_len=seq_len, seed=seed, metric=metric,
                           batch_size=batch_size, progress=progress)
        plan = select(scores.importance, attn=attn, mlp=mlp, blocks=blocks, joint=joint, **lists)
    else:
        plan = DropPlan(n, blocks=lists["block_layers"], attn=lists["attn_layers"], mlp=lists["mlp_layers"])
        if plan.empty:
            raise LlmdropError("nothing to drop: give --attn/--mlp/--blocks/--joint N or explicit layer lists")
    path = export(loaded, plan, out, dtype=dtype, overwrite=overwrite, scores=scores,
                  calibration=scores.calibration if scores else None, extra=extra)
    return path, plan


def evaluate(
    model: str | None = None,
    *,
    text: str | None = None,
    seq_len: int = 512,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    save: bool = False,
    loaded: LoadedModel | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``text`` (default: the English sample shipped with llmdrop).

    ``save`` also records the result in MODEL/eval_results.json, which `llmdrop push` puts in the model card.
    """
    from .evaluation import perplexity

    if save and not (model and Path(model).expanduser().is_dir()):
        raise LlmdropError(f"--save writes MODEL/eval_results.json, so MODEL must be a local checkpoint directory "
                           f"(got {model or 'the builtin default model'!r})")
    loaded = _load(model, loaded, device=device, dtype=dtype, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    text_path = text or DEFAULT_EVAL_TEXT
    blocks = blocks_from_texts(load_texts(text_path), loaded.tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    result = {"model": loaded.source, "text": str(text_path),
              **perplexity(loaded.model, blocks, batch_size=batch_size, progress=progress)}
    if save:
        from .card import save_eval_result

        return {**result, "saved_to": str(save_eval_result(Path(model).expanduser(), result))}
    return result
