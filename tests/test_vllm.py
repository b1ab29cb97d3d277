"""vLLM serves llmdrop's ``nemotron-nas`` exports natively (its ``DeciLMForCausalLM``): the same greedy tokens as
transformers on the exported checkpoint, and KV cache for the kept attention layers only.

Runs in the venv with vLLM's CPU build (``make .venv-vllm/.installed``) and skips elsewhere. One engine per model,
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager (torch.compile takes minutes on CPU), 1 GiB of KV cache;
each fixture runs its engine, collects what the tests assert, and shuts the engine down before the next one starts.
"""

import gc
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM's CPU build: make .venv-vllm/.installed (runs in `make test`)")

from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import COMMON, FIRST_WORD_ID, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: E402

from llmdrop import api  # noqa: E402
from llmdrop.compat import cache_kwarg, output_cache
from llmdrop.errors import LlmdropError  # noqa: E402
from llmdrop.source.calibration import CalibSpec  # noqa: E402
from llmdrop.source.models import load_model  # noqa: E402

NEW_TOKENS = 24
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

# SmolLM2-135M (30 layers): attention dropped in 5 layers (not layer 0: see test_layer0_attention_no_op), one MLP
SMOL_ATTN, SMOL_MLP = [5, 6, 7, 22, 25], [12]
SMOL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]

# Tiny random Qwen2 with sizes the CPU attention kernels take (head size 32). Intermediate 320 is no multiple of
# 256, so the export states it as `intermediate_size` (vLLM's fallback) where SmolLM2's 1536 is `ffn_mult` 4.0.
QWEN_LAYERS, QWEN_ATTN, QWEN_MLP = 6, [2, 3], [4]
QWEN_PROMPTS = [[1, 10, 20, 30, 40], [1, 5, 6, 7], [1, 100, 90, 80, 70, 60, 50]]


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        yield


@contextmanager
def engine(path, **kwargs):
    """An offline vLLM engine on ``path`` (float32, eager, in-process), shut down on exit."""
    llm = LLM(
        str(path),
        dtype="float32",
        trust_remote_code=True,  # nemotron-nas has no config class in transformers: the checkpoint's own
        max_model_len=256,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
        **kwargs,
    )
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_greedy(llm, prompts, n=NEW_TOKENS):
    """(prompt token ids, greedy continuation) per prompt; prompts are strings or token id lists."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in llm.generate(inputs, params)]


def kv_cache_layers(llm) -> tuple[list[int], int]:
    """The layers the engine gave KV cache (from the worker's KV cache config, as layer indices) and how many KV
    cache tensors its model runner bound. In-process engine: the callable runs on the worker object itself."""

    def read(worker):
        runner = worker.model_runner
        names = [name for group in runner.kv_cache_config.kv_cache_groups for name in group.layer_names]
        return names, len(runner.kv_caches)

    ((names, bound),) = llm.collective_rpc(read)
    assert all(n.startswith("model.layers.") and n.endswith(".self_attn.attn") for n in names), names
    return sorted(int(n.split(".")[2]) for n in names), bound


@torch.no_grad()
def hf_greedy(model, ids, n=NEW_TOKENS):
    """Greedy continuation of ``ids`` with transformers (KV cache on; EOS is just a token, as with ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), **{cache_kwarg(model): output_cache(out)}, use_cache=True)
    return tokens


def hf_export(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def block_configs(path):
    return json.loads((Path(path) / "config.json").read_text())["block_configs"]


# --------------------------------------------------------------------------- SmolLM2-135M


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "nas"
    record = api.drop(
        "smollm2-135m",
        out,
        attn_layers=SMOL_ATTN,
        mlp_layers=SMOL_MLP,
        fmt="nemotron-nas",
        dtype="float32",
        compensate="scale",  # folded into the kept output projections: vLLM serves it as it is
        calib=CalibSpec(str(Path(api.__file__).parent / "data" / "english_sample.txt"), samples=4, seq_len=128),
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = hf_export(out)
    ids = [tokenizer(p)["input_ids"] for p in SMOL_PROMPTS]
    expected = [hf_greedy(model, i) for i in ids]
    del model
    with engine(out) as llm:
        got = vllm_greedy(llm, SMOL_PROMPTS)  # text in: vLLM tokenizes with the export's tokenizer
        kv = kv_cache_layers(llm)
    return dict(out=out, ids=ids, expected=expected, got=got, kv=kv, record=record)


@pytest.mark.slow
def test_smollm2_config_states_the_drops(smol):
    blocks = block_configs(smol["out"])
    assert len(blocks) == 30
    runs = smol["record"]["compensation"]["runs"]  # attn 5, 6, 7 are apart (their MLPs stay): 6 runs
    assert [r["from"] for r in runs] == ["attn 5", "attn 6", "attn 7", "mlp 12", "attn 22", "attn 25"]
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == SMOL_ATTN
    assert [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]] == SMOL_MLP
    # 9 query heads over 3 KV heads; int(2 * 4.0 * 576 / 3) = 1536, a multiple of 256: vLLM's ffn_mult path
    kept = [b for i, b in enumerate(blocks) if i not in SMOL_ATTN + SMOL_MLP]
    assert {b["attention"]["n_heads_in_group"] for b in kept} == {3}
    assert {b["ffn"]["ffn_mult"] for b in kept} == {4.0}


@pytest.mark.slow
def test_smollm2_vllm_greedy_equals_transformers(smol):
    assert [ids for ids, _ in smol["got"]] == smol["ids"]  # the same prompt tokens
    got = [tokens for _, tokens in smol["got"]]
    assert all(len(t) == NEW_TOKENS for t in got)
    assert got == smol["expected"]


@pytest.mark.slow
def test_smollm2_vllm_kv_cache_holds_kept_attention_only(smol):
    kept = [i for i in range(30) if i not in SMOL_ATTN]
    assert smol["kv"] == (kept, 25)


# --------------------------------------------------------------------------- tiny random Qwen2 (q/k/v biases)


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory):
    """A 6-layer random Qwen2 on disk with large random q/k/v biases (transformers initialises biases to zero, which
    would hide a bias that vLLM ignored) and weights large enough for varied greedy tokens (init 0.2)."""
    config = Qwen2Config(
        **{**COMMON, "hidden_size": 128, "head_dim": 32, "intermediate_size": 320},
        num_hidden_layers=QWEN_LAYERS,
        use_sliding_window=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("qwen2") / "source"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def load_qwen(source):
    model = load_model(str(source), device="cpu")
    model.tokenizer = tiny_tokenizer()  # transformers 5 reloads this word-level tokenizer as a broken Qwen2Tokenizer
    return model


@pytest.fixture(scope="module")
def qwen_export(qwen_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "nas"
    api.drop(
        load_qwen(qwen_source),
        out,
        attn_layers=QWEN_ATTN,
        mlp_layers=QWEN_MLP,
        fmt="nemotron-nas",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def qwen(qwen_export):
    model = hf_export(qwen_export)
    expected = [hf_greedy(model, p) for p in QWEN_PROMPTS]
    del model
    with engine(qwen_export, skip_tokenizer_init=True) as llm:  # token ids in and out
        got = [tokens for _, tokens in vllm_greedy(llm, QWEN_PROMPTS)]
        kv = kv_cache_layers(llm)
    return dict(expected=expected, got=got, kv=kv)


def test_qwen2_config_states_biases_and_sizes(qwen_export):
    config = json.loads((qwen_export / "config.json").read_text())
    # vLLM: q/k/v biases from qkv_bias, o_proj's from attention_bias (an unexpected *.bias tensor is ignored
    # silently, and a missing one left uninitialised: only the greedy test below would notice)
    assert (config["qkv_bias"], config["attention_bias"]) == (True, False)
    blocks = config["block_configs"]
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == QWEN_ATTN
    assert [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]] == QWEN_MLP
    kept = [b for i, b in enumerate(blocks) if i not in QWEN_ATTN + QWEN_MLP]
    assert {b["attention"]["n_heads_in_group"] for b in kept} == {2}
    # 320 does not survive int(2 * mult * 128 / 3) rounded up to 256: the size itself, and no ffn_mult key at all
    # (vLLM tests hasattr(ffn, "ffn_mult") before falling back to ffn.intermediate_size)
    assert all(b["ffn"].get("intermediate_size") == 320 and "ffn_mult" not in b["ffn"] for b in kept)


def test_qwen2_vllm_greedy_equals_transformers(qwen):
    assert all(len(t) == NEW_TOKENS for t in qwen["got"])
    assert len({t for tokens in qwen["expected"] for t in tokens}) > 20  # a model that says something
    assert qwen["got"] == qwen["expected"]


def test_qwen2_vllm_kv_cache_holds_kept_attention_only(qwen):
    kept = [i for i in range(QWEN_LAYERS) if i not in QWEN_ATTN]
    assert qwen["kv"] == (kept, len(kept))


# --------------------------------------------------------------------------- layer 0's attention


def test_layer0_attention_no_op(qwen_source, qwen_export, tmp_path):
    """vLLM's DeciLM layer starts the residual stream inside the attention branch (``residual is None`` on the
    first layer); with layer 0's attention a no-op its MLP branch gets ``residual=None`` and the first forward fails.
    So the exporter refuses such plans. When this test starts failing on the vLLM side, the refusal can go."""
    with pytest.raises(LlmdropError, match="layer 0"):
        api.drop(load_qwen(qwen_source), tmp_path / "refused", attn_layers=[0], fmt="nemotron-nas", progress=False)

    # what the refusal prevents: the Qwen2 export with layer 0's attention made a no-op by hand
    hand = tmp_path / "layer0"
    shutil.copytree(qwen_export, hand)
    config = json.loads((hand / "config.json").read_text())
    config["block_configs"][0]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    (hand / "config.json").write_text(json.dumps(config))
    weights = load_file(hand / "model.safetensors")
    dropped = [k for k in weights if k.startswith("model.layers.0.self_attn.") or k.startswith("model.layers.0.input_")]
    assert len(dropped) == 8  # q, k, v (weight and bias), o, input_layernorm
    save_file({k: v for k, v in weights.items() if k not in dropped}, hand / "model.safetensors", {"format": "pt"})

    with engine(hand, skip_tokenizer_init=True) as llm:  # loads, and gives layer 0 no KV cache ...
        assert kv_cache_layers(llm)[0] == [1, 4, 5]
        # ... but RMSNorm(x, residual=None) returns one tensor, which the layer unpacks into two (with a batch of
        # exactly 2 tokens this "works" and computes garbage: the prompt here has more)
        with pytest.raises(ValueError, match="too many values to unpack"):
            vllm_greedy(llm, [list(range(FIRST_WORD_ID, FIRST_WORD_ID + 5))])


# --------------------------------------------------------------------------- llmdrop bench --engine vllm

BENCH = dict(prompt_lens=[16], batch_sizes=[1, 2], gen_len=8, repeats=2, warmup=1, progress=False)


def kv_per_token(config, layers):
    return 2 * layers * config.num_key_value_heads * config.head_dim * 4  # float32


def test_bench_vllm_checkpoints(qwen_source, qwen_export, tmp_path):
    """A plain Qwen2 against its nemotron-nas export: both served by vLLM, the KV facts read from each engine."""
    # float32 said explicitly: vLLM's dtype "auto" serves a float32 checkpoint in 16 bits
    report = api.bench(
        [str(qwen_source), str(qwen_export)], engine="vllm", dtype="float32", out=str(tmp_path / "b.json"), **BENCH
    )
    assert report["dtype"] == "float32"
    assert report["engine"]["name"] == "vllm" and report["versions"]["vllm"] == report["engine"]["version"]
    assert json.loads((tmp_path / "b.json").read_text())["results"] == report["results"]
    rows = {(r["model"], r["batch_size"]): r for r in report["results"]}
    assert len(rows) == 4
    config = Qwen2Config.from_pretrained(qwen_source)
    kept = QWEN_LAYERS - len(QWEN_ATTN)
    for b in (1, 2):
        base, export = rows[(str(qwen_source), b)], rows[(str(qwen_export), b)]
        assert (base["kv_cache_layers"], export["kv_cache_layers"]) == (QWEN_LAYERS, kept)
        assert base["kv_cache_bytes_per_token"] == kv_per_token(config, QWEN_LAYERS)
        assert export["kv_cache_bytes_per_token"] == export["kv_cache_bytes_per_token_analytic"]
        assert export["kv_cache_bytes_per_token"] == kv_per_token(config, kept)
        for row in (base, export):
            assert len(report["results"][0]["samples"]["decode_s"]) == 2
            assert all(s > 0 for s in row["samples"]["decode_s"] + row["samples"]["prefill_s"])
            assert row["decode_tokens_per_s"]["min"] <= row["decode_tokens_per_s"]["median"]
        # the bound of a drop of 2 of 6 attention layers and 1 MLP: fewer weight and KV bytes per step
        assert export["bound"]["decode"] > 1.0 and base["bound"]["decode"] == 1.0
    # interleaved: base, export, base, export ... for every setting
    assert report["order"] == [str(qwen_source), str(qwen_export)] * 4


def test_bench_vllm_random_weights(tmp_path):
    """vLLM's dummy weights on a config llmdrop writes: attn:N becomes nemotron-nas, blocks:N a vanilla Llama."""
    shape = tmp_path / "shape.json"
    shape.write_text(
        json.dumps(
            dict(
                model_type="llama",
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                vocab_size=512,
                max_position_embeddings=256,
            )
        )
    )
    report = api.bench(["base", "attn:2", "blocks:1"], random_weights=str(shape), engine="vllm", **BENCH)
    rows = {r["model"]: r for r in report["results"] if r["batch_size"] == 2}
    assert {m: rows[m]["kv_cache_layers"] for m in rows} == {"base": 4, "attn:2": 2, "blocks:1": 3}
    assert {m: rows[m]["kv_cache_bytes_per_token"] for m in rows} == {"base": 2048, "attn:2": 1024, "blocks:1": 1536}
    assert [m["num_layers"] for m in report["models"]] == [4, 4, 3]
    assert report["random_weights"] == str(shape)
    # peak memory: the checkpoint's weights (CPU) + 2 sequences x one 128-token block x KV bytes per token
    assert rows["attn:2"]["peak_memory_bytes"] == report["models"][1]["parameter_bytes"] + 2 * 128 * 1024


def test_bench_vllm_refuses_what_it_cannot_serve(qwen_export, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(qwen_export, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "llmdrop_qwen2"}))
    with pytest.raises(LlmdropError, match="re-export it with --format nemotron-nas"):
        api.bench([str(qwen_export), str(remote)], engine="vllm", **BENCH)
    with pytest.raises(LlmdropError, match="leave --device at auto"):
        api.bench([str(qwen_export)], engine="vllm", device="cpu", **BENCH)


# --------------------------------------------------------------------------- llmdrop auto on vLLM


@pytest.mark.slow
def test_auto_measures_on_vllm_and_its_export_serves(tmp_path, monkeypatch):
    """`llmdrop auto --engine vllm` on SmolLM2: the cost model and the plans' speed measured by vLLM itself (random
    weights of the model's shape), the KV target met, and the export served by vLLM with transformers' tokens."""
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "auto"
    report = api.auto(
        "smollm2-135m",
        str(out),
        kv_cache=0.8,
        engine="vllm",
        workload="prefill=64,decode=32",
        calib=str(Path(api.DATA_DIR) / "english_sample.txt"),
        candidates=4,
        verify=2,
        refine=0,
        bench_plans=2,
        bench_repeats=1,
        progress=False,
    )
    costs, chosen = report["cost_model"], report["chosen"]
    assert report["speed_measured"] and costs["engine"] == "vllm" and report["bench"]["engine"]["name"] == "vllm"
    assert min(costs["attn"], costs["mlp"], costs["block"]) > 0
    assert chosen["kv_cache_fraction"] <= 0.8 and chosen["confirmed_speedup"] > 1.0
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["exported"]["format"] == ("nemotron-nas" if chosen["lists"]["attn"] else "vanilla")
    ids = [[1, 504, 3458, 282, 4649, 314], [1, 504, 1176, 1915, 3242, 359]]
    with engine(out) as llm:
        served = vllm_greedy(llm, ids)
    model = hf_export(out)
    assert [tokens for _, tokens in served] == [hf_greedy(model, p) for p in ids]
