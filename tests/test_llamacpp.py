"""llama.cpp itself runs llmdrop's GGUF exports of the builtin SmolLM2 (Q4_1 as shipped) and computes what
transformers computes for the same plan on the same (dequantized) weights.

Runs where llama-cpp-python is installed (`make test` builds it into .venv-llamacpp); skips elsewhere.

Tolerance: llama.cpp quantizes the *activations* to 8 bits for its quantized matmuls (Q4_1 / Q8_0 weights against
Q8_1 / Q8_0 activations), transformers multiplies in float32, so logits differ by up to ~1 on a scale of ~20 even
for the undropped model. Measured: mean KL(transformers || llama.cpp) per position 0.002-0.005 for the sublayer
plans, 0.02 for 8 blocks (a more perplexed model: more near-ties). The tests allow 0.05 and 80% top-1 agreement,
and check that this means something: the undropped model is at least 10x further from the export.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from llmdrop.formats.gguf_export import write_gguf  # noqa: E402
from llmdrop.planning.plan import DropPlan  # noqa: E402
from llmdrop.planning.surgery import apply_plan  # noqa: E402
from llmdrop.source.models import builtin_gguf, load_model  # noqa: E402

SOURCE_FILE = "/".join(builtin_gguf("smollm2-135m"))
N = 30
TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees "
    "Celsius at sea level, and it freezes at zero. A week has seven days and a year has twelve months."
)
PLANS = {
    "attn": DropPlan(N, attn=[5, 6, 7, 22, 25, 26, 28, 29]),
    "mlp": DropPlan(N, mlp=[3, 17, 29]),  # the last layer's too: llama.cpp aborts on an MLP of width 0 there
    "mixed": DropPlan(N, blocks=[12, 13], attn=[10, 24], mlp=[3, 29]),
    "blocks": DropPlan(N, blocks=[20, 21, 22, 23, 24, 25, 26, 27]),
}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def ids(smollm2):
    return smollm2.tokenizer(TEXT, add_special_tokens=False).input_ids


def llama_logits(path, ids) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, flash_attn=True)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


def dropped(loaded, plan):
    """A copy of the loaded model with ``plan`` applied in memory (None: undropped), as the export's code does."""
    import copy

    model = copy.deepcopy(loaded.model)
    if plan is not None:
        apply_plan(model, loaded.adapter, plan)
    return model


def transformers_logits(loaded, plan, ids) -> torch.Tensor:
    with torch.no_grad():
        return dropped(loaded, plan)(torch.tensor([ids])).logits[0].float()


def kl(p_logits, q_logits) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("name", PLANS)
def test_llama_cpp_computes_the_plan(name, smollm2, ids, tmp_path):
    plan = PLANS[name]
    write_gguf(SOURCE_FILE, plan, tmp_path / "m.gguf")
    ours = llama_logits(tmp_path / "m.gguf", ids)
    want = transformers_logits(smollm2, plan, ids)
    undropped = transformers_logits(smollm2, None, ids)
    agree = (ours.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(
        f"{name}: KL {kl(want, ours):.4f}, top-1 agreement {agree:.3f}, undropped model's KL {kl(undropped, ours):.3f}"
    )
    assert kl(want, ours) < 0.05 and agree >= 0.8, (kl(want, ours), agree)
    assert kl(undropped, ours) > 10 * kl(want, ours)


def test_greedy_continuation_agrees(smollm2, tmp_path):
    plan = PLANS["attn"]
    write_gguf(SOURCE_FILE, plan, tmp_path / "m.gguf")
    prompt = smollm2.tokenizer("Here are the days of the week: Monday,", add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, verbose=False, flash_attn=True)
    ours = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        ours.append(token)
        if len(ours) == 12 or token == smollm2.tokenizer.eos_token_id:  # transformers stops at the end token too
            break
    want = (
        dropped(smollm2, plan)
        .generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        .tolist()
    )
    assert ours == want


def kv_cache_mib(path, flash: bool) -> float:
    """The KV cache llama.cpp allocates for 256 cells, as it reports it (on stderr, from C)."""
    code = (
        "import llama_cpp, sys; llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=True, "
        "flash_attn=sys.argv[2] == '1')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path), "1" if flash else "0"], capture_output=True, text=True, check=True
    )
    return float(re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", run.stderr)[1])


def test_layers_without_attention_get_no_kv_cache(tmp_path):
    per_layer = 256 * 3 * 64 * 2 * 2 / 2**20  # cells x KV heads x head size x (K, V) x f16 bytes, in MiB
    write_gguf(SOURCE_FILE, PLANS["attn"], tmp_path / "attn.gguf")
    write_gguf(SOURCE_FILE, PLANS["blocks"], tmp_path / "blocks.gguf")
    assert kv_cache_mib(SOURCE_FILE, flash=True) == pytest.approx(30 * per_layer, abs=0.01)
    assert kv_cache_mib(tmp_path / "attn.gguf", flash=True) == pytest.approx(22 * per_layer, abs=0.01)
    assert kv_cache_mib(tmp_path / "blocks.gguf", flash=True) == pytest.approx(22 * per_layer, abs=0.01)
    # without flash attention llama.cpp still pads the V cache of the attention-free layers to full width
    assert kv_cache_mib(tmp_path / "attn.gguf", flash=False) == pytest.approx(
        (22 + 30) / 2 * per_layer, abs=0.01
    )  # K: 22, V: 30


def test_bench_on_llama_cpp(tmp_path):
    from llmdrop.serving.benchmark import bench

    (tmp_path / "m").mkdir()
    write_gguf(SOURCE_FILE, PLANS["attn"], tmp_path / "m" / "attn.gguf")
    report = bench(
        [SOURCE_FILE, str(tmp_path / "m" / "attn.gguf")],
        engine="llama.cpp",
        prompt_lens=(16, 32),
        gen_len=4,
        repeats=2,
        warmup=1,
        progress=False,
        out=str(tmp_path / "bench.json"),
    )
    assert report["engine"]["name"] == "llama.cpp" and report["settings"]["flash_attn"] is True
    assert [m["kept_attention_layers"] for m in report["models"]] == [30, 22]
    rows = {(r["model"], r["prompt_len"]): r for r in report["results"]}
    assert len(rows) == 4 and all(len(r["samples"]["decode_s"]) == 2 for r in rows.values())
    dropped = rows[(str(tmp_path / "m" / "attn.gguf"), 32)]
    assert dropped["kv_cache_bytes_per_token"] == 22 * 2 * 3 * 64 * 2
    base_bytes = report["models"][0]["weight_bytes_per_decode_step"]
    ours = report["models"][1]["weight_bytes_per_decode_step"]
    context = 32 + 5 / 2
    want = (base_bytes + context * 30 * 768) / (ours + context * 22 * 768)
    assert dropped["bound"]["decode"] == pytest.approx(want)
    assert dropped["speedup"]["decode"] > 0 and (tmp_path / "bench.json").is_file()


STRINGS = [
    "Hello world",
    "The year 2024 had 366 days, not 365!",
    "  leading spaces\tand tabs\n\nnewlines",
    "naïve café — ünïcödé 日本語",
    "x = f(a, b) + 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm2_on_disk(tmp_path_factory, smollm2):
    """SmolLM2 as a user's safetensors checkpoint (the builtin GGUF dequantized and saved)."""
    from llmdrop.formats.export import save_tokenizer, strip_gguf_quantization

    folder = tmp_path_factory.mktemp("smollm2-st")
    strip_gguf_quantization(smollm2.model)
    smollm2.model.save_pretrained(folder)
    save_tokenizer(smollm2.tokenizer, folder)
    return folder


def drop_to_gguf(source, plan_args, out):
    from typer.testing import CliRunner

    from llmdrop.cli import app

    result = CliRunner().invoke(app, ["drop", str(source), *plan_args, "--format", "gguf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model.gguf"


@pytest.mark.parametrize(
    "plan_args, plan",
    [
        (["--attn-layers", "5,6,7", "--mlp-layers", "20,29"], DropPlan(N, attn=[5, 6, 7], mlp=[20, 29])),
        (["--block-layers", "3,4"], DropPlan(N, blocks=[3, 4])),
    ],
    ids=["sublayers", "blocks"],
)
def test_a_checkpoint_converted_runs_in_llama_cpp(plan_args, plan, smollm2_on_disk, tmp_path):
    """From safetensors: F32 tensors, so llama.cpp multiplies in F32 too and only its f16 KV cache rounds."""
    path = drop_to_gguf(smollm2_on_disk, plan_args, tmp_path / "o")
    loaded = load_model(str(smollm2_on_disk), device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, flash_attn=True)
    for text in STRINGS:  # the converted tokenizer splits text as transformers does, special tokens included
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == loaded.tokenizer(text, add_special_tokens=False).input_ids
        ), text
    ids = loaded.tokenizer(TEXT, add_special_tokens=False).input_ids
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    want = transformers_logits(loaded, plan, ids)
    assert (ours - want).abs().max() < 0.1 and (ours.argmax(-1) == want.argmax(-1)).all()
    assert (ours - transformers_logits(loaded, None, ids)).abs().max() > 1  # the plan is what made the difference


def test_a_smollm_pre_tokenizer_is_converted(smollm2_on_disk, tmp_path):
    """SmolLM2's own tokenizer splits digits one by one before BPE; llama.cpp must be told ("smollm")."""
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "src"
    shutil.copytree(smollm2_on_disk, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    byte_level = data["pre_tokenizer"]
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    path = drop_to_gguf(folder, ["--block-layers", "3"], tmp_path / "o")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in STRINGS:
        want = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    assert len(tokenizer("2024", add_special_tokens=False).input_ids) == 4  # the digits were split


@pytest.mark.parametrize("fmt", ["nemotron-nas", "llmdrop"])
def test_an_existing_export_is_converted_as_it_is(fmt, smollm2_on_disk, tmp_path):
    """`drop EXPORT --format gguf` with nothing more to drop: the export's own drops become deci layers (its
    dropped MLP, whose norm is gone too, a zero MLP behind a unit norm)."""
    from typer.testing import CliRunner

    from llmdrop.cli import app

    args = ["drop", str(smollm2_on_disk), "--attn-layers", "5,6,7", "--mlp-layers", "29", "--format", fmt]
    assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "export")]).exit_code == 0
    path = drop_to_gguf(tmp_path / "export", [], tmp_path / "o")
    export = load_model(str(tmp_path / "export"), device="cpu")
    ids = export.tokenizer(TEXT, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, flash_attn=True)
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    want = transformers_logits(export, None, ids)
    assert (ours - want).abs().max() < 0.1 and (ours.argmax(-1) == want.argmax(-1)).all()


def byte_level_bpe(folder):
    """A small byte-level BPE tokenizer (GPT-2 style), trained on the test text: what the converter needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize(
    "plan_args, plan",
    [
        (["--attn-layers", "2", "--mlp-layers", "1,5"], DropPlan(6, attn=[2], mlp=[1, 5])),
        (["--block-layers", "0,3"], DropPlan(6, blocks=[0, 3])),
    ],
    ids=["sublayers", "blocks"],
)
def test_tiny_random_models_run_in_llama_cpp(arch, plan_args, plan, tmp_path):
    """Random weights of every architecture a GGUF is converted from (GQA, head size 16): llama.cpp's logits and
    greedy tokens against transformers'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tmp_path / "src"
    tokenizer = byte_level_bpe(src)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **({"sliding_window": None} if arch == "mistral" else {}),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    path = drop_to_gguf(src, plan_args, tmp_path / "o")
    loaded = load_model(str(src), device="cpu")
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids[:40]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, flash_attn=True)
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    want = transformers_logits(loaded, plan, ids)
    assert (ours - want).abs().max() < 1e-2 * want.abs().max(), (ours - want).abs().max()
    llm.reset()
    greedy = [t for _, t in zip(range(10), llm.generate(ids[:8], top_k=1, temp=0.0))]
    want_tokens = dropped(loaded, plan).generate(
        torch.tensor([ids[:8]]), max_new_tokens=10, do_sample=False, eos_token_id=None
    )
    assert greedy == want_tokens[0, 8:].tolist()


def test_a_scale_compensated_export_runs_in_llama_cpp(ids, tmp_path):
    """--compensate scale from the Q4_1 GGUF (the float16 block scales of the output projections multiplied):
    llama.cpp computes what transformers computes for the same compensated plan (an llmdrop-format export of it,
    reloaded from disk), and measurably not what it computes for the plan without compensation."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from llmdrop import api
    from llmdrop.source.calibration import CalibSpec

    calib = CalibSpec(str(Path(api.__file__).parent / "data" / "english_sample.txt"), samples=4, seq_len=128)
    args = dict(attn_layers=PLANS["attn"].attn, compensate="scale", calib=calib, progress=False)
    api.drop("smollm2-135m", tmp_path / "gguf", fmt="gguf", **args)
    api.drop("smollm2-135m", tmp_path / "hf", fmt="llmdrop", dtype="float32", **args)
    ours = llama_logits(tmp_path / "gguf" / "model.gguf", ids)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        want = model.eval()(torch.tensor([ids])).logits[0].float()
    write_gguf(SOURCE_FILE, PLANS["attn"], tmp_path / "plain.gguf")
    plain = llama_logits(tmp_path / "plain.gguf", ids)
    agree = (ours.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"compensated: KL {kl(want, ours):.4f}, top-1 {agree:.3f}; uncompensated GGUF's KL {kl(want, plain):.4f}")
    assert kl(want, ours) < 0.05 and agree >= 0.8, (kl(want, ours), agree)
    assert kl(want, plain) > 2 * kl(want, ours)
