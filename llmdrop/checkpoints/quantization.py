"""Quantize a checkpoint's weights to 4 or 8 bits with llm-compressor (GPTQ or AWQ), in the compressed-tensors format.

transformers loads the result (with the ``compressed-tensors`` package installed) and vLLM serves it with its
CUDA kernels (Marlin). The source can be anything ``llmdrop.source.models.load_model`` loads: a vanilla checkpoint, an
llmdrop export with remote code (its ``auto_map``, modeling files and ``llmdrop.json`` are kept), a Hub id, a
``.gguf`` file or the builtin alias (dequantized on load). Dropped sublayers are simply not there to quantize.

llm-compressor pins its own transformers / torch ranges, so it is the optional extra ``llmdrop[quant]`` and is
imported only inside the functions below: the rest of llmdrop works without it.

Calibration uses the same sources as ``llmdrop score`` (``self`` by default): the token blocks are handed to
``oneshot`` as an already tokenized dataset (``input_ids`` / ``attention_mask``).

Two adaptations to llm-compressor 0.14, both narrow and tested (tests/test_quantize.py):

- AWQ on a machine without an accelerator: ``AWQModifier._apply_smoothing`` pins its cached activations
  (``IntermediatesCache.pin_memory``) to speed up CPU->GPU copies, and ``Tensor.pin_memory()`` raises
  "Cannot access accelerator device when none is available". There is no option to turn it off, so
  :func:`no_pin_memory_without_accelerator` makes that one method a no-op while quantizing, only when
  ``torch.accelerator.is_available()`` is false (nothing is ever copied to a GPU then), and restores it after.
- AWQ mappings for exports with dropped sublayers: a dropped sublayer's norms are ``nn.Identity`` stand-ins that
  still match the default regexes (``re:.*input_layernorm$``) while their balance layers (``q_proj``...) are gone,
  which makes AWQ fail ("needs to match a single smoothlayer"). :func:`awq_mappings` narrows each mapping's smooth
  layer to the modules that have weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError
from llmdrop.record import QUANTIZE_FORMAT, RECORD_FILE, now, source, versions, write_record

METHODS = ("gptq", "awq")
BITS = (4, 8)  # what vLLM's compressed-tensors kernels (Marlin) serve for integer weights with 16-bit activations
INSTALL = "pip install 'llmdrop[quant]'"
IGNORE = ["lm_head"]  # the output projection stays in full precision, as in llm-compressor's examples
# How each group's scale (and zero point) is chosen: min/max of the group, or the clipping range with the least
# squared error (compressed-tensors' weight observers). "auto": mse for GPTQ, minmax for AWQ (which searches its
# own scales). On SmolLM2-135M, GPTQ W4 group 32 went from +123% to +14% perplexity with mse (docs/quantization.md).
OBSERVERS = {"minmax": "memoryless_minmax", "mse": "memoryless_mse"}
GROUP_SIZES = (
    128,
    64,
    32,
)  # the usual ones (vLLM's Marlin kernels), largest first: the default picks the first that fits


# --------------------------------------------------------------------------- llm-compressor, lazily


def require_llmcompressor():
    """The ``llmcompressor`` module, or an LlmdropError that says how to install it."""
    try:
        import llmcompressor
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "llmcompressor":
            raise LlmdropError(f"llmdrop quantize needs llm-compressor, which is not installed: {INSTALL}") from None
        raise LlmdropError(
            f"llm-compressor is installed but does not import ({e}); it needs transformers "
            f"5.15-5.17 and torch <= 2.14: {INSTALL}"
        ) from None
    return llmcompressor


def compressor_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llmcompressor", "compressed-tensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return versions(**out)


def compute_device() -> str:
    """Where llm-compressor runs the layers: the accelerator when there is one (its get_main_device), else the CPU."""
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"


@contextmanager
def no_pin_memory_without_accelerator():
    """While active, and only on a machine without an accelerator, ``IntermediatesCache.pin_memory`` (called by
    llm-compressor's AWQ before its grid search, to speed up CPU->GPU copies) does nothing instead of raising
    "Cannot access accelerator device when none is available". Pinning has no use there: nothing is copied to a GPU.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__.get("pin_memory")
    if torch.accelerator.is_available() or original is None:
        yield False
        return

    def pin_memory(self, batch_index, input_names=None):  # same signature as the method it stands in for
        return None

    IntermediatesCache.pin_memory = pin_memory
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


def import_llmcompressor(verbose: bool = False):
    """``require_llmcompressor`` with stdout kept clean: importing llm-compressor configures its logger on stdout
    and already logs (e.g. "No accelerator available!"); unless ``verbose`` that goes to stderr instead."""
    if verbose:
        return require_llmcompressor()
    with redirect_stdout(sys.stderr):
        return require_llmcompressor()


@contextmanager
def compressor_logging(verbose: bool):
    """llm-compressor logs INFO and per-module METRIC lines to stdout; unless ``verbose``, show only its
    warnings and errors, on stderr (stdout stays clean for ``--json``). Its own configuration is restored after."""
    if verbose:
        yield
        return
    from llmcompressor.logger import LOGGER_CONFIG, configure_logger, logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}", filter=lambda r: r["level"].name != "METRIC")
    try:
        with redirect_stdout(sys.stderr):  # anything else it prints, too
            yield
    finally:
        configure_logger(LOGGER_CONFIG)  # outside the redirection: its handler writes to the real stdout again


# --------------------------------------------------------------------------- recipe


def scheme_name(bits: int, symmetric: bool) -> str:
    return f"W{bits}A16" + ("" if symmetric else "_ASYM")


def resolve_observer(observer: str, method: str) -> str:
    observer = str(observer).lower()
    if observer == "auto":
        return "mse" if method == "gptq" else "minmax"
    if observer not in OBSERVERS:
        raise LlmdropError(f"unknown --observer {observer!r}; use auto, {' or '.join(OBSERVERS)}")
    return observer


def quantization_groups(bits: int, group_size: int, symmetric: bool, observer: str = "minmax") -> dict:
    """compressed-tensors config group: integer weights, one scale (and zero point if asymmetric) per group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        strategy="group",
        group_size=group_size,
        symmetric=symmetric,
        dynamic=False,
        observer=OBSERVERS[observer],
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _has_weights(module) -> bool:
    return next(module.parameters(recurse=True), None) is not None


def awq_mappings(model) -> list:
    """llm-compressor's AWQ mappings for ``model``'s architecture (found along the class's bases, so that an
    export's ``LlmdropLlamaForCausalLM`` gets Llama's), each smooth layer narrowed to modules that have weights.

    A dropped sublayer leaves ``nn.Identity`` norms behind under the same names; a regex such as
    ``re:.*input_layernorm$`` matches them too, and AWQ then groups three norms with one set of projections and
    fails. Mappings whose every smooth layer is gone are left out.
    """
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, AWQMapping

    base = next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in AWQ_MAPPING_REGISTRY), None)
    mappings = AWQ_MAPPING_REGISTRY[base] if base else get_layer_mappings_from_model(model)
    named = list(model.named_modules())
    out = []
    for mapping in mappings:
        target = mapping.smooth_layer
        matches = [(n, m) for n, m in named if (re.match(target[3:], n) if target.startswith("re:") else n == target)]
        real = [n for n, m in matches if _has_weights(m)]
        if len(real) == len(matches):
            out.append(mapping)
        elif real:
            exact = "re:(?:" + "|".join(re.escape(n) for n in real) + ")$"
            out.append(AWQMapping(exact, list(mapping.balance_layers), mapping.activation_hook_target))
    return out


def recipe_for(
    method: str, bits: int, group_size: int, model, symmetric: bool | None = None, observer: str = "minmax"
) -> tuple[list, bool]:
    """(llm-compressor modifiers, symmetric). By default GPTQ quantizes to symmetric groups (W4A16) and AWQ to
    groups with zero points (W4A16_ASYM), the schemes of llm-compressor's own examples."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if symmetric is None:
        symmetric = method == "gptq"
    groups = quantization_groups(bits, group_size, symmetric, observer)
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=IGNORE)], symmetric
    from llmcompressor.modifiers.transform import AWQModifier

    return [
        AWQModifier(mappings=awq_mappings(model)),
        QuantizationModifier(config_groups=groups, ignore=IGNORE),
    ], symmetric


def linear_inputs(model) -> dict[str, int]:
    """Input size of every Linear layer to quantize, by module name."""
    inputs = {
        n: m.in_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in IGNORE
    }
    if not inputs:
        raise LlmdropError("the model has no Linear layers to quantize")
    return inputs


def choose_group_size(inputs: dict[str, int], group_size: int | None = None) -> int:
    """The group size for Linear layers with these input sizes (name -> in_features): ``group_size`` if it divides
    every one, else an error naming a layer; None: the largest of GROUP_SIZES that divides every one (SmolLM2's
    hidden size 576 takes 64, not 128)."""
    common = math.gcd(*inputs.values())
    if group_size is None:
        fitting = [g for g in GROUP_SIZES if common % g == 0]
        if not fitting:
            raise LlmdropError(
                f"none of the usual group sizes {', '.join(map(str, GROUP_SIZES))} divides every layer's "
                f"input size (their greatest common divisor is {common}); pass --group-size with a "
                f"divisor of {common}"
            )
        return fitting[0]
    for name, size in inputs.items():
        if size % group_size:
            options = [g for g in (*GROUP_SIZES, 16) if common % g == 0]
            hint = f"e.g. --group-size {options[0]}" if options else f"a divisor of {common}"
            raise LlmdropError(f"--group-size {group_size} does not divide the input size {size} of {name}; use {hint}")
    return group_size


# --------------------------------------------------------------------------- model card


def _split_front_matter(card: str) -> tuple[list[str], str] | None:
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        return None
    head, body = card[4:].split("\n---\n", 1)
    return head.split("\n"), body


def _with_front_matter(card: str, tags: list[str], relation: str | None) -> str:
    """``card`` with ``tags`` added to its YAML tag list and ``base_model_relation`` set after ``base_model``."""
    parts = _split_front_matter(card)
    if parts is None:
        return card
    head, body = parts
    if "tags:" in head:
        at = head.index("tags:") + 1
        while at < len(head) and head[at].startswith("- "):
            at += 1
        existing = {line[2:] for line in head if line.startswith("- ")}
        head[at:at] = [f"- {t}" for t in tags if t not in existing]
    else:
        head += ["tags:"] + [f"- {t}" for t in tags]
    if relation and any(line.startswith("base_model:") for line in head):
        at = next(i for i, line in enumerate(head) if line.startswith("base_model:")) + 1
        head.insert(at, f"base_model_relation: {relation}")
    return "---\n" + "\n".join(head) + "\n---\n" + body


def quantization_section(q: dict, *, remote_code: bool) -> list[str]:
    calib = q["calibration"]
    trust = ", trust_remote_code=True" if remote_code else ""
    lines = [
        "## Quantization",
        "",
        f"Weights of the Linear layers quantized to **{q['bits']}-bit integers with {q['method'].upper()}** "
        f"(scheme `{q['scheme']}`, group size {q['group_size']}, "
        f"{'symmetric' if q['symmetric'] else 'with zero points'}, "
        f"{q.get('observer', 'minmax')} scales; "
        f"`lm_head` and the embeddings kept in {q.get('dtype') or 'full precision'}) by "
        f"[llm-compressor](https://github.com/vllm-project/llm-compressor) {q['versions'].get('llmcompressor')}, "
        f"saved in the compressed-tensors format (`{q.get('format')}`).",
        "",
        f"Calibration: `{calib['source']}`, {calib['samples']} x {calib['seq_len']} tokens, seed {calib['seed']}.",
        "",
        "Loading it with transformers needs the `compressed-tensors` package (`pip install compressed-tensors`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{trust})',
        "```",
        "",
        "vLLM serves compressed-tensors checkpoints of the architectures it implements with its CUDA kernels "
        "(Marlin)"
        + (
            "; this one has custom code for its removed sublayers, which vLLM does not implement natively."
            if remote_code
            else ": `vllm serve PATH_OR_REPO`."
        ),
        "",
    ]
    return lines


def quantized_card(record: dict, *, source_record: bool, remote_code: bool) -> str:
    """README.md of the quantized checkpoint. For an llmdrop export, the export's card (llmdrop.formats.card.model_card)
    with the quantization section appended below its end marker (so that ``llmdrop push`` keeps it when it
    refreshes the card) and the compressed-tensors tags; otherwise a short card of its own."""
    from llmdrop.formats.card import gguf_note, hub_id, model_card
    from llmdrop.source.models import BUILTIN_BASE_MODELS

    q = record["quantization"]
    tags = ["compressed-tensors", q["method"], f"{q['bits']}-bit"]
    section = "\n".join(quantization_section(q, remote_code=remote_code))
    if source_record:
        card = model_card(record).rstrip("\n") + "\n\n" + section
        # Layers were dropped as well: the checkpoint is not just a quantization of the base model.
        return _with_front_matter(card, tags, relation=None)
    src = record["source"]
    base = hub_id(BUILTIN_BASE_MODELS.get(src["model"]) or src["model"])
    name = base or Path(str(src["model"])).name
    trust = ", trust_remote_code=True" if remote_code else ""
    lines = [
        "---",
        *([f"base_model: {base}", "base_model_relation: quantized"] if base else []),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- llmdrop",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {name}, {q['bits']}-bit {q['method'].upper()}",
        "",
        f"This checkpoint is {f'[{base}](https://huggingface.co/{base})' if base else f'`{name}`'} with its weights "
        f"quantized by [llmdrop](https://github.com/llmdrop/llmdrop) (`llmdrop quantize`).",
        "",
        *gguf_note(src),
        *quantization_section(q, remote_code=remote_code),
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO"{trust})',
        "```",
        "",
        "`llmdrop.json` records the source, the quantization settings, the calibration and the versions used.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the verb


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


@contextmanager
def _config_home_for_gguf(model, gguf_file: str | None):
    """llm-compressor reads ``config._name_or_path``/config.json (to validate the model, and to write the saved
    config from the original one) and copies the ``*.py`` files found there. A GGUF source's directory has no
    config.json (and, for the builtin alias, a Python package): point it at a folder holding the model's own
    (dequantized) config for the duration."""
    if not gguf_file:
        yield
        return
    original = model.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="llmdrop-gguf-config-") as home:
        model.config.save_pretrained(home)
        model.config._name_or_path = home
        try:
            yield
        finally:
            model.config._name_or_path = original


def quantize(
    model=None,
    out: str | None = None,
    *,
    method: str,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool | None = None,
    observer: str = "auto",
    calib="self",
    overwrite: bool = False,
    verbose: bool = False,
) -> dict:
    """Quantize ``model`` with GPTQ or AWQ (llm-compressor) and write a compressed-tensors checkpoint to ``out``.

    ``model`` is a name, a ``LoadSpec`` or a loaded model (consumed); its device is where the weights live while
    quantizing and where ``self`` calibration text is sampled; llm-compressor itself runs each layer on the
    accelerator when there is one. ``calib``: a source string or a ``CalibSpec``. ``symmetric`` None: the method's
    usual scheme (GPTQ symmetric, AWQ with zero points). ``group_size`` None: the largest of 128, 64, 32 that
    divides every quantized layer's input. Returns a summary: out, method, bits, group_size (and group_size_auto),
    scheme, quantized_modules, calibration, seconds, weights_bytes.
    """
    from llmdrop.files import atomic_dir, check_output_dir
    from llmdrop.formats.export import strip_gguf_quantization
    from llmdrop.source.calibration import CalibSpec
    from llmdrop.source.models import as_loaded, as_spec, is_llmdrop_export, model_input

    if not out:
        raise LlmdropError("give an output directory (-o OUT)")
    method = str(method).lower()
    if method not in METHODS:
        raise LlmdropError(f"unknown --method {method!r}; use {' or '.join(METHODS)}")
    if bits not in BITS:
        raise LlmdropError(f"--bits {bits} is not supported; use {' or '.join(map(str, BITS))}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise LlmdropError(f"--group-size must be a whole number >= 1, got {group_size!r}")
    observer = resolve_observer(observer, method)
    out = Path(out)
    calib = CalibSpec.of(calib)
    check_output_dir(out, overwrite, inputs=[model_input(model), calib.input])  # before the slow part
    import_llmcompressor(verbose)
    from datasets import Dataset
    from llmcompressor import oneshot

    started = time.perf_counter()
    spec = as_spec(model)
    loaded = as_loaded(model)
    net = loaded.model
    source_dir = Path(loaded.path) if Path(loaded.path).is_dir() and not loaded.gguf_file else None
    if loaded.gguf_file:
        strip_gguf_quantization(net)  # dequantized on load: what gets quantized is plain float weights
    elif getattr(net.config, "quantization_config", None) is not None:
        qc = net.config.quantization_config
        kind = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise LlmdropError(f"{loaded.source} is already quantized ({kind}); quantize an unquantized checkpoint")
    inputs = linear_inputs(net)
    n_linear, group_size_auto = len(inputs), group_size is None
    group_size = choose_group_size(inputs, group_size)
    trust = bool(spec and spec.trust_remote_code) or is_llmdrop_export(loaded.path)

    tokens = calib.tokens(loaded.tokenizer, net)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    dtype_name = str(next(net.parameters()).dtype).removeprefix("torch.")

    with atomic_dir(out, overwrite, inputs=[loaded.path]) as tmp:
        with (
            compressor_logging(verbose),
            _config_home_for_gguf(net, loaded.gguf_file),
            no_pin_memory_without_accelerator(),
            torch.random.fork_rng(devices=[]),
        ):
            recipe, symmetric = recipe_for(method, bits, group_size, net, symmetric, observer)  # imports log too
            torch.manual_seed(calib.seed)
            oneshot(
                model=net,
                processor=loaded.tokenizer,
                dataset=dataset,
                recipe=recipe,
                num_calibration_samples=len(tokens),
                max_seq_length=calib.seq_len,
                shuffle_calibration_samples=False,
                trust_remote_code_model=trust,
            )
            with warnings.catch_warnings():  # transformers' note about saving offloaded modules: they are on the CPU
                warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
                net.save_pretrained(tmp, save_compressed=True)
        seconds = time.perf_counter() - started
        _finish_folder(tmp, loaded, source_dir)
        config = json.loads((tmp / "config.json").read_text())
        remote_code = bool(config.get("auto_map"))
        qconfig = config.get("quantization_config") or {}
        q = {
            "method": method,
            "bits": bits,
            "group_size": group_size,
            "group_size_auto": group_size_auto,
            "symmetric": symmetric,
            "scheme": scheme_name(bits, symmetric),
            "observer": observer,
            "format": qconfig.get("format"),
            "targets": ["Linear"],
            "ignore": IGNORE,
            "quantized_modules": n_linear,
            "dtype": dtype_name,
            "calibration": calib.record(tokens),
            "source": {"model": loaded.source, "path": loaded.path, "gguf_file": loaded.gguf_file},
            "device": compute_device(),
            "seconds": round(seconds, 1),
            "versions": compressor_versions(),
            "created": now(),
        }
        record_path = source_dir / RECORD_FILE if source_dir else None
        source_record = bool(record_path and record_path.is_file())
        if source_record:
            record = json.loads(record_path.read_text())
        else:
            record = {
                "format": QUANTIZE_FORMAT,
                "source": source(replace(loaded, model=net)),
                "versions": versions(),
                "created": q["created"],
            }
        record["quantization"] = q
        write_record(record, tmp)
        (tmp / "README.md").write_text(quantized_card(record, source_record=source_record, remote_code=remote_code))
        weights = _weights_bytes(tmp)
    return {
        "out": str(out),
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "group_size_auto": group_size_auto,
        "scheme": q["scheme"],
        "observer": observer,
        "quantized_modules": n_linear,
        "calibration": q["calibration"],
        "seconds": q["seconds"],
        "weights_bytes": weights,
    }


def _finish_folder(tmp: Path, loaded, source_dir: Path | None) -> None:
    """Tokenizer, generation config and (for remote-code sources) the modeling files, auto_map and architectures."""
    from llmdrop.formats.export import save_tokenizer

    save_tokenizer(loaded.tokenizer, tmp)
    if source_dir and (source_dir / "generation_config.json").is_file():
        shutil.copy(source_dir / "generation_config.json", tmp / "generation_config.json")
    elif not (tmp / "generation_config.json").exists() and getattr(loaded.model, "generation_config", None):
        loaded.model.generation_config.save_pretrained(tmp)
    if not source_dir:
        return
    source_config = json.loads((source_dir / "config.json").read_text())
    if not source_config.get("auto_map"):
        return
    for py in source_dir.glob("*.py"):  # llm-compressor copies them too; make sure, whatever its version
        if not (tmp / py.name).exists():
            shutil.copy(py, tmp / py.name)
    config = json.loads((tmp / "config.json").read_text())
    # auto_map for transformers, architectures for the engines: a nemotron-nas export is served as DeciLMForCausalLM
    # whatever transformers names the class it saved from
    kept = {k: source_config[k] for k in ("auto_map", "architectures") if source_config.get(k)}
    if any(config.get(k) != v for k, v in kept.items()):
        config.update(kept)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
