"""llmdrop.serving.speed on the builtin `tiny` random shape, on CPU. Timings here are noise (a shared machine):
these tests assert logic only — the cache fed back, KV bytes, run order, theory numbers, output schema.

The tiny shape: Llama, 4 layers, hidden 64, intermediate 128, 4 query heads / 2 KV heads of dim 16,
vocab 256 (untied lm_head), float32, max_position_embeddings 64.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.compat import call_cache
from llmdrop.errors import LlmdropError
from llmdrop.serving.benchmark import bench
from llmdrop.serving.speed import (
    FORMAT,
    BenchModel,
    build_random,
    decode_bytes_per_step,
    kv_bytes_per_token_analytic,
    make_prompt,
    parse_variant,
    prefill_flops,
    run_benchmark,
    run_once,
    shape_config,
    weight_bytes_per_step,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["base", "attn:2", "blocks:1"]
TINY = dict(
    random_weights="tiny",
    prompt_lens=[8],
    gen_len=4,
    batch_sizes=[1, 2],
    repeats=2,
    warmup=1,
    device="cpu",
    memory=False,
    progress=False,
)

# Hand-computed for the tiny shape (fp32 = 4 bytes).
# One layer's matrices: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288 (attention), 3 x 64x128 = 24,576 (MLP);
# its two RMS norms: 2 x 64. lm_head 256x64 = 16,384, final norm 64; the input embedding is not read per step.
ATTN, MLP, NORM = 12_288, 24_576, 64
WEIGHT_BYTES = {
    "base": 4 * (4 * (ATTN + MLP + 2 * NORM) + 16_384 + NORM),  # 657,664
    "attn:2": 4 * (4 * (ATTN + MLP + 2 * NORM) - 2 * (ATTN + NORM) + 16_384 + NORM),  # 558,848
    "blocks:1": 4 * (3 * (ATTN + MLP + 2 * NORM) + 16_384 + NORM),  # 509,696
}
KV_BYTES = {"base": 2 * 4 * 2 * 16 * 4, "attn:2": 2 * 2 * 2 * 16 * 4, "blocks:1": 2 * 3 * 2 * 16 * 4}  # 1024, 512, 768
KEPT_ATTN = {"base": 4, "attn:2": 2, "blocks:1": 3}
KEPT_MATRICES = {"base": 4 * (ATTN + MLP), "attn:2": 4 * (ATTN + MLP) - 2 * ATTN, "blocks:1": 3 * (ATTN + MLP)}


def hand_prefill_flops(variant, p, b):
    # 2 x tokens x matrix elements + per kept attention layer 2 x b x heads x head_dim x p(p+1) (QK^T and AV over
    # the causal triangle) + the lm_head for the last position only (logits_to_keep=1)
    return 2 * b * p * KEPT_MATRICES[variant] + KEPT_ATTN[variant] * 2 * b * 4 * 16 * p * (p + 1) + 2 * b * 16_384


def hand_decode_bytes(variant, p, g, b):
    # weights once per step + KV of the mean context: step i attends to p + i + 1 tokens -> mean p + (g + 1) / 2
    return WEIGHT_BYTES[variant] + b * (p + (g + 1) / 2) * KV_BYTES[variant]


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on a busy 2-core machine make tiny ops wait for a descheduled thread: keep tests fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("bench") / "bench.json"
        result = bench(VARIANTS, out=str(path), **TINY)
        return result, json.loads(path.read_text())
    finally:
        torch.set_num_threads(n)


def test_decode_feeds_the_cache_back():
    """One prefill over the prompt, then gen_len forwards of one token each, each on the grown cache."""
    for variant, kept in (("base", 4), ("attn:2", 2)):
        model = build_random("tiny", variant)
        calls = []

        def record(module, args, kwargs):
            cache = call_cache(module, args, kwargs)
            calls.append((kwargs["input_ids"].shape, None if cache is None else cache.get_seq_length()))

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        run = run_once(model, make_prompt(256, 2, 8, 0, "cpu"), gen_len=5)
        handle.remove()
        assert calls == [((2, 8), None)] + [((2, 1), 8 + i) for i in range(5)]
        assert run["cache_len"] == 8 + 5
        assert run["cache_layers"] == kept  # only the kept attention layers hold a cache
        assert run["kv_bytes_per_token"] == KV_BYTES[variant]


def test_kv_bytes_measured_equal_analytic(report):
    result, _ = report
    rows = result["results"]
    assert len(rows) == 2 * len(VARIANTS)  # batch 1 and 2
    for row in rows:
        expected = KV_BYTES[row["model"]]
        assert row["kv_cache_bytes_per_token"] == row["kv_cache_bytes_per_token_analytic"] == expected
        assert row["kv_cache_layers"] == KEPT_ATTN[row["model"]]


def test_theory_matches_hand_computation(report):
    for variant in VARIANTS:
        model = build_random("tiny", variant)
        assert weight_bytes_per_step(model) == WEIGHT_BYTES[variant]
        assert kv_bytes_per_token_analytic(model) == KV_BYTES[variant]
        for p, g, b in ((8, 4, 1), (16, 8, 2)):
            assert decode_bytes_per_step(model, p, g, b) == hand_decode_bytes(variant, p, g, b)
            assert prefill_flops(model, p, b) == hand_prefill_flops(variant, p, b)
    assert WEIGHT_BYTES == {"base": 657_664, "attn:2": 558_848, "blocks:1": 509_696}
    assert hand_decode_bytes("attn:2", 8, 4, 1) == 564_224 and hand_prefill_flops("attn:2", 8, 1) == 2_017_280
    # the bounds in the report are base / model of those numbers, the speedups base-relative
    result, _ = report
    for row in result["results"]:
        v, p, b = row["model"], row["prompt_len"], row["batch_size"]
        assert row["bound"]["decode"] == pytest.approx(
            hand_decode_bytes("base", p, 4, b) / hand_decode_bytes(v, p, 4, b)
        )
        assert row["bound"]["prefill"] == pytest.approx(hand_prefill_flops("base", p, b) / hand_prefill_flops(v, p, b))
        assert row["of_bound"]["decode"] == pytest.approx(row["speedup"]["decode"] / row["bound"]["decode"])
        if v == "base":
            assert row["speedup"] == {"prefill": 1.0, "decode": 1.0}
    assert result["results"][1]["bound"]["decode"] == pytest.approx(668_416 / 564_224)


def test_models_run_interleaved():
    """Record which model really ran each prefill: A B A B ... through warmup and repeats."""
    entries = [BenchModel(v, build_random("tiny", v)) for v in ("base", "attn:2")]
    ran = []
    for bm in entries:
        bm.model.register_forward_pre_hook(
            lambda m, a, kw, name=bm.name: ran.append(name) if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True
        )
    result = run_benchmark(
        entries, prompt_lens=[8, 12], gen_len=2, batch_sizes=[1], repeats=3, warmup=2, memory=False, progress=False
    )
    finite_check = ["base", "attn:2"]  # one short forward per model before the sweep
    assert ran == finite_check + ["base", "attn:2"] * (2 + 3) * 2
    assert result["order"] == ["base", "attn:2"] * 3 * 2  # the timed runs only


def test_json_schema(report):
    _, data = report
    assert data["format"] == FORMAT
    assert data["device"].startswith("cpu")
    assert {"torch", "transformers"} <= set(data["versions"]) and data["dtype"] == "float32"
    assert [m["name"] for m in data["models"]] == VARIANTS
    for row in data["results"]:
        assert isinstance(row["model"], str) and isinstance(row["prompt_len"], int)
        assert isinstance(row["batch_size"], int) and isinstance(row["kv_cache_bytes_per_token"], int)
        assert "peak_memory_bytes" in row  # null: memory=False
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            s = row[key]
            assert set(s) >= {"median", "min", "max"} and s["min"] <= s["median"] <= s["max"]
        assert all(len(v) == TINY["repeats"] for v in row["samples"].values())  # every raw sample
        b, p = row["batch_size"], row["prompt_len"]
        assert row["prefill_tokens_per_s"]["max"] == pytest.approx(b * p / min(row["samples"]["prefill_s"]))


def test_cli_writes_json_plot_markdown(tmp_path):
    out = tmp_path / "b.json"
    args = [
        "bench",
        "--random-weights",
        "tiny",
        "base",
        "mlp:1+attn:3-3",
        "--prompt-lens",
        "8,16",
        "--gen-len",
        "2",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--no-memory",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "b.png"),
        "--markdown",
        str(tmp_path / "b.md"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(r["model"], r["prompt_len"]) for r in data["results"]] == [
        ("base", 8),
        ("mlp:1+attn:3-3", 8),
        ("base", 16),
        ("mlp:1+attn:3-3", 16),
    ]
    # mlp:1 takes the last layer (3), attn:3-3 too: layer 3 loses both sublayers, i.e. the whole block
    assert data["models"][1]["num_layers"] == 3 and data["results"][1]["kv_cache_bytes_per_token"] == 768
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "b.md").read_text().count("\n") == 2 + 4


def test_peak_memory_in_child_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = bench(["base"], **{**TINY, "batch_sizes": [1], "repeats": 1, "warmup": 0, "memory": True})
    peak = result["results"][0]["peak_memory_bytes"]
    params = result["models"][0]["parameter_bytes"]
    assert isinstance(peak, int) and peak > 50 * 2**20 + params  # a whole Python + torch process
    assert "child process" in result["settings"]["peak_memory"]


def test_variants():
    plan = parse_variant("attn:8+blocks:2", 32)
    assert plan.blocks == [30, 31] and plan.attn == list(range(22, 30)) and plan.mlp == []
    assert parse_variant("attn:16-31", 32).attn == list(range(16, 32))
    assert parse_variant("attn:0,5+mlp:1", 32).attn == [0, 5] and parse_variant("attn:0,5+mlp:1", 32).mlp == [31]
    assert parse_variant("base", 32).empty
    assert parse_variant("attn:2+mlp:2", 32).blocks == [30, 31]  # both sublayers gone = the block
    for bad in ("heads:2", "attn", "attn:", "attn:x", "attn:40", "attn:30-32", "blocks:32"):
        with pytest.raises(LlmdropError):
            parse_variant(bad, 32)
    # every variant keeps the base's weights in its kept layers (same seed)
    base, dropped = build_random("tiny", "base"), build_random("tiny", "blocks:1+attn:2")
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, dropped.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, dropped.model.layers[0].self_attn.q_proj.weight)
    assert [type(layer.self_attn).__name__ for layer in dropped.model.layers] == ["LlamaAttention"] + [
        "DroppedAttention"
    ] * 2


def test_shape_from_exported_config(tmp_path):
    """A config.json of an export with attention dropped: its drops stay, the variant adds more."""
    model = build_random("tiny", "attn:2-3")
    model.config.to_json_file(tmp_path / "config.json")
    assert shape_config(str(tmp_path)).drop_attn_list == [2, 3]
    again = build_random(str(tmp_path), "blocks:1")  # removes layer 3; its dropped attention goes with it
    assert again.config.num_hidden_layers == 3 and again.config.drop_attn_list == [2]
    assert kv_bytes_per_token_analytic(again) == 2 * 2 * 2 * 16 * 4
    assert run_once(again, make_prompt(256, 1, 4, 0, "cpu"), 2)["kv_bytes_per_token"] == 512


def test_bad_inputs(tmp_path):
    with pytest.raises(LlmdropError, match="max_position_embeddings"):
        bench(["base"], **{**TINY, "prompt_lens": [64]})
    entries = [BenchModel("base", build_random("tiny", "base"))]
    with pytest.raises(LlmdropError, match="max_position_embeddings"):  # checkpoints are checked after loading
        run_benchmark(entries, prompt_lens=[62], gen_len=4, memory=False, progress=False)
    with pytest.raises(LlmdropError, match="builtin shape"):
        bench(["base"], **{**TINY, "random_weights": "no-such-shape"})
    with pytest.raises(LlmdropError, match="bad variant"):
        bench(["base", "attn:x"], **TINY)
    runner = CliRunner()
    for args in (
        ["bench", str(tmp_path)],  # a directory that is no checkpoint
        ["bench", "--random-weights", "tiny", "base", "--prompt-lens", "8,abc"],
        ["bench", "--random-weights", "tiny", "base", "--prompt-lens", "100", "--device", "cpu"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_script_is_the_cli():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_speed.py"),
            "--random-weights",
            "tiny",
            "base",
            "attn:1",
            "--prompt-lens",
            "4",
            "--gen-len",
            "2",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--no-memory",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["format"] == FORMAT and [r["model"] for r in data["results"]] == ["base", "attn:1"]


def test_vllm_engine_without_vllm_is_one_line(monkeypatch):
    import importlib.util

    from llmdrop.serving.benchmark import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(LlmdropError, match="--engine vllm needs vLLM in this environment"):
        bench(["base"], random_weights="tiny", engine="vllm", progress=False)
    with pytest.raises(LlmdropError, match="unknown --engine 'tgi'"):
        bench(["base"], random_weights="tiny", engine="tgi", progress=False)
