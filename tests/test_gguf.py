"""--format gguf from the builtin SmolLM2 GGUF (Q4_1 as shipped): the file written holds exactly the tensors meant,
copied byte for byte, with llama.cpp's per-layer counts; a whole-block export reloads in transformers with the
logits of the same plan applied in memory; and every refusal comes before any model work. llama.cpp itself runs
these files in tests/test_llamacpp.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.formats.gguf_export import ZERO_FFN, check_written, read_source, write_gguf
from llmdrop.planning.plan import DropPlan
from llmdrop.source.models import builtin_gguf

SOURCE = builtin_gguf("smollm2-135m")
SOURCE_FILE = f"{SOURCE[0]}/{SOURCE[1]}"
N = 30


@pytest.fixture(scope="module")
def source():
    return read_source(SOURCE_FILE)


def value(reader, key: str):
    """A metadata value of a GGUF file read with gguf.GGUFReader (None if absent)."""
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def expected_names(src: dict, plan: DropPlan) -> set:
    """The tensor names the export must hold, worked out by hand from the plan."""
    names = {n for n in src if not n.startswith("blk.")}
    for new, old in enumerate(plan.kept_layers):
        for n in src:
            if not n.startswith(f"blk.{old}."):
                continue
            part = n.split(".", 2)[2]
            if old in plan.attn and part.startswith("attn_"):
                continue
            names.add(f"blk.{new}.{part}")
    return names


@pytest.mark.parametrize(
    "plan",
    [
        DropPlan(N, attn=[5, 6, 7, 22, 25, 26, 28, 29]),
        DropPlan(N, mlp=[3, 29]),
        DropPlan(N, blocks=[12, 13], attn=[10], mlp=[3, 29]),
    ],
    ids=["attn", "mlp-incl-last", "mixed"],
)
def test_sublayer_export_is_deci_with_the_source_tensors(source, plan, tmp_path):
    out = tmp_path / "m.gguf"
    written = write_gguf(SOURCE_FILE, plan, out)
    check_written(out, written)
    reader = read_source(out)
    src, got = tensors(source), tensors(reader)
    assert value(reader, "general.architecture") == "deci"
    assert value(reader, "deci.block_count") == len(plan.kept_layers)
    assert set(got) == expected_names(src, plan)  # nothing missing, nothing left over
    new = plan.layer_map()
    heads = [0 if i in plan.attn else 9 for i in plan.kept_layers]
    assert value(reader, "deci.attention.head_count") == heads
    assert value(reader, "deci.attention.head_count_kv") == [h // 3 for h in heads]
    ffn = [ZERO_FFN if i in plan.mlp else 1536 for i in plan.kept_layers]
    assert value(reader, "deci.feed_forward_length") == ffn
    assert value(reader, "deci.attention.key_length") == value(reader, "deci.attention.value_length") == 64
    for i in plan.mlp:  # the MLP that stands for a dropped one adds exactly zero
        down = got[f"blk.{new[i]}.ffn_down.weight"]
        assert down.tensor_type.name == "F16" and not np.asarray(down.data).any()
        assert list(down.shape) == [ZERO_FFN, 576]
    for old, b in new.items():  # copied as stored: same type, same bytes
        for part in ("attn_q.weight", "ffn_down.weight", "ffn_norm.weight"):
            if (part.startswith("attn") and old in plan.attn) or (part.startswith("ffn_down") and old in plan.mlp):
                continue
            a, c = src[f"blk.{old}.{part}"], got[f"blk.{b}.{part}"]
            assert a.tensor_type == c.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(c.data))
    assert np.array_equal(np.asarray(src["token_embd.weight"].data), np.asarray(got["token_embd.weight"].data))
    # the tokenizer and the rest of the metadata come along
    assert value(reader, "tokenizer.ggml.tokens") == value(source, "tokenizer.ggml.tokens")
    assert value(reader, "deci.rope.freq_base") == value(source, "llama.rope.freq_base")


@pytest.mark.slow
def test_block_export_keeps_the_architecture_and_reloads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmdrop.planning.surgery import apply_plan
    from llmdrop.source.models import load_model

    runner = CliRunner()
    result = runner.invoke(
        app, ["drop", "smollm2-135m", "--block-layers", "20-23", "--format", "gguf", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "llmdrop.json").read_text())
    assert record["exported"]["format"] == "gguf" and record["exported"]["gguf"]["architecture"] == "llama"
    card = (tmp_path / "o" / "README.md").read_text()
    assert "llama-cli -m model.gguf" in card and "library_name: gguf" in card
    assert "copied as they are stored" in card and "dequantized" not in card and "from_pretrained" not in card
    reader = read_source(tmp_path / "o" / "model.gguf")
    assert value(reader, "llama.block_count") == 26 and value(reader, "llama.attention.head_count") == 9

    ids = torch.tensor([[504, 3575, 282, 4649, 314, 3575, 282, 6353, 314]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o", gguf_file="model.gguf")
    loaded = load_model("smollm2-135m", device="cpu")
    apply_plan(loaded.model, loaded.adapter, DropPlan(N, blocks=[20, 21, 22, 23]))
    with torch.no_grad():
        want, got = loaded.model(ids).logits, reloaded(ids).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


def test_the_first_layers_attention_is_refused(tmp_path):
    with pytest.raises(Exception, match="head size from the first layer"):
        write_gguf(SOURCE_FILE, DropPlan(N, attn=[0, 4]), tmp_path / "m.gguf")
    with pytest.raises(Exception, match="head size from the first layer"):  # layer 1 becomes the first
        write_gguf(SOURCE_FILE, DropPlan(N, blocks=[0], attn=[1]), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--blocks", "2", "--compensate", "linear"],
            "tensors as stored, so --compensate linear cannot apply; use --format auto",
        ),
        (["--attn", "2", "--dtype", "float16"], "so --dtype float16 cannot apply"),
        (["--blocks", "2", "--iterative"], "so --iterative cannot apply"),
    ],
)
def test_requests_gguf_cannot_hold_are_refused_before_any_work(flags, message, tmp_path, no_model_work):
    result = CliRunner().invoke(app, ["drop", "smollm2-135m", *flags, "--format", "gguf", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and no_model_work == []
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "o").exists()


def test_a_gguf_source_with_nothing_to_drop_is_refused(tmp_path, no_model_work):
    result = CliRunner().invoke(app, ["drop", "smollm2-135m", "--format", "gguf", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "nothing to drop, and the source is a GGUF file already" in result.output
    assert no_model_work == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "arch, flags, message",
    [
        ("qwen3", [], "from Llama-family checkpoints (llama, mistral), not qwen3"),
        ("gemma2", [], "not gemma2"),
        ("llama", ["--stream", "--compensate", "linear"], "--stream with --compensate cannot apply"),
        ("llama", ["--dtype", "float16"], "own precision into one file, so --dtype float16 cannot apply"),
    ],
)
def test_checkpoints_gguf_cannot_hold_are_refused_before_any_work(arch, flags, message, tmp_path, no_model_work):
    from tiny_models import tiny_model, tiny_tokenizer

    tiny_model(arch).save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    args = ["drop", str(tmp_path / "src"), "--blocks", "2", *flags, "--format", "gguf", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and no_model_work == [], result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_pre_tokenizers_llama_cpp_knows_are_named():
    from llmdrop.errors import LlmdropError
    from llmdrop.formats.gguf_convert import pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    llama3 = (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    )
    split = {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False}
    sequence = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert pre_tokenizer({"pre_tokenizer": sequence}) == "llama-bpe"
    with pytest.raises(LlmdropError, match="no pre-tokenizer llmdrop can name"):
        pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


@pytest.fixture(scope="module")
def smollm2_on_disk(tmp_path_factory):
    """SmolLM2 as a user's safetensors checkpoint: the builtin GGUF loaded (dequantized) and saved."""
    from llmdrop.formats.export import save_tokenizer, strip_gguf_quantization
    from llmdrop.source.models import load_model

    folder = tmp_path_factory.mktemp("smollm2-st")
    loaded = load_model("smollm2-135m", device="cpu")
    strip_gguf_quantization(loaded.model)
    loaded.model.save_pretrained(folder)
    save_tokenizer(loaded.tokenizer, folder)
    return folder


@pytest.mark.slow
def test_a_checkpoint_becomes_a_gguf_transformers_reads_back(smollm2_on_disk, tmp_path):
    """The names, the q / k row order and the tokenizer of the conversion, checked by transformers' own GGUF
    loader (which undoes llama.cpp's rotary layout): the same logits as the checkpoint with the same blocks gone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdrop.planning.surgery import apply_plan
    from llmdrop.source.models import load_model

    out = tmp_path / "o"
    result = CliRunner().invoke(
        app, ["drop", str(smollm2_on_disk), "--block-layers", "3,4", "--format", "gguf", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "llmdrop.json").read_text())["exported"]
    assert record["gguf"]["architecture"] == "llama" and record["dtype"] == "as stored: F32"
    reader = read_source(out / "model.gguf")
    assert value(reader, "tokenizer.ggml.pre") == "gpt-2" and value(reader, "llama.block_count") == 28
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied, as in the checkpoint

    ids = torch.tensor([[504, 3575, 282, 4649, 314, 3575, 282, 6353, 314]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    loaded = load_model(str(smollm2_on_disk), device="cpu")
    apply_plan(loaded.model, loaded.adapter, DropPlan(N, blocks=[3, 4]))
    with torch.no_grad():
        want, got = loaded.model(ids).logits, reloaded(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    text = "Tokenizers: 3 apples, naïve café\n\tdone."
    assert (
        AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")(text).input_ids == loaded.tokenizer(text).input_ids
    )


def test_auto_never_picks_gguf():
    from llmdrop.formats.exporters import AUTO_ORDER, EXPORTERS

    assert "gguf" in EXPORTERS and "gguf" not in AUTO_ORDER


@pytest.mark.parametrize(
    "args, message",
    [
        (["smollm2-135m", "--batch-sizes", "1,8"], "one sequence at a time"),
        (["smollm2-135m", "--dtype", "float16"], "leave --dtype at auto"),
        (["--random-weights", "tiny", "base"], "--random-weights is for transformers and vllm"),
        (["{tiny}"], "llama.cpp runs GGUF files; export with `llmdrop drop ... --format gguf`"),
    ],
)
def test_bench_on_llama_cpp_refuses_what_it_cannot_measure(args, message, tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    args = [a.replace("{tiny}", str(tmp_path / "tiny")) for a in args]
    result = CliRunner().invoke(app, ["bench", "--engine", "llama.cpp", *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_gguf_shape_reads_the_bounds_from_the_file(tmp_path):
    from llmdrop.serving.speed_llamacpp import GGUFShape

    write_gguf(SOURCE_FILE, DropPlan(N, attn=[5, 6, 7, 22, 25, 26, 28, 29]), tmp_path / "a.gguf")
    base, dropped = GGUFShape(SOURCE_FILE), GGUFShape(tmp_path / "a.gguf")
    assert (base.attention_layers, dropped.attention_layers) == (30, 22)
    assert base.kv_bytes_per_token() == 30 * 2 * 3 * 64 * 2 and dropped.kv_bytes_per_token() == 22 * 2 * 3 * 64 * 2
    # tied embeddings: a decode step reads every stored byte
    assert base.weight_bytes_per_step() == sum(int(t.n_bytes) for t in read_source(SOURCE_FILE).tensors)
    removed = sum(
        int(t.n_bytes)
        for t in read_source(SOURCE_FILE).tensors
        if re.match(r"blk\.(5|6|7|22|25|26|28|29)\.attn_", t.name)
    )
    assert base.weight_bytes_per_step() - dropped.weight_bytes_per_step() == removed
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536  # q, o; k, v; gate, up, down
    assert base.prefill_flops(10, 1) == 2 * 10 * 30 * per_layer + 30 * 2 * 9 * 64 * 10 * 11 + 2 * 49152 * 576


@pytest.mark.slow
def test_scale_compensation_rescales_the_stored_quantized_blocks(source, tmp_path):
    """--compensate scale from the Q4_1 GGUF: the output projections after each cut hold the source's quants with
    their float16 scale and minimum multiplied (so their values are the source's times the recorded factor), every
    other tensor is copied byte for byte."""
    import gguf

    from llmdrop.formats.gguf_export import gguf_scales

    out = tmp_path / "o"
    calib = str(Path(__file__).parent.parent / "llmdrop" / "data" / "english_sample.txt")
    result = CliRunner().invoke(
        app, ["drop", "smollm2-135m", "--attn-layers", "5,6", "--mlp-layers", "20", "--compensate", "scale",
              "--format", "gguf", "--calib", calib, "--samples", "2", "--seq-len", "64", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "llmdrop.json").read_text())
    scales = gguf_scales(record["compensation"], N)
    plan = DropPlan(N, attn=[5, 6], mlp=[20])
    src, got = tensors(source), tensors(read_source(out / "model.gguf"))
    assert set(got) == expected_names(src, plan)  # the dropped MLP 20 written as a zero MLP under its names
    assert scales["blk.5.ffn_down.weight"] == pytest.approx(1 / record["compensation"]["runs"][0]["scale"])
    rescaled = 0
    for name, t in got.items():
        if name not in src or (name.startswith("blk.20.ffn_") and name != "blk.20.ffn_norm.weight"):
            continue  # the dropped MLP's zero stand-in
        if name in scales:
            assert t.tensor_type == src[name].tensor_type == gguf.GGMLQuantizationType.Q4_1
            new, old = (np.asarray(x.data).reshape(-1, 20) for x in (t, src[name]))  # d, m (float16), 16 B quants
            assert np.array_equal(new[:, 4:], old[:, 4:]), name
            fields = (old[:, :4].copy().view(np.float16).astype(np.float64) * scales[name]).astype(np.float16)
            assert np.array_equal(new[:, :4].copy().view(np.float16), fields), name
            want = gguf.quants.dequantize(src[name].data, src[name].tensor_type) * scales[name]
            have = gguf.quants.dequantize(t.data, t.tensor_type)  # float16 rounding of d and m: 2^-11 of a block
            np.testing.assert_allclose(have, want, rtol=0, atol=2e-3 * np.abs(want).max())
            rescaled += 1
        else:
            assert np.array_equal(np.asarray(t.data), np.asarray(src[name].data)), name
    # attention 5's cut rescales mlp 5 and everything after; 6's and 20's stack on it
    assert rescaled == (30 - 5) * 2 - 2 - 1 and "blk.4.attn_output.weight" not in scales


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0", "Q5_1"])
def test_scaled_data_multiplies_the_values_in_the_stored_type(kind):
    import gguf

    from llmdrop.formats.gguf_export import Tensor, scaled_data

    qtype = gguf.GGMLQuantizationType[kind]
    values = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    data = gguf.quants.quantize(values, qtype)
    t = Tensor("blk.3.attn_output.weight", data.shape, data.dtype, data.nbytes, qtype, lambda: data, values.size)
    before = gguf.quants.dequantize(data, qtype)
    after = gguf.quants.dequantize(scaled_data(t, 0.8), qtype)
    assert after.shape == before.shape and scaled_data(t, 0.8).dtype == data.dtype
    np.testing.assert_allclose(after, before * 0.8, rtol=0, atol=2e-3 * np.abs(before).max())
    assert np.array_equal(gguf.quants.dequantize(data, qtype), before)  # the source's data is left as it was


def test_scaled_data_refuses_k_quants_in_one_line():
    import gguf

    from llmdrop.errors import LlmdropError
    from llmdrop.formats.gguf_export import Tensor, scaled_data

    qtype = gguf.GGMLQuantizationType.Q4_K
    data = np.zeros((2, 144), np.uint8)
    t = Tensor("blk.3.ffn_down.weight", data.shape, data.dtype, data.nbytes, qtype, lambda: data, 512)
    with pytest.raises(LlmdropError, match=r"^--compensate scale cannot rescale blk.3.ffn_down.weight: its type Q4_K"):
        scaled_data(t, 0.8)


def test_a_gguf_whose_output_projections_are_k_quants_is_refused_before_any_pass(tmp_path):
    import gguf

    from llmdrop.errors import LlmdropError
    from llmdrop.formats.gguf_export import check_rescalable

    writer = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 144), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((256, 144), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LlmdropError, match=r"^--compensate scale cannot rescale blk.0.ffn_down.weight: its type Q4_K"):
        check_rescalable(tmp_path / "k.gguf")
    check_rescalable(SOURCE_FILE)  # the builtin Q4_1 file: rescalable


@pytest.mark.slow
def test_a_scale_compensated_block_export_reloads_in_transformers(tmp_path):
    """The compensated Q4_1 GGUF of a block drop loads in transformers with no missing or unused tensor and gives the
    logits of the same compensated drop exported as a vanilla checkpoint (float16 rounding of the block scales
    apart), and not those of the uncompensated drop."""
    from transformers import AutoModelForCausalLM

    from llmdrop import api
    from llmdrop.source.calibration import CalibSpec

    calib = CalibSpec(str(Path(api.__file__).parent / "data" / "english_sample.txt"), samples=2, seq_len=64)
    args = dict(block_layers="12-15", compensate="scale", calib=calib, progress=False)
    api.drop("smollm2-135m", tmp_path / "gguf", fmt="gguf", **args)
    api.drop("smollm2-135m", tmp_path / "hf", dtype="float32", **args)
    api.drop("smollm2-135m", tmp_path / "plain", block_layers="12-15", fmt="gguf", progress=False)
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 3575, 282, 6353, 314]])
    logits = {}
    for name, kwargs in (("gguf", {"gguf_file": "model.gguf"}), ("hf", {}), ("plain", {"gguf_file": "model.gguf"})):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / name, output_loading_info=True, **kwargs)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
        with torch.no_grad():
            logits[name] = model.eval()(ids).logits
    gap = (logits["gguf"] - logits["hf"]).abs().max().item()
    print(f"compensated GGUF vs vanilla: {gap:.4f}; uncompensated: {(logits['plain'] - logits['hf']).abs().max():.3f}")
    assert gap < 0.05 and (logits["plain"] - logits["hf"]).abs().max().item() > 20 * gap, gap
