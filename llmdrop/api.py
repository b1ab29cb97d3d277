"""The Python API: every CLI verb is a function here, with the same parameters.

MODEL is a name (Hub id, local folder, ``.gguf`` file, builtin alias), a ``LoadSpec`` (the name plus how to load
it) or an already loaded model; calibration is a source string or a ``CalibSpec``. The functions chain the
pipeline stages; the verbs of the analysis commands live in their own modules and are re-exported here.
"""

import time
from dataclasses import replace
from pathlib import Path

from .arch import absent_parts, mask_absent
from .data import CalibSpec, check_seq_len, check_sizes, load_texts, max_positions, tokens_from_texts
from .errors import LlmdropError
from .export import export
from .exporters import check_format_for_source, check_format_name
from .files import JSON, check_output_dir, check_outputs, check_writable_parent, plot_suffixes
from .models import (
    DEFAULT_MODEL,
    LoadedModel,
    LoadSpec,
    ModelArg,
    as_loaded,
    as_spec,
    model_input,
    source_config,
    source_identity,
    source_of,
)
from .plan import DropPlan, parse_layers, select
from .scoring import Scores, compute_importance
from .surgery import drop_sublayers

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "english_sample.txt"
DEFAULT_EVAL_SEQ_LEN = 512

__all__ = [
    "LoadSpec",
    "CalibSpec",
    "score",
    "drop",
    "evaluate",
    "quantize",
    "heal",
    "push",
    "bench",
    "probe",
    "inject",
    "attnmap",
    "act_search",
    "act_eval",
    "act_apply",
]


def as_layers(value, num_layers: int) -> list[int]:
    """A CLI string ('3,5,20-29') or a Python list of layers, checked against the model."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return parse_layers(text, num_layers)


def score(
    model: ModelArg = None,
    *,
    calib: str | CalibSpec = "self",
    metric: str = "cosine",
    batch_size: int = 1,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    stream: bool = False,
    device_map: str | None = None,
    overwrite: bool = False,
) -> Scores:
    """Importance of every attention sublayer, MLP sublayer and block of ``model`` (lower = more redundant).

    ``stream``: one decoder layer at a time from the safetensors files (``llmdrop.streaming``), for models larger
    than memory. Under torchrun every rank scores its share of the batches; rank 0 alone writes ``out`` / ``plot``.
    ``device_map`` (e.g. ``"auto"``): one model in memory spread over several GPUs by accelerate.
    An existing ``out`` / ``plot`` is replaced only with ``overwrite``.
    """
    from .distributed import device_for_rank, is_main, setup

    calib = CalibSpec.of(calib)
    check_sizes(batch_size=batch_size)
    check_outputs(
        {"--out": (out, JSON), "--plot": (plot, plot_suffixes() if plot else None)},
        overwrite=overwrite,
        inputs=[model_input(model), calib.input],
    )
    calib = calib.fitted(_config_of(model))
    model = _with_device_map(model, device_map, stream)
    setup()  # joins torchrun's process group, if launched by it
    if not isinstance(model, LoadedModel) and not device_map:  # under torchrun: this rank's own GPU
        model = replace(as_spec(model), device=device_for_rank(as_spec(model).device))
    if stream:
        from .streaming import check_streamable, load_skeleton, stream_importance

        spec = check_streamable(model, calib)
        loaded = load_skeleton(spec)
        tokens = calib.fitted(loaded.model.config).tokens(loaded.tokenizer)
        importance = stream_importance(
            spec, tokens, metric=metric, batch_size=batch_size, progress=progress, skeleton=loaded
        )
    else:
        loaded = as_loaded(model)
        tokens = calib.tokens(loaded.tokenizer, loaded.model)
        importance = compute_importance(
            loaded.model, loaded.adapter, tokens, metric=metric, batch_size=batch_size, progress=progress
        )
    scores = Scores(loaded.source, loaded.num_layers, metric, calib.record(tokens), importance)
    if not is_main():
        return scores
    if out:
        scores.save(out)
    if plot:
        from .report import plot_scores

        plot_scores(scores, plot)
    return scores


def _iterative_plan(
    loaded: LoadedModel,
    tokens,
    *,
    attn: int,
    mlp: int,
    n_blocks: int,
    joint: int,
    metric: str,
    batch_size: int,
    progress: bool,
) -> tuple[DropPlan, list[dict], dict]:
    """Drop one part at a time, re-scoring the (in-memory) dropped model after each drop."""
    n = loaded.num_layers
    dropped = {"attn": set(), "mlp": set()}
    steps, first = [], None
    requests = [("block", n_blocks), ("attn", attn), ("mlp", mlp), ("joint", joint)]
    for kind, count in requests:
        for _ in range(count):
            imp = compute_importance(
                loaded.model, loaded.adapter, tokens, metric=metric, batch_size=batch_size, progress=progress
            )
            first = first or imp
            kinds = ("attn", "mlp") if kind == "joint" else (kind,)
            candidates = []
            for k in kinds:
                for i in range(n):
                    gone = imp["attn"][i] is None and imp["mlp"][i] is None  # None: dropped (now or in the source)
                    if not gone and imp[k][i] is not None:
                        candidates.append((imp[k][i], i, k))
            if not candidates:
                raise LlmdropError(f"cannot drop more {kind} parts: none left")
            value, layer, k = min(candidates)
            for part in ("attn", "mlp") if k == "block" else (k,):
                dropped[part].add(layer)
            steps.append({"kind": k, "layer": layer, "importance": value})
            drop_sublayers(loaded.model, loaded.adapter, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]))
    plan = DropPlan(n, attn=sorted(dropped["attn"]), mlp=sorted(dropped["mlp"]), method="iterative")
    return plan, steps, first


def _config_of(model: ModelArg) -> dict:
    """The config of a loaded model, else what the source's config.json says ({} until loaded: GGUF, Hub ids)."""
    return model.model.config.to_dict() if isinstance(model, LoadedModel) else source_config(*source_of(model))


def _check_scores_model(scores: Scores, where: str, model: ModelArg) -> None:
    """Scores of another model (with as many layers) would silently pick the wrong parts: refuse unless they name
    this model. Spellings of one model match: relative and absolute paths, the builtin alias and its .gguf file."""
    recorded = source_identity(scores.model)
    current = source_identity(*source_of(model))
    # a GGUF folder recorded without its --gguf-file: the folder has to match
    if recorded == current or (recorded[1] is None and recorded[0] == current[0]):
        return
    name = model.source if isinstance(model, LoadedModel) else source_of(model)[0] or DEFAULT_MODEL
    raise LlmdropError(
        f"the scores{where} were computed on {scores.model!r}, not on {name!r}; score this model "
        "(leave out --scores), or pass --force-scores if it is the same model"
    )


def _check_request(n: int, absent: dict, scores, lists, skip_attention_from, **counts) -> None:
    """What the layer count and the parts the source lacks (``absent``: an export's own drops) refuse: run before
    loading (from config.json) and again once loaded, before scoring."""
    if scores is not None and scores.num_layers != n:
        raise LlmdropError(f"the scores are for {scores.num_layers} layers but the model has {n}")
    for value, (kind, what, option) in zip(lists, _LISTS):
        gone = sorted(set(as_layers(value, n)) & set(absent.get(kind, ())))
        if gone:
            raise LlmdropError(
                f"{what} of layer {gone[0]} is not in the model any more (it is an export that dropped "
                f"{what} {', '.join(map(str, absent[kind]))}): leave it out of {option}"
            )
    if skip_attention_from is not None:
        from .manipulate import skip_attention_layers

        skip_attention_layers(n, skip_attention_from)
    if any(counts.values()):
        # Selecting on equal importances makes every check (and message) of the real selection; explicit lists
        # only narrow the choice further, which the real selection checks.
        select(mask_absent({kind: [0.0] * n for kind in ("attn", "mlp", "block")}, absent), **counts)


# the explicit lists of drop(), in its order: (part, name in messages, option)
_LISTS = (
    ("attn", "attention", "--attn-layers"),
    ("mlp", "the MLP", "--mlp-layers"),
    ("block", "block", "--block-layers"),
)


def _check_shard_size(value, model: ModelArg, *, stream: bool, in_memory: bool) -> int:
    """--max-shard-size in bytes, refused unless the export will be copied tensor by tensor from safetensors files
    (told by the flags and the source, before any model work)."""
    from .stream_export import parse_shard_size
    from .streaming import can_stream

    size = parse_shard_size(value)
    why = (
        "--compensate / --iterative change the weights in memory"
        if in_memory
        else None
        if stream or (not isinstance(model, LoadedModel) and can_stream(as_spec(model)))
        else "this source is not a plain safetensors checkpoint on disk"
    )
    if why:
        raise LlmdropError(f"--max-shard-size applies to exports copied from safetensors files; {why}")
    return size


def _with_device_map(model: ModelArg, device_map: str | None, stream: bool) -> ModelArg:
    """``model`` to be loaded with accelerate's ``device_map`` (None: as it is)."""
    if not device_map:
        return model
    if stream:
        raise LlmdropError(
            "--device-map spreads a whole model over devices; --stream holds one layer at a time: pick one"
        )
    if isinstance(model, LoadedModel):
        raise LlmdropError("--device-map applies when llmdrop loads the model; this one is loaded already")
    return replace(as_spec(model), device_map=device_map)


def _load_for_drop(model: ModelArg, *, stream: bool, calib, whole: bool) -> LoadedModel:
    """What ``drop`` works on: a skeleton on the meta device (no weight read; scoring, if any, streams and the export
    copies tensors from the source files) with ``stream``, or when only the plan and the files are needed (explicit
    lists, a scores file) and the source is a safetensors checkpoint; else the whole model in memory."""
    from .streaming import can_stream, check_streamable, load_skeleton

    if stream:
        return load_skeleton(check_streamable(model, calib))
    spec = as_spec(model)
    if not whole and spec is not None and can_stream(spec):
        return load_skeleton(spec)
    return as_loaded(model)


def _streamed_export_source(model: ModelArg, loaded: LoadedModel) -> LoadedModel:
    """A skeleton to export from, tensor by tensor from the source files, when they are safetensors (the whole model
    in memory is then let go); else ``loaded``."""
    from .streaming import can_stream, load_skeleton

    spec = as_spec(model)
    if loaded.info.get("weights_folder") or spec is None or not can_stream(spec):
        return loaded
    return load_skeleton(spec)


def drop(
    model: ModelArg = None,
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
    calib: str | CalibSpec = "self",
    metric: str = "cosine",
    batch_size: int = 1,
    dtype: str = "auto",
    fmt: str = "auto",
    overwrite: bool = False,
    force_scores: bool = False,
    selector: str = "cosine",
    candidates: int | None = None,
    loss_samples: int = 8,
    compensate: str | None = None,
    compensate_ridge: float = 1.0,
    progress: bool = True,
    stream: bool = False,
    max_shard_size: str | int | None = None,
    device_map: str | None = None,
) -> tuple[Path, DropPlan]:
    """Choose what to drop (by score or explicitly) and export the result to ``out``.

    ``skip_attention_from=K`` drops the attention sublayers of layers K..L-1 (the "skip-attention" manipulation).
    ``scores`` made for another model are refused unless ``force_scores``. ``dtype`` is the saved dtype (auto: as
    loaded); ``fmt`` the checkpoint format (auto | vanilla | llmdrop, see ``llmdrop.exporters``).
    ``stream`` scores one layer at a time from the safetensors files and never loads the whole model. A safetensors
    source whose weights the drop leaves unchanged is exported tensor by tensor from its files
    (``llmdrop.stream_export``; ``max_shard_size``: the output's shard size, default transformers').
    ``device_map`` (e.g. ``"auto"``) spreads the model in memory over several GPUs (accelerate).
    ``selector`` (cosine | loss | angular-contiguous | reverse, see ``llmdrop.select``) chooses the counted parts;
    ``loss`` pre-filters to the ``candidates`` lowest by cosine and evaluates on the first ``loss_samples``
    calibration blocks. ``compensate="linear"`` folds a least-squares map (shrunk toward the plain drop by
    ``compensate_ridge``) for every dropped run of blocks into the
    layer before it (``llmdrop.compensate``).
    """
    if not out:
        raise LlmdropError("give an output directory (-o OUT)")
    model = _with_device_map(model, device_map, stream)
    # Everything that needs no model is checked first: loading and scoring take minutes.
    calib = CalibSpec.of(calib)
    scores_file = scores if isinstance(scores, (str, Path)) else None
    check_output_dir(out, overwrite, inputs=[model_input(model), scores_file, calib.input])
    check_sizes(batch_size=batch_size)
    check_format_name(fmt)
    layer_args = (attn_layers, mlp_layers, block_layers)
    for text in layer_args:
        if isinstance(text, str):
            parse_layers(text)  # syntax errors first; ranges need the layer count
    counted = attn or mlp or blocks or joint
    if skip_attention_from is not None and (counted or iterative):
        raise LlmdropError(
            "--skip-attention-from combines only with explicit layer lists, not with "
            "--attn/--mlp/--blocks/--joint counts or --iterative"
        )
    if iterative and (not counted or any(layer_args)):
        raise LlmdropError("--iterative needs counts (--attn/--mlp/--blocks/--joint N) and no explicit lists")
    if stream and (iterative or compensate or selector != "cosine"):
        raise LlmdropError(
            "--stream scores with the cosine selector only: --iterative, --compensate and other selectors run the "
            "model in memory"
        )
    from .compensate import check_method, check_supported
    from .select import check_selection

    check_method(
        compensate,
        ridge=compensate_ridge,
        may_drop_blocks=bool(blocks or block_layers or joint or ((attn or attn_layers) and (mlp or mlp_layers))),
    )
    check_selection(
        selector,
        candidates=candidates,
        loss_samples=loss_samples,
        counts={"attn": attn, "mlp": mlp, "blocks": blocks, "joint": joint},
        explicit=any(layer_args) or skip_attention_from is not None,
        iterative=iterative,
        scores_given=scores is not None,
    )
    if isinstance(scores, (str, Path)):
        where = f" in {scores}"
        scores = Scores.load(scores)
    else:
        where = ""
    if scores is not None and not force_scores:
        _check_scores_model(scores, where, model)
    counts = {"attn": attn, "mlp": mlp, "blocks": blocks, "joint": joint}
    # What the source's config.json tells (nothing yet for GGUF files and Hub ids: then right after loading).
    config = _config_of(model)
    calib = calib.fitted(config)
    if isinstance(config.get("num_hidden_layers"), int):
        _check_request(
            config["num_hidden_layers"], absent_parts(config), scores, layer_args, skip_attention_from, **counts
        )
    check_format_for_source(fmt, config)
    if max_shard_size is not None:
        max_shard_size = _check_shard_size(
            max_shard_size, model, stream=stream, in_memory=bool(iterative or compensate)
        )
    needs_calib = counted and scores is None
    loaded = _load_for_drop(
        model, stream=stream, calib=calib if needs_calib else None, whole=bool(counted or iterative or compensate)
    )
    n = loaded.num_layers
    calib = calib.fitted(loaded.model.config)
    absent = absent_parts(loaded.model.config)  # an export's own drops: never chosen again
    _check_request(n, absent, scores, layer_args, skip_attention_from, **counts)  # GGUF / Hub sources: before scoring
    if scores is not None:
        scores.importance = mask_absent(scores.importance, absent)  # scores of an older llmdrop gave them 0
    if compensate:
        check_supported(loaded.adapter)
    lists = {
        k: as_layers(v, n)
        for k, v in (("attn_layers", attn_layers), ("mlp_layers", mlp_layers), ("block_layers", block_layers))
    }
    extra = {}
    tokens = None
    if skip_attention_from is not None:
        # the same attention drops as `probe --manipulation skip-attention` at that layer (llmdrop.manipulate)
        from .manipulate import skip_attention_layers

        skipped = set(skip_attention_layers(n, skip_attention_from)) - set(absent["attn"])
        lists["attn_layers"] = sorted(set(lists["attn_layers"]) | skipped)
        extra["skip_attention_from"] = skip_attention_from
    if iterative:
        tokens = calib.tokens(loaded.tokenizer, loaded.model)
        plan, steps, first = _iterative_plan(
            loaded,
            tokens,
            attn=attn,
            mlp=mlp,
            n_blocks=blocks,
            joint=joint,
            metric=metric,
            batch_size=batch_size,
            progress=progress,
        )
        scores = Scores(loaded.source, n, metric, calib.record(tokens), first)
        extra["iterative_steps"] = steps
    elif counted and selector != "cosine":
        from .select import choose

        start = time.perf_counter()
        tokens = calib.tokens(loaded.tokenizer, loaded.model) if selector != "reverse" else None
        if selector == "loss" and scores is None:  # the cosine pre-filter
            imp = compute_importance(
                loaded.model, loaded.adapter, tokens, metric=metric, batch_size=batch_size, progress=progress
            )
            scores = Scores(loaded.source, n, metric, calib.record(tokens), imp)
        plan, extra["selection"] = choose(
            selector,
            loaded,
            tokens,
            importance=scores.importance if scores else None,
            **counts,
            candidates=candidates,
            loss_samples=loss_samples,
            batch_size=batch_size,
            progress=progress,
        )
        extra["selection"]["seconds_total"] = round(time.perf_counter() - start, 3)  # calibration and scoring too
    elif counted:
        if scores is None and compensate:  # the same calibration tokens for both, sampled once
            tokens = calib.tokens(loaded.tokenizer, loaded.model)
            imp = compute_importance(
                loaded.model, loaded.adapter, tokens, metric=metric, batch_size=batch_size, progress=progress
            )
            scores = Scores(loaded.source, n, metric, calib.record(tokens), imp)
        elif scores is None:
            scored = as_spec(model) if stream else loaded
            scores = score(scored, calib=calib, metric=metric, batch_size=batch_size, progress=progress, stream=stream)
        plan = select(scores.importance, attn=attn, mlp=mlp, blocks=blocks, joint=joint, **lists)
        extra["selection"] = {"selector": "cosine", "metric": scores.metric}
    else:
        plan = DropPlan(n, blocks=lists["block_layers"], attn=lists["attn_layers"], mlp=lists["mlp_layers"])
        if plan.empty:
            raise LlmdropError("nothing to drop: give --attn/--mlp/--blocks/--joint N or explicit layer lists")
    plan = plan.without_empty_layers(absent)
    if any(absent.values()):
        extra["already_dropped"] = absent  # the source export's own drops; the plan is what this run removed
    if compensate:
        from .compensate import compensate_linear

        if tokens is None:
            tokens = calib.tokens(loaded.tokenizer, loaded.model)
        extra["compensation"] = compensate_linear(
            loaded, plan, tokens, batch_size=batch_size, progress=progress, ridge=compensate_ridge
        )
    if not (iterative or compensate):  # the weights in memory are the source's: copy them from its safetensors files
        loaded = _streamed_export_source(model, loaded)
    path = export(
        loaded,
        plan,
        out,
        dtype=dtype,
        overwrite=overwrite,
        fmt=fmt,
        scores=scores,
        calibration=scores.calibration if scores else None,
        extra=extra,
        max_shard_size=max_shard_size,
        progress=progress,
    )
    return path, plan


def evaluate(
    model: ModelArg = None,
    *,
    text: str | None = None,
    seq_len: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    save: bool = False,
    progress: bool = True,
    tasks: str | list[str] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
) -> dict:
    """Perplexity of ``model`` on ``text`` (default: the English sample shipped with llmdrop), in blocks of
    ``seq_len`` tokens (default: 512, or the model's positions if it has fewer).

    ``tasks`` (names, or one comma-separated string) runs lm-evaluation-harness tasks instead (``llmdrop.harness``:
    lm-eval 0.4.x, ``pip install 'llmdrop[eval]'``), with ``num_fewshot``, ``limit`` (documents per task, or a
    fraction below 1) and ``include_path`` (a folder of the user's own task YAMLs); the result is
    ``{"model", "tasks": [{"task", "metrics", "samples", "num_fewshot", ...}]}``. ``llmdrop_mc`` and
    ``llmdrop_capitals`` ship with llmdrop and run offline.

    ``save`` also records the result in MODEL/eval_results.json, which `llmdrop push` puts in the model card.
    """
    check_sizes(samples=samples, seq_len=seq_len, batch_size=batch_size)
    if tasks is None and (num_fewshot, limit, include_path) != (None, None, None):
        raise LlmdropError("--num-fewshot, --limit and --include-path go with --tasks (lm-evaluation-harness tasks)")
    if tasks is not None and (text, samples) != (None, None):
        raise LlmdropError("--text and --samples are for perplexity; tasks bring their own data (--limit cuts them)")
    folder = source_of(model)[0]
    folder = Path(folder).expanduser() if folder else None
    if save and not (folder and folder.is_dir()):
        raise LlmdropError(
            f"--save writes MODEL/eval_results.json, so MODEL must be a local checkpoint directory "
            f"(got {str(folder) if folder else 'the builtin default model'!r})"
        )
    if save:
        check_writable_parent(folder / "eval_results.json")
    if tasks is not None:
        from . import harness

        names, limit = harness.parse_tasks(tasks), harness.check_limit(limit)
        if num_fewshot is not None and num_fewshot < 0:
            raise LlmdropError(f"--num-fewshot must be >= 0, got {num_fewshot}")
        manager = harness.task_manager(names, include_path)  # unknown tasks fail before the model loads
        loaded = as_loaded(model)
        results = harness.evaluate_tasks(
            loaded, names, manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size
        )
        result = {"model": loaded.source, "tasks": results}
    else:
        result = _perplexity(model, text, seq_len, samples, seed, batch_size, progress)
    if save:
        from .card import save_eval_result

        return {**result, "saved_to": str(save_eval_result(folder, result))}
    return result


def _perplexity(model, text, seq_len, samples, seed, batch_size, progress) -> dict:
    from .evaluation import perplexity

    text_path = text or DEFAULT_EVAL_TEXT
    texts = load_texts(text_path)  # a bad text file fails before the model loads
    if seq_len is not None:
        check_seq_len(seq_len, _config_of(model))
    loaded = as_loaded(model)
    if seq_len is None:
        seq_len = min(DEFAULT_EVAL_SEQ_LEN, max_positions(loaded.model.config) or DEFAULT_EVAL_SEQ_LEN)
    check_seq_len(seq_len, loaded.model.config)
    tokens = tokens_from_texts(
        texts, loaded.tokenizer, samples=samples, seq_len=seq_len, seed=seed, purpose="evaluation"
    )
    return {
        "model": loaded.source,
        "text": str(text_path),
        **perplexity(loaded.model, tokens, batch_size=batch_size, progress=progress),
    }


# The verbs of the other stages and of the analysis commands, so that every CLI verb is found here (imported last:
# some of those modules use the helpers above).
from .act import act_apply, act_eval, act_search  # noqa: E402
from .attnmaps import attnmap  # noqa: E402
from .bench import bench  # noqa: E402
from .healing import heal  # noqa: E402
from .hub import push  # noqa: E402
from .probing import inject, probe  # noqa: E402
from .quantize import quantize  # noqa: E402
