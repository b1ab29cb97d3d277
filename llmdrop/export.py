"""Write a DropPlan applied to a model as a checkpoint directory that loads with transformers.

Only whole blocks dropped -> a vanilla checkpoint (same architecture, fewer layers, no custom code).
Any attention / MLP sublayer dropped -> the base architecture with remote code from ``modeling/``
(a distinct model_type, ``auto_map``, the drop lists in config.json, dropped weights absent).
Every export also carries the tokenizer, generation_config.json, llmdrop.json and a model card.

The model is transformed in place and saved from there, so only one copy is ever in memory. Files go
to a temporary sibling directory that is renamed at the end: an interrupted export leaves nothing.
"""

import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__, modeling
from .errors import LlmdropError
from .modeling.modeling_llmdrop import MODEL_CLASSES
from .models import LoadedModel, resolve_dtype
from .plan import DropPlan
from .surgery import apply_plan

FORMAT = "llmdrop.export/1"
MODELING_DIR = Path(modeling.__file__).parent  # top-level modeling/, installed as llmdrop.modeling
REMOTE_CODE_FILES = ("configuration_llmdrop.py", "modeling_llmdrop.py", "attention_calibration.py")


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LlmdropError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise LlmdropError(f"{out} exists and is not a directory")


def versions() -> dict:
    import transformers

    return {"llmdrop": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _strip_gguf_quantization(model) -> None:
    """A GGUF source is dequantized on load; the export holds plain weights and must not claim otherwise."""
    model.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False


def _write_remote_code(tmp: Path, config_path: Path, model_type: str) -> None:
    model_cls = MODEL_CLASSES[model_type]
    for name in REMOTE_CODE_FILES:
        shutil.copy(MODELING_DIR / name, tmp / name)
    config = json.loads(config_path.read_text())
    config["architectures"] = [model_cls.__name__]
    config["auto_map"] = {
        "AutoConfig": f"configuration_llmdrop.{model_cls.config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_llmdrop.{model_cls.__name__}",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def provenance(loaded: LoadedModel, plan: DropPlan, *, scores=None, calibration=None, extra=None) -> dict:
    attn, mlp = plan.exported_sublayers()
    return {
        "format": FORMAT,
        "source": {"model": loaded.source, "path": loaded.path, "gguf_file": loaded.gguf_file,
                   "model_type": loaded.info.get("model_type", loaded.model.config.model_type), "num_layers": plan.num_layers},
        "plan": plan.to_dict(),
        "layer_map": {str(k): v for k, v in plan.layer_map().items()},
        "exported": {"num_layers": len(plan.kept_layers), "drop_attn_list": attn, "drop_mlp_list": mlp,
                     "remote_code": bool(attn or mlp)},
        "scores": scores.to_dict() if scores is not None else None,
        "calibration": calibration or (scores.calibration if scores is not None else None),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def export(loaded: LoadedModel, plan: DropPlan, out, *, dtype: str = "auto", overwrite: bool = False,
           scores=None, calibration=None, base_model: str | None = None, extra: dict | None = None) -> Path:
    """Apply ``plan`` to ``loaded.model`` (in place: the model is consumed) and save it to ``out``."""
    from .card import model_card

    out = Path(out)
    check_output_dir(out, overwrite)
    if plan.empty and not getattr(loaded.model.config, "attention_calibration", None):  # calibration: `act apply`
        raise LlmdropError("the drop plan is empty: nothing to export")
    record = provenance(loaded, plan, scores=scores, calibration=calibration, extra=extra)
    model = loaded.model
    apply_plan(model, loaded.adapter, plan)
    # What the checkpoint really holds: a source that is an export already brings its own drops along.
    record["exported"].update(drop_attn_list=list(getattr(model.config, "drop_attn_list", None) or []),
                              drop_mlp_list=list(getattr(model.config, "drop_mlp_list", None) or []),
                              remote_code=hasattr(model.config, "llmdrop_sublayers"))
    _strip_gguf_quantization(model)
    target = resolve_dtype(dtype)
    if target != "auto":
        model.to(target)
    record["exported"]["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.llmdrop-tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted export
    try:
        model.save_pretrained(tmp)
        if record["exported"]["remote_code"]:
            _write_remote_code(tmp, tmp / "config.json", loaded.adapter.model_type)
        loaded.tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        (tmp / "llmdrop.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, base_model=base_model))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp -> out; an existing out is moved aside first and removed only once tmp is in place."""
    old = out.parent / f".{out.name}.llmdrop-old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # put the user's directory back
        raise
    shutil.rmtree(old, ignore_errors=True)
