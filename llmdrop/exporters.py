"""Checkpoint formats, one ``Exporter`` each, in a registry.

An exporter says whether it can hold a drop plan applied to a model (and if not, why, in one sentence),
turns the in-memory model into what the checkpoint holds, writes config, weights and code, and names the
class transformers will load it with (so the export can check its own reload). Everything the formats share
(provenance, card, tokenizer, atomic folder, the reload check) lives in ``export.py``.

A new format is one subclass here plus its entry in ``EXPORTERS`` (and ``AUTO_ORDER`` if ``--format auto``
should pick it).
"""

import json
import shutil
from pathlib import Path

from torch import nn

from . import modeling
from .arch import Adapter
from .plan import DropPlan

MODELING_DIR = Path(modeling.__file__).parent  # top-level modeling/, installed as llmdrop.modeling
DROP_CODE_FILES = ("configuration_llmdrop.py", "modeling_llmdrop.py")
CALIBRATION_CODE_FILE = "attention_calibration.py"  # only in `llmdrop act apply` exports


def is_llmdrop_model(model: nn.Module) -> bool:
    """Does ``model`` already use llmdrop's remote-code classes (an llmdrop export loaded back, `act apply`)?"""
    return hasattr(model.config, "llmdrop_sublayers")


def has_calibration(model: nn.Module) -> bool:
    return bool(getattr(model.config, "attention_calibration", None))


class Exporter:
    name: str = ""
    description: str = ""

    def refusal(self, model: nn.Module, adapter: Adapter, plan: DropPlan) -> str | None:
        """Why this format cannot hold ``plan`` applied to ``model``; None if it can."""
        return None

    def apply(self, model: nn.Module, adapter: Adapter, plan: DropPlan) -> None:
        """Turn ``model`` (in place) into the model the checkpoint holds."""
        raise NotImplementedError

    def save(self, model: nn.Module, adapter: Adapter, folder: Path) -> None:
        """Write config.json, the weights and any code into ``folder``."""
        raise NotImplementedError

    def model_class(self, config: dict):
        """The class ``from_pretrained`` loads the written checkpoint with."""
        raise NotImplementedError


class VanillaExporter(Exporter):
    name = "vanilla"
    description = "the base architecture with fewer layers, no custom code (whole blocks only)"

    def refusal(self, model, adapter, plan):
        if plan.attn or plan.mlp:
            return "a vanilla checkpoint can only lose whole layers, not single attention / MLP sublayers"
        if is_llmdrop_model(model):
            return "the source is an llmdrop remote-code export (dropped sublayers or attention calibration)"
        return None

    def apply(self, model, adapter, plan):
        from .surgery import remove_blocks

        remove_blocks(model, adapter, plan.blocks)

    def save(self, model, adapter, folder):
        model.save_pretrained(folder)

    def model_class(self, config):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


class LlmdropExporter(Exporter):
    name = "llmdrop"
    description = "the base architecture plus llmdrop's remote code (trust_remote_code=True): any plan"

    def apply(self, model, adapter, plan):
        from .surgery import apply_plan, drop_sublayers

        apply_plan(model, adapter, plan)
        if not is_llmdrop_model(model):  # blocks only, asked for in this format
            drop_sublayers(model, adapter)

    def save(self, model, adapter, folder):
        model.save_pretrained(folder)
        calibrated = has_calibration(model)
        for name in DROP_CODE_FILES + ((CALIBRATION_CODE_FILE,) if calibrated else ()):
            shutil.copy(MODELING_DIR / name, folder / name)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        model_cls = self.model_class(config)
        config["architectures"] = [model_cls.__name__]
        config["auto_map"] = {
            "AutoConfig": f"configuration_llmdrop.{model_cls.config_class.__name__}",
            "AutoModelForCausalLM": f"{model_cls.__module__.rsplit('.', 1)[-1]}.{model_cls.__name__}",
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def model_class(self, config):
        from .arch import base_model_type

        base = base_model_type(config["model_type"])
        if config.get("attention_calibration"):
            from .modeling.attention_calibration import CALIBRATED_MODEL_CLASSES

            return CALIBRATED_MODEL_CLASSES[base]
        from .modeling.modeling_llmdrop import MODEL_CLASSES

        return MODEL_CLASSES[base]


EXPORTERS = {e.name: e for e in (VanillaExporter(), LlmdropExporter())}
AUTO_ORDER = ("vanilla", "llmdrop")  # `--format auto`: the first format that can hold the plan


def choose_exporter(fmt: str, model: nn.Module, adapter: Adapter, plan: DropPlan) -> tuple[Exporter, list[str]]:
    """The exporter for ``--format fmt`` and, for ``auto``, why each format before it was passed over."""
    from .errors import LlmdropError

    if fmt != "auto":
        if fmt not in EXPORTERS:
            raise LlmdropError(f"unknown --format {fmt!r}; use auto, {', '.join(EXPORTERS)}")
        why = EXPORTERS[fmt].refusal(model, adapter, plan)
        if why:
            raise LlmdropError(f"--format {fmt} cannot hold this export: {why}")
        return EXPORTERS[fmt], []
    passed = []
    for name in AUTO_ORDER:
        why = EXPORTERS[name].refusal(model, adapter, plan)
        if why is None:
            return EXPORTERS[name], passed
        passed.append(f"not {name}: {why}")
    raise LlmdropError("no export format can hold this plan: " + "; ".join(passed))
