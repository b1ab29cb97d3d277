"""The Python API: every CLI verb is a function here, with the same parameters.

MODEL is a name (Hub id, local folder, ``.gguf`` file, builtin alias), a ``LoadSpec`` (the name plus how to load
it) or an already loaded model; calibration is a source string or a ``CalibSpec``. The functions chain the
pipeline stages; the verbs of the analysis commands live in their own modules and are re-exported here.
"""

import time
from dataclasses import replace
from pathlib import Path

from llmdrop import _PUBLIC
from llmdrop.errors import LlmdropError
from llmdrop.files import DATA_DIR, JSON, check_output_dir, check_outputs, check_writable_parent, plot_suffixes
from llmdrop.formats.export import export
from llmdrop.formats.exporters import check_request
from llmdrop.passes.runner import is_streamed
from llmdrop.passes.scoring import Scores, check_metric
from llmdrop.passes.scoring import needs_tokens as metric_needs_tokens
from llmdrop.planning.compensate import check_supported, compensate
from llmdrop.planning.plan import DropPlan
from llmdrop.planning.selectors import selector
from llmdrop.record import read_record
from llmdrop.request import DropRequest
from llmdrop.source.arch import absent_parts, mask_absent
from llmdrop.source.calibration import (
    CalibSpec,
    check_seq_len,
    check_sizes,
    load_texts,
    max_positions,
    tokens_from_texts,
)
from llmdrop.source.models import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelArg,
    as_loaded,
    as_spec,
    model_input,
    resolve_source,
    source_config,
    source_identity,
    source_of,
)

DEFAULT_EVAL_TEXT = DATA_DIR / "english_sample.txt"
DEFAULT_EVAL_SEQ_LEN = 512

# the public names that are this module's: written once, in llmdrop/__init__.py
__all__ = [name for name, module in _PUBLIC.items() if module == "api"]


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

    ``metric="gate-norm"`` scores attention sublayers only, from their query and key weights (no calibration tokens
    are made and ``calib`` is not read; with ``stream`` only those tensors are read from the safetensors files).

    ``stream``: one decoder layer at a time from the safetensors files (``llmdrop.source.streaming``), for models larger
    than memory. Under torchrun every rank scores its share of the batches; rank 0 alone writes ``out`` / ``plot``.
    ``device_map`` (e.g. ``"auto"``): one model in memory spread over several GPUs by accelerate.
    An existing ``out`` / ``plot`` is replaced only with ``overwrite``.
    """
    from llmdrop.passes.distributed import device_for_rank, is_main, setup

    check_metric(metric)
    data_free = not metric_needs_tokens(metric)
    calib = CalibSpec.of(calib)
    check_sizes(batch_size=batch_size)
    check_outputs(
        {"--out": (out, JSON), "--plot": (plot, plot_suffixes() if plot else None)},
        overwrite=overwrite,
        inputs=[model_input(model), calib.input],
    )
    config = _config_of(model)
    if data_free:
        from llmdrop.passes.gatenorm import check

        check(config)  # a GGUF or Hub source tells once loaded
    calib = calib.fitted(config)
    model = _with_device_map(model, device_map, stream)
    setup()  # joins torchrun's process group, if launched by it
    if not isinstance(model, LoadedModel) and not device_map:  # under torchrun: this rank's own GPU
        model = replace(as_spec(model), device=device_for_rank(as_spec(model).device))
    if stream:
        from llmdrop.source.streaming import check_streamable, load_skeleton

        loaded = load_skeleton(check_streamable(model, None if data_free else calib))
        tokens = None if data_free else calib.fitted(loaded.model.config).tokens(loaded.tokenizer)
    else:
        loaded = as_loaded(model)
        tokens = None if data_free else calib.tokens(loaded.tokenizer, loaded.model)
    from llmdrop.passes.scoring import importance

    imp = importance(loaded, tokens, metric=metric, batch_size=batch_size, progress=progress)
    scores = Scores(loaded.source, loaded.num_layers, metric, _calib_record(calib, tokens), imp)
    if not is_main():
        return scores
    if out:
        scores.save(out)
    if plot:
        from llmdrop.report import plot_scores

        plot_scores(scores, plot)
    return scores


def _calib_record(calib: CalibSpec, tokens) -> dict | None:
    """What the scores and llmdrop.json keep about the calibration (None: none was used, a data-free metric)."""
    return calib.record(tokens) if tokens is not None else None


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


def _check_shard_size(model: ModelArg, *, stream: bool, in_memory: bool) -> None:
    """--max-shard-size is refused unless the export will be copied tensor by tensor from safetensors files (told by
    the flags and the source, before any model work)."""
    from llmdrop.source.streaming import can_stream

    why = (
        "--compensate / --iterative change the weights in memory"
        if in_memory
        else None
        if stream or (not isinstance(model, LoadedModel) and can_stream(as_spec(model)))
        else "this source is not a plain safetensors checkpoint on disk"
    )
    if why:
        raise LlmdropError(f"--max-shard-size applies to exports copied from safetensors files; {why}")


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
    from llmdrop.source.streaming import can_stream, check_streamable, load_skeleton

    if stream:
        return load_skeleton(check_streamable(model, calib))
    spec = as_spec(model)
    if not whole and spec is not None and can_stream(spec):
        return load_skeleton(spec)
    return as_loaded(model)


def _streamed_export_source(model: ModelArg, loaded: LoadedModel) -> LoadedModel:
    """A skeleton to export from, tensor by tensor from the source files, when they are safetensors (the whole model
    in memory is then let go); else ``loaded``."""
    from llmdrop.source.streaming import can_stream, load_skeleton

    spec = as_spec(model)
    if loaded.info.get("weights_folder") or spec is None or not can_stream(spec):
        return loaded
    return load_skeleton(spec)


def drop(
    model: ModelArg = None,
    out: str | None = None,
    request: DropRequest | None = None,
    *,
    calib: str | CalibSpec = "self",
    overwrite: bool = False,
    progress: bool = True,
    stream: bool = False,
    device_map: str | None = None,
    **options,
) -> dict:
    """Choose what to drop (by a selector, or explicitly) and export the result to ``out``; returns the record
    written as ``out/llmdrop.json``.

    ``request`` is a ``DropRequest`` (or give its fields as keyword ``options``: ``attn=8``, ``block_layers="3-5"``,
    ``selector="loss"``, ``compensate="linear"``, ``fmt="nemotron-nas"``, ``iterative=True``, ...). ``stream``: the
    model is never whole in memory (a skeleton; scores, angular distances and compensation statistics are collected
    one layer at a time from the safetensors files, and the export copies tensors from them). ``device_map`` (e.g.
    ``"auto"``) spreads the model in memory over several GPUs (accelerate).
    """
    request = request or DropRequest.build(**options)
    if not out:
        raise LlmdropError("give an output directory (-o OUT)")
    # 1. check everything the flags and the source's config.json tell: loading and scoring take minutes
    model = _with_device_map(model, device_map, stream)
    calib = CalibSpec.of(calib)
    check_output_dir(out, overwrite, inputs=[model_input(model), request.scores_file, calib.input])
    request.check()
    selector(request.selector).check(request)
    chooser = selector(request.selector) if request.counted else None
    if stream and chooser and chooser.in_memory:
        raise LlmdropError(chooser.in_memory)
    scores = _given_scores(request, model)
    config = _config_of(model)
    check_request(request, gguf_file=_gguf_file_of(model), config=config, stream=stream)
    calib = calib.fitted(config)
    request.check_source(config, scores)
    weights_change = bool(request.compensate and not stream) or request.selector == "iterative"
    if request.max_shard_size is not None:
        _check_shard_size(model, stream=stream, in_memory=weights_change)
    # a data-free metric (gate-norm) scores from the weights: no calibration tokens, and from a safetensors source
    # the weights it reads are read alone (a skeleton, as when streaming)
    data_free = (
        chooser is not None and chooser.needs_cosine and scores is None and not metric_needs_tokens(request.metric)
    )
    needs_tokens = bool(request.compensate) or (
        chooser is not None and (chooser.needs_tokens or (chooser.needs_cosine and scores is None and not data_free))
    )

    # 2. load: a skeleton when streaming (or when only files are needed), else the model in memory
    loaded = _load_for_drop(
        model,
        stream=stream,
        calib=calib if needs_tokens else None,
        whole=bool(request.compensate or (request.counted and not data_free)),
    )
    calib = calib.fitted(loaded.model.config)
    request.check_source(loaded.model.config, scores)  # GGUF and Hub sources: now, before any pass
    absent = absent_parts(loaded.model.config)  # an export's own drops: never chosen again
    if request.compensate:
        check_supported(loaded.adapter, request.compensate)
        if request.compensate == "scale" and request.fmt == "gguf" and loaded.gguf_file:
            from llmdrop.formats.gguf_export import check_rescalable

            check_rescalable(Path(loaded.path) / loaded.gguf_file)  # its stored types, before the passes

    # 3. calibration tokens, once
    tokens = calib.tokens(loaded.tokenizer, None if is_streamed(loaded) else loaded.model) if needs_tokens else None

    # 4. choose (explicitly, or by the selector)
    extra = {"skip_attention_from": request.skip_attention_from} if request.skip_attention_from is not None else {}
    if chooser is None:
        plan = DropPlan(loaded.num_layers, **_plan_lists(request.explicit_lists(loaded.num_layers, absent)))
        if plan.empty and request.fmt != "gguf":  # an empty plan in GGUF: an existing export converted
            raise LlmdropError("nothing to drop: give --attn/--mlp/--blocks/--joint N or explicit layer lists")
    else:
        plan, extra[chooser.record_key], scores = _choose(chooser, loaded, tokens, request, scores, calib, progress)
    plan = plan.without_empty_layers(absent)
    if any(absent.values()):
        extra["already_dropped"] = absent  # the source export's own drops; the plan is what this run removed

    # 5. compensate
    replacements = None
    if request.compensate:
        extra["compensation"], replacements = compensate(
            request.compensate, loaded, plan, tokens, batch_size=request.batch_size, progress=progress,
            ridge=request.compensate_ridge,
        )  # fmt: skip

    # 6. export: tensor by tensor from the source's files when the weights in memory are the source's
    if not weights_change:
        loaded = _streamed_export_source(model, loaded)
    path = export(
        loaded,
        plan,
        out,
        dtype=request.dtype,
        overwrite=overwrite,
        fmt=request.fmt,
        scores=scores,
        calibration=scores.calibration if scores else _calib_record(calib, tokens),
        extra=extra,
        max_shard_size=request.max_shard_size,
        replacements=replacements or None,
        progress=progress,
    )
    return read_record(path)


def _gguf_file_of(model: ModelArg) -> str | None:
    """The GGUF file a model argument names (None: not a GGUF source, or one the load will explain)."""
    try:
        return resolve_source(*source_of(model))[1]
    except LlmdropError:
        return None


def _given_scores(request: DropRequest, model: ModelArg) -> Scores | None:
    """The --scores to reuse, refused when they record another model (unless --force-scores)."""
    scores = request.scores
    if scores is None:
        return None
    where = f" in {scores}" if isinstance(scores, (str, Path)) else ""
    scores = Scores.load(scores) if where else scores
    if not request.force_scores:
        _check_scores_model(scores, where, model)
    return scores


def _choose(chooser, loaded: LoadedModel, tokens, request: DropRequest, scores, calib, progress: bool):
    """(the plan, the selector's record, the scores to record): cosine scores first if the selector needs them and
    --scores gave none (in memory or streamed), then the selector; parts the source lacks are never chosen."""
    from llmdrop.passes.scoring import importance

    start, absent = time.perf_counter(), absent_parts(loaded.model.config)
    if chooser.needs_cosine and scores is None:
        imp = importance(loaded, tokens, metric=request.metric, batch_size=request.batch_size, progress=progress)
        scores = Scores(loaded.source, loaded.num_layers, request.metric, _calib_record(calib, tokens), imp)
    masked = mask_absent(scores.importance, absent) if scores else None  # scores of an older llmdrop gave them 0
    plan, record, own = chooser.choose(loaded, tokens, masked, request, absent=absent, progress=progress)
    if own is not None:
        scores = Scores(loaded.source, loaded.num_layers, request.metric, _calib_record(calib, tokens), own)
    if isinstance(record, dict):
        record["seconds_total"] = round(time.perf_counter() - start, 3)  # calibration and scoring too
    return plan, record, scores


def _plan_lists(lists: dict) -> dict:
    return {"blocks": lists["block_layers"], "attn": lists["attn_layers"], "mlp": lists["mlp_layers"]}


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

    ``tasks`` (names, or one comma-separated string) runs lm-evaluation-harness tasks instead (``checkpoints.harness``:
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
        from llmdrop.checkpoints import harness

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
        from llmdrop.formats.card import save_eval_result

        return {**result, "saved_to": str(save_eval_result(folder, result))}
    return result


def _perplexity(model, text, seq_len, samples, seed, batch_size, progress) -> dict:
    from llmdrop.passes.evaluation import perplexity

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


def auto(
    model: ModelArg = None,
    out: str | None = None,
    *,
    speedup: float | str | None = None,
    max_loss_increase: float | str | None = None,
    kv_cache: float | str | None = None,
    engine: str = "transformers",
    workload: str | None = None,
    calib: str = "self",
    seq_len: int = 256,
    search_rows: int = 8,
    verify_rows: int = 6,
    test_rows: int = 4,
    candidates: int = 16,
    verify: int = 6,
    refine: int = 24,
    bench_plans: int = 6,
    bench_repeats: int = 5,
    eval_texts: list[str] = (),
    seed: int = 0,
    remeasure: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    say=print,
) -> dict:
    """`llmdrop auto`: the plan that meets one target (``speedup``: at least this many times faster on ``engine``
    for ``workload``; ``kv_cache``: at most this fraction of the KV cache; ``max_loss_increase``: at most this
    perplexity increase, "10%" or 0.1) and is best at the other, found by measuring (``llmdrop.autosearch``), then
    exported to ``out`` in the engine's format with the report beside it (auto.json, auto.md, auto.png).
    ``dry_run`` stops before exporting. A target that cannot be met is an error, and nothing is written."""
    from llmdrop.autosearch import run as auto_run
    from llmdrop.autosearch.costs import Workload, check_engine
    from llmdrop.autosearch.search import Target

    target = Target.parse(speedup=speedup, max_loss_increase=max_loss_increase, kv_cache=kv_cache)
    work = Workload.parse(workload)
    check_engine(engine, work)
    splits = {"search": search_rows, "verify": verify_rows, "test": test_rows}
    auto_run.check_settings(
        splits,
        candidates=candidates,
        verify=verify,
        refine=refine,
        bench_plans=bench_plans,
        bench_repeats=bench_repeats,
        seq_len=seq_len,
    )
    if not dry_run:
        if not out:
            raise LlmdropError("give an output directory (-o OUT), or --dry-run")
        check_output_dir(out, overwrite, inputs=[model_input(model), CalibSpec.of(calib).input, *eval_texts])
    for path in eval_texts:
        load_texts(path)  # a bad file fails before the model loads
    gguf_file = _gguf_file_of(model)
    check_request(  # what the engine's format refuses of this source, before any model work
        DropRequest(attn=1, fmt=auto_run.EXPORT_FORMATS.get(engine, "nemotron-nas")),
        gguf_file=gguf_file,
        config=_config_of(model),
        stream=False,
    )
    loaded = as_loaded(model)
    gguf_path = Path(resolve_source(*source_of(model))[0]) / gguf_file if gguf_file else None
    report = auto_run.run(
        loaded,
        gguf_path,
        target,
        engine=engine,
        workload=work,
        calib=calib,
        seq_len=seq_len,
        splits=splits,
        candidates=candidates,
        verify=verify,
        refine=refine,
        bench_plans=bench_plans,
        bench_repeats=bench_repeats,
        eval_texts=list(eval_texts),
        remeasure=remeasure,
        seed=seed,
        progress=progress,
        say=say,
    )
    for line in auto_run.summary_lines(report):
        say(line)
    if not report["met"]:
        raise LlmdropError(auto_run.missed(report, target))
    if dry_run:
        return report
    chosen = report["chosen"]
    lists = chosen["lists"]
    del loaded  # the export loads the source again, as `llmdrop drop` does
    drop(
        model,
        out,
        block_layers=lists["blocks"] or None,
        attn_layers=lists["attn"] or None,
        mlp_layers=lists["mlp"] or None,
        fmt=chosen["format"],
        overwrite=overwrite,
        progress=progress,
    )
    auto_run.write_report(report, Path(out))
    return report


# The verbs of the other stages and of the analysis commands, so that every CLI verb is found here (imported last:
# some of those modules use the helpers above).
from llmdrop.analysis.act import act_apply, act_eval, act_search  # noqa: E402, F401
from llmdrop.analysis.attnmaps import attnmap  # noqa: E402, F401
from llmdrop.analysis.probing import inject, probe  # noqa: E402, F401
from llmdrop.checkpoints.healing import heal  # noqa: E402, F401
from llmdrop.checkpoints.quantization import quantize  # noqa: E402, F401
from llmdrop.serving.benchmark import bench  # noqa: E402, F401
from llmdrop.serving.hub import push  # noqa: E402, F401
