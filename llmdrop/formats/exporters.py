"""Checkpoint formats, one ``Exporter`` each, in a registry.

An exporter says whether it can hold a drop plan applied to a model (and if not, why, in one sentence),
turns the in-memory model into what the checkpoint holds, writes config, weights and code, and names the
class transformers will load it with (so the export can check its own reload). It also owns what the rest of
llmdrop asks about the format: whether a checkpoint on disk is an export of it (``recognizes``), whether loading
it runs remote code, which engines serve it, and its model card's serving section. Everything the formats share
(provenance, card, tokenizer, atomic folder, the reload check) lives in ``export.py``.

A new format is one subclass here plus its entry in ``EXPORTERS`` (and ``AUTO_ORDER`` if ``--format auto``
should pick it).
"""

import json
import shutil
from pathlib import Path

from torch import nn

from llmdrop import modeling
from llmdrop.planning.plan import DropPlan
from llmdrop.source.arch import Adapter

MODELING_DIR = Path(modeling.__file__).parent  # top-level modeling/, installed as llmdrop.modeling
DROP_CODE_FILES = ("configuration_llmdrop.py", "modeling_llmdrop.py")
NEMOTRON_NAS_CODE_FILES = (*DROP_CODE_FILES, "configuration_nemotron_nas.py", "modeling_nemotron_nas.py")
CALIBRATION_CODE_FILE = "attention_calibration.py"  # only in `llmdrop act apply` exports


def is_llmdrop_model(model: nn.Module) -> bool:
    """Does ``model`` already use llmdrop's remote-code classes (an llmdrop export loaded back, `act apply`)?"""
    return hasattr(model.config, "llmdrop_sublayers")


def has_calibration(model: nn.Module) -> bool:
    return bool(getattr(model.config, "attention_calibration", None))


def auto_map(model_cls) -> dict:
    """config.json's auto_map for a remote-code model class (modules named as the files copied beside it)."""

    def name(cls):
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    return {"AutoConfig": name(model_cls.config_class), "AutoModelForCausalLM": name(model_cls)}


class Exporter:
    name: str = ""
    description: str = ""
    remote_code = True  # loading it runs the code shipped beside it (trust_remote_code)
    engines: tuple[str, ...] = ("transformers",)  # what serves it (llmdrop bench --engine, the card)
    library = "transformers"  # what loads it (the card's library_name)

    def recognizes(self, config: dict, folder: Path) -> bool:
        """Is the checkpoint in ``folder`` (its config.json: ``config``) an llmdrop export in this format?"""
        return False

    def serving(self, where: str) -> list[str]:
        """The model card's lines on serving the checkpoint at ``where`` (a Hub id or a path)."""
        return []

    def source_refusal(self, config, base: str) -> str | None:
        """Why this format cannot hold any drop of a model with this config (attributes read with getattr, so a
        config.json read as a namespace will do: checked before any model work); None if it may."""
        return None

    def refusal(self, model: nn.Module, adapter: Adapter, plan: DropPlan) -> str | None:
        """Why this format cannot hold ``plan`` applied to ``model``; None if it can."""
        return self.source_refusal(model.config, adapter.model_type)

    def apply(self, model: nn.Module, adapter: Adapter, plan: DropPlan) -> None:
        """Turn ``model`` (in place) into the model the checkpoint holds."""
        raise NotImplementedError

    def save(self, model: nn.Module, adapter: Adapter, folder: Path) -> None:
        """Write config.json, the weights and any code into ``folder``."""
        raise NotImplementedError

    def save_config(self, model: nn.Module, adapter: Adapter, folder: Path) -> None:
        """config.json (and any code) without weights: what an engine's dummy weight loading needs."""
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)

    def model_class(self, config: dict):
        """The class ``from_pretrained`` loads the written checkpoint with."""
        raise NotImplementedError

    def request_refusal(self, request, *, gguf_file: str | None, config: dict, stream: bool) -> str | None:
        """Why this format cannot hold what a ``DropRequest`` asks of this source (its GGUF file name, config.json:
        {} when unknown before loading); None if it may. Checked before any model work."""
        return None

    # A format written by the exporter alone (``write`` instead of ``apply`` / ``save``), from the source's file or
    # the model: the export then has no config.json and is checked by reading it back instead of a reload.
    writes_itself = False

    def write(self, loaded, plan: DropPlan, folder: Path) -> dict:
        raise NotImplementedError


class VanillaExporter(Exporter):
    name = "vanilla"
    description = "the base architecture with fewer layers, no custom code (whole blocks only)"
    remote_code = False
    engines = ("transformers", "vllm")

    def recognizes(self, config, folder):
        return not config.get("auto_map") and _recorded_format(folder) == self.name

    def refusal(self, model, adapter, plan):
        if plan.attn or plan.mlp:
            return "a vanilla checkpoint can only lose whole layers, not single attention / MLP sublayers"
        if is_llmdrop_model(model):
            return "the source is an llmdrop remote-code export (dropped sublayers or attention calibration)"
        return None

    def apply(self, model, adapter, plan):
        from llmdrop.planning.surgery import remove_blocks

        remove_blocks(model, adapter, plan.blocks)

    def save(self, model, adapter, folder):
        model.save_pretrained(folder)

    def model_class(self, config):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


class LlmdropExporter(Exporter):
    name = "llmdrop"
    description = "the base architecture plus llmdrop's remote code (trust_remote_code=True): any plan"

    def recognizes(self, config, folder):
        from llmdrop.source.arch import EXPORT_PREFIX

        return str(config.get("model_type", "")).startswith(EXPORT_PREFIX)

    def serving(self, where):
        return [
            "vLLM cannot serve this format natively (its Transformers backend would give every layer a KV cache); "
            "for Llama-family models, `llmdrop drop --format nemotron-nas` writes one it serves.",
            "",
        ]

    def apply(self, model, adapter, plan):
        from llmdrop.planning.surgery import apply_plan, drop_sublayers

        apply_plan(model, adapter, plan)
        if not is_llmdrop_model(model):  # blocks only, asked for in this format
            drop_sublayers(model, adapter)

    def save(self, model, adapter, folder):
        """The weights as transformers saves them, the remote code, and config.json rewritten for this format."""
        model.save_pretrained(folder)
        self._add_remote_code(model, adapter, folder)

    def save_config(self, model, adapter, folder):
        super().save_config(model, adapter, folder)
        self._add_remote_code(model, adapter, folder)

    def _add_remote_code(self, model, adapter, folder: Path) -> None:
        for name in self.code_files(model):
            shutil.copy(MODELING_DIR / name, folder / name)
        path = folder / "config.json"
        config = self.remote_config(model, adapter, json.loads(path.read_text()))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def code_files(self, model) -> tuple[str, ...]:
        return DROP_CODE_FILES + ((CALIBRATION_CODE_FILE,) if has_calibration(model) else ())

    def remote_config(self, model, adapter, config: dict) -> dict:
        model_cls = self.model_class(config)
        return {**config, "architectures": [model_cls.__name__], "auto_map": auto_map(model_cls)}

    def model_class(self, config):
        from llmdrop.source.arch import base_model_type

        base = base_model_type(config["model_type"])
        if config.get("attention_calibration"):
            from llmdrop.modeling.attention_calibration import CALIBRATED_MODEL_CLASSES

            return CALIBRATED_MODEL_CLASSES[base]
        from llmdrop.modeling.modeling_llmdrop import MODEL_CLASSES

        return MODEL_CLASSES[base]


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def ffn_size_fields(intermediate: int, hidden: int) -> dict:
    """How a block states its FFN size: ``ffn_mult`` when the engines' formula (int(2 * mult * hidden / 3)
    rounded up to a multiple of 256) gives the size back exactly, else the size itself."""
    mult = round(3 * intermediate / (2 * hidden), 6)
    if _round_up(int(2 * mult * hidden / 3), 256) == intermediate:
        return {"ffn_mult": mult}
    return {"intermediate_size": intermediate}


class NemotronNasExporter(LlmdropExporter):
    """DeciLM ``block_configs`` with ``no_op`` attention / FFN: the same weights as the llmdrop format, a config
    that vLLM (and SGLang, TensorRT-LLM, llama.cpp's converter) serve natively, plus remote code for transformers."""

    name = "nemotron-nas"
    description = "DeciLM block_configs (vLLM, SGLang, llama.cpp read it natively) plus remote code: Llama family"
    engines = ("transformers", "vllm")

    def recognizes(self, config, folder):
        # NVIDIA's own DeciLM checkpoints share the model type; llmdrop's carry its provenance record
        return config.get("model_type") == "nemotron-nas" and _recorded_format(folder) is not None

    def serving(self, where):
        return [
            "## How to serve",
            "",
            "The config is in the `nemotron-nas` (DeciLM) format, which vLLM serves natively: layers without attention "
            "get no KV cache, with paged attention and CUDA graphs as usual (SGLang and llama.cpp's converter read "
            "the same format; untested).",
            "",
            "```bash",
            f"vllm serve {where} --trust-remote-code",
            "```",
            "",
        ]

    BASES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # source model_type -> classes used

    def refusal(self, model, adapter, plan):
        why = super().refusal(model, adapter, plan)
        first = plan.kept_layers[0]
        if not why and (first in plan.attn or first in (getattr(model.config, "drop_attn_list", None) or ())):
            why = "vLLM's DeciLM layer starts the residual stream in layer 0's attention, which this plan drops"
        return why

    def source_refusal(self, config, base):
        if base not in self.BASES:
            return f"it holds Llama-family layers only (Llama, Mistral, Qwen2), not {base}"
        if getattr(config, "attention_calibration", None):
            return "it has no attention calibration"
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
            return "its MLP is SiLU-gated without biases"
        if base == "mistral" and getattr(config, "sliding_window", None):
            return "its attention has no sliding window (this Mistral slides)"
        if base == "qwen2" and getattr(config, "use_sliding_window", False):
            return "its attention has no sliding window (this Qwen2 slides)"
        head_dim = getattr(config, "head_dim", None)
        if head_dim and head_dim * config.num_attention_heads != config.hidden_size:
            return "its head size is hidden_size / num_attention_heads"
        return None

    def code_files(self, model) -> tuple[str, ...]:
        return NEMOTRON_NAS_CODE_FILES

    def remote_config(self, model, adapter, config: dict) -> dict:
        for key in ("auto_map", "drop_attn_list", "drop_mlp_list", "llmdrop_sublayers"):
            config.pop(key, None)
        attn, mlp = set(model.config.drop_attn_list or ()), set(model.config.drop_mlp_list or ())
        group = config["num_attention_heads"] // (config.get("num_key_value_heads") or config["num_attention_heads"])
        ffn = ffn_size_fields(config["intermediate_size"], config["hidden_size"])
        config["block_configs"] = [
            {
                "attention": {
                    "no_op": i in attn,
                    "replace_with_linear": False,
                    "n_heads_in_group": None if i in attn else group,
                },
                "ffn": {
                    "no_op": i in mlp,
                    "replace_with_linear": False,
                    **({k: None for k in ffn} if i in mlp else ffn),
                },
            }
            for i in range(config["num_hidden_layers"])
        ]
        base = self.BASES[adapter.model_type]
        if base == "qwen2":  # biases on q, k, v only: what vLLM's DeciLM reads as qkv_bias
            config.update(attention_bias=False, qkv_bias=True)
        config.setdefault("attention_bias", False)  # Mistral's config has no such field; say it
        config.update(
            model_type="nemotron-nas",
            architectures=["DeciLMForCausalLM"],  # the name vLLM serves it by (transformers uses auto_map)
            auto_map=auto_map(self._model_class(base)),
        )
        return config

    @staticmethod
    def _model_class(base: str):
        from llmdrop.modeling.modeling_nemotron_nas import NEMOTRON_NAS_CLASSES

        return NEMOTRON_NAS_CLASSES[base]

    def model_class(self, config):
        return self._model_class("qwen2" if config.get("qkv_bias") else "llama")


class GGUFExporter(Exporter):
    """A GGUF file for llama.cpp (and Ollama, LM Studio, llama-cpp-python): from a GGUF source with its tensors
    copied as stored (``gguf_export``), from a Llama-family checkpoint converted (``gguf_convert``). Never chosen by
    ``--format auto``: users ask for it."""

    name = "gguf"
    description = "a .gguf file for llama.cpp / Ollama: from a GGUF source its tensors copied as stored"
    remote_code = False
    engines = ("llama.cpp",)
    library = "gguf"
    writes_itself = True
    FILE = "model.gguf"

    def recognizes(self, config, folder):
        return False  # no config.json: the .gguf file is what is loaded

    def request_refusal(self, request, *, gguf_file, config, stream):
        asked = {
            f"--dtype {request.dtype}": request.dtype != "auto",
            "--max-shard-size": request.max_shard_size is not None,
        }
        if gguf_file and not (request.counted or request.explicit):
            return "nothing to drop, and the source is a GGUF file already"
        if gguf_file:  # the source file's tensors are copied: nothing changed in memory can reach the export
            asked.update(
                {"--compensate linear": request.compensate == "linear", "--iterative": request.selector == "iterative"}
            )
            keeps = "it copies the source GGUF's tensors as stored"
        else:
            asked["--stream with --compensate"] = stream and bool(request.compensate)
            keeps = "it writes the checkpoint's own precision into one file"
        flags = [flag for flag, given in asked.items() if given]
        if flags:
            return f"{keeps}, so {flags[0]} cannot apply; use --format auto"
        if not gguf_file and config:
            from types import SimpleNamespace

            from .gguf_convert import refusal

            return refusal(SimpleNamespace(**config))
        return None

    def refusal(self, model, adapter, plan):
        return None  # what the sources allow is checked before any work (request_refusal) and while writing

    def serving(self, where):
        return [
            "## How to run",
            "",
            f"`{self.FILE}` runs in llama.cpp and the tools built on it:",
            "",
            "```bash",
            f"llama-cli -m {self.FILE} -p 'Hello' -fa on   # or: llama-server -m {self.FILE} -fa on",
            "```",
            "",
            f"Ollama: a `Modelfile` with `FROM ./{self.FILE}`, then `ollama create NAME -f Modelfile`. Layers "
            "without attention get no K cache; flash attention (`-fa on`) also saves their V cache.",
            "",
        ]

    def write(self, loaded, plan, folder, compensation: dict | None = None):
        from .gguf_export import check_written, write_gguf

        scales = None
        if loaded.gguf_file:  # the source's tensors are copied: --compensate scale's folds are applied as they are
            source = Path(loaded.path) / loaded.gguf_file
            if compensation:
                from .gguf_export import gguf_scales

                scales = gguf_scales(compensation, plan.num_layers)
        else:  # converted from the model in memory, folds included
            from llmdrop.source.arch import absent_parts

            from .gguf_convert import from_checkpoint

            source = from_checkpoint(loaded)
            plan = plan.with_absent_parts(absent_parts(loaded.model.config))
        expected = write_gguf(source, plan, folder / self.FILE, scales=scales)
        check_written(folder / self.FILE, expected)
        attn, mlp = plan.exported_sublayers()  # what the file holds, an export source's own drops included
        extra = {"drop_attn_list": attn, "drop_mlp_list": mlp}
        return {"dtype": expected.pop("dtype"), **extra, "gguf": {"file": self.FILE, **expected}}


def check_request(request, *, gguf_file: str | None, config: dict, stream: bool) -> None:
    """What the chosen ``--format`` refuses of this request and source, before any model work."""
    from llmdrop.errors import LlmdropError

    exporter = EXPORTERS.get(request.fmt)
    why = exporter.request_refusal(request, gguf_file=gguf_file, config=config, stream=stream) if exporter else None
    if why:
        raise LlmdropError(f"--format {request.fmt} cannot hold this export: {why}")


EXPORTERS = {e.name: e for e in (VanillaExporter(), NemotronNasExporter(), LlmdropExporter(), GGUFExporter())}


def _recorded_format(folder: Path) -> str | None:
    """The format llmdrop.json records for ``folder`` ("" for a record without one; None: no record)."""
    from llmdrop.record import RECORD_FILE

    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        exported = json.loads(path.read_text()).get("exported") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return exported.get("format") or ("llmdrop" if exported.get("remote_code") else "vanilla" if exported else "")


def exporter_of(folder) -> Exporter | None:
    """The format of an llmdrop export on disk (None: not a checkpoint llmdrop wrote, as far as it can tell)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    return next((e for e in EXPORTERS.values() if e.recognizes(config, Path(folder))), None)


AUTO_ORDER = ("vanilla", "nemotron-nas", "llmdrop")  # `--format auto`: the first format that can hold the plan


def check_format_name(fmt: str) -> None:
    from llmdrop.errors import LlmdropError

    if fmt != "auto" and fmt not in EXPORTERS:
        raise LlmdropError(f"unknown --format {fmt!r}; use auto, {', '.join(EXPORTERS)}")


def check_format_for_source(fmt: str, config: dict) -> None:
    """An explicit ``--format`` that the source's config.json alone rules out, refused before any model work."""
    from types import SimpleNamespace

    from llmdrop.errors import LlmdropError
    from llmdrop.source.arch import adapter_for

    check_format_name(fmt)
    if fmt == "auto" or not config:
        return

    namespace = SimpleNamespace(**config)
    why = EXPORTERS[fmt].source_refusal(namespace, adapter_for(namespace).model_type)
    if why:
        raise LlmdropError(f"--format {fmt} cannot hold this export: {why}")


def choose_exporter(fmt: str, model: nn.Module, adapter: Adapter, plan: DropPlan) -> tuple[Exporter, list[str]]:
    """The exporter for ``--format fmt`` and, for ``auto``, why each format before it was passed over."""
    from llmdrop.errors import LlmdropError

    check_format_name(fmt)
    if fmt != "auto":
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
