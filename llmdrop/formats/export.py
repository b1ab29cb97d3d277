"""Write a DropPlan applied to a model as a checkpoint directory that loads with transformers.

The checkpoint format is an exporter from ``exporters.py`` (``--format auto`` picks the first that can hold the
plan: vanilla for whole blocks only, else llmdrop's remote-code format). This module does what every format
shares: the provenance record ``llmdrop.json``, the model card, the tokenizer and generation config, the
atomic folder (``files.atomic_dir``) and the final check that the checkpoint reloads with no tensor missing or
unused.

The model is transformed in place and saved from there, so only one copy is ever in memory.
"""

import json
import logging
from pathlib import Path

from llmdrop.errors import LlmdropError
from llmdrop.files import atomic_dir, check_output_dir
from llmdrop.planning.plan import DropPlan
from llmdrop.record import EXPORT_FORMAT, now, source, versions, write_record
from llmdrop.source.models import LoadedModel, resolve_dtype

from .exporters import choose_exporter

# Keys transformers writes into tokenizer_config.json about how *this* machine fetched the files (e.g. offline):
# meaningless, or harmful (``local_files_only``), for whoever loads the checkpoint elsewhere.
_LOADING_KEYS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "force_download",
    "token",
    "use_auth_token",
    "proxies",
    "revision",
    "subfolder",
    "_commit_hash",
)

__all__ = ["export", "provenance"]


def strip_gguf_quantization(model) -> None:
    """A GGUF source is dequantized on load; the export holds plain weights and must not claim otherwise."""
    model.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False


def provenance(loaded: LoadedModel, plan: DropPlan, *, scores=None, calibration=None, extra=None) -> dict:
    attn, mlp = plan.exported_sublayers()
    return {
        "format": EXPORT_FORMAT,
        "source": source(loaded, plan.num_layers),
        "plan": plan.to_dict(),
        "layer_map": {str(k): v for k, v in plan.layer_map().items()},
        "exported": {
            "num_layers": len(plan.kept_layers),
            "drop_attn_list": attn,
            "drop_mlp_list": mlp,
            "remote_code": bool(attn or mlp),
        },
        "scores": scores.to_dict() if scores is not None else None,
        "calibration": calibration or (scores.calibration if scores is not None else None),
        "versions": versions(),
        "created": now(),
        **(extra or {}),
    }


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if any(k in config for k in _LOADING_KEYS):
            cleaned = {k: v for k, v in config.items() if k not in _LOADING_KEYS}
            path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_reload(folder: Path, model_class) -> None:
    """Refuse a checkpoint whose reload would leave a weight randomly initialised or a tensor unused (built on
    the meta device: only names and shapes are compared, no weight is read)."""
    from transformers.utils import logging as hf_logging

    from llmdrop.compat import META_LOAD

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loading report is ours to give
    try:
        logging.disable(logging.WARNING)
        _, info = model_class.from_pretrained(folder, output_loading_info=True, **META_LOAD)
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.set_verbosity(level)
    for kind, what in (
        ("missing_keys", "would load without"),
        ("unexpected_keys", "holds an unused tensor"),
        ("mismatched_keys", "holds a tensor of the wrong shape:"),
    ):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise LlmdropError(
                f"export refused: the checkpoint {what} {keys[0]}{more}; nothing was written "
                "(please report this as an llmdrop bug)"
            )


def export(
    loaded: LoadedModel,
    plan: DropPlan,
    out,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    fmt: str = "auto",
    scores=None,
    calibration=None,
    base_model: str | None = None,
    extra: dict | None = None,
    max_shard_size: str | int | None = None,
    replacements: dict | None = None,
    progress: bool = True,
) -> Path:
    """Apply ``plan`` to ``loaded.model`` (in place: the model is consumed) and save it to ``out`` in format
    ``fmt`` (auto | a name of ``exporters.EXPORTERS``).

    A skeleton from ``streaming.load_skeleton`` (``loaded.info["weights_folder"]``) is exported the same way, its
    weights copied tensor by tensor from the source files (``stream_export``); ``max_shard_size`` (default:
    transformers') applies to those streamed exports only, and so do ``replacements`` (stored tensor name -> function
    of it: the compensation maps of a streamed model; a model in memory has them folded in already).
    """
    from .card import model_card

    streamed = loaded.info.get("weights_folder")
    if max_shard_size is not None and not streamed:
        raise LlmdropError("--max-shard-size applies to streamed exports (safetensors sources); this one is in memory")

    out = check_output_dir(out, overwrite, inputs=[loaded.path])
    model = loaded.model
    if plan.num_layers != model.config.num_hidden_layers:
        raise LlmdropError(f"the plan is for {plan.num_layers} layers, the model has {model.config.num_hidden_layers}")
    exporter, passed_over = choose_exporter(fmt, model, loaded.adapter, plan)
    # calibration: `act apply`; a format written by its exporter (GGUF) may convert an export as it is
    if plan.empty and not getattr(model.config, "attention_calibration", None) and not exporter.writes_itself:
        raise LlmdropError("the drop plan is empty: nothing to export")
    record = provenance(loaded, plan, scores=scores, calibration=calibration, extra=extra)
    if exporter.writes_itself:
        return _export_written_by_exporter(exporter, loaded, plan, out, record, overwrite, base_model)
    exporter.apply(model, loaded.adapter, plan)
    # What the checkpoint really holds: a source that is an export already brings its own drops along.
    record["exported"].update(
        format=exporter.name,
        drop_attn_list=list(getattr(model.config, "drop_attn_list", None) or []),
        drop_mlp_list=list(getattr(model.config, "drop_mlp_list", None) or []),
        remote_code=exporter.name != "vanilla",
    )
    if passed_over:
        record["exported"]["format_reason"] = passed_over
    strip_gguf_quantization(model)
    target = resolve_dtype(dtype)
    if target != "auto":
        model.to(target)
    record["exported"]["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    record["exported"]["streamed"] = bool(streamed)

    with atomic_dir(out, overwrite, inputs=[loaded.path]) as tmp:
        if streamed:
            from .stream_export import parse_shard_size, write_weights

            model.config.dtype = record["exported"]["dtype"]  # as save_pretrained records it
            exporter.save_config(model, loaded.adapter, tmp)
            write_weights(
                streamed,
                loaded.adapter,
                plan,
                tmp,
                dtype=model.dtype,
                total_parameters=model.num_parameters(),
                max_shard_size=parse_shard_size(max_shard_size) if max_shard_size is not None else None,
                progress=progress,
                replacements=replacements,
            )
        else:
            exporter.save(model, loaded.adapter, tmp)
        save_tokenizer(loaded.tokenizer, tmp)
        if not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        write_record(record, tmp)
        (tmp / "README.md").write_text(model_card(record, base_model=base_model))
        check_reload(tmp, exporter.model_class(json.loads((tmp / "config.json").read_text())))
    return out


def _export_written_by_exporter(
    exporter, loaded: LoadedModel, plan: DropPlan, out: Path, record: dict, overwrite, base_model
):
    """A format its exporter writes whole (GGUF: from the source's file, or from the model as it is)."""
    from .card import model_card

    attn, mlp = plan.exported_sublayers()
    record["exported"].update(format=exporter.name, drop_attn_list=attn, drop_mlp_list=mlp, remote_code=False)
    with atomic_dir(out, overwrite, inputs=[loaded.path]) as tmp:
        record["exported"].update(exporter.write(loaded, plan, tmp, compensation=record.get("compensation")))
        write_record(record, tmp)
        (tmp / "README.md").write_text(model_card(record, base_model=base_model))
    return out
