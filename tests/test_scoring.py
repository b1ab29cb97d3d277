"""The one-pass hook scores equal a naive computation from stored hidden states."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from llmdrop.errors import LlmdropError
from llmdrop.passes.scoring import FORMAT, Scores, compute_importance
from llmdrop.planning.surgery import drop_sublayers
from llmdrop.source.arch import adapter_for

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def build(arch):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    return Gemma2ForCausalLM(Gemma2Config(**SIZES, sliding_window=4)).eval()


def hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


def naive(before, after, metric):
    cos = F.cosine_similarity(before.double(), after.double(), dim=-1).clamp(-1, 1)
    return 1 - cos.mean().item() if metric == "cosine" else (torch.arccos(cos) / math.pi).mean().item()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: sandwich norms
@pytest.mark.parametrize("metric", ["cosine", "angular"])
def test_hook_scores_match_stored_hidden_states(arch, metric):
    model = build(arch)
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    imp = compute_importance(model, adapter, ids, metric=metric, batch_size=2, progress=False)
    hs = hidden_states(model, ids)  # hs[i] = input of layer i (the last one has the final norm applied)
    for i in range(3):
        assert imp["block"][i] == pytest.approx(naive(hs[i], hs[i + 1], metric), abs=2e-6)
    # The residual stream after layer i's attention add is layer i's output once its MLP is gone.
    for i in range(3):
        reference = build(arch)
        drop_sublayers(reference, adapter, mlp=[i])
        after_attn = hidden_states(reference, ids)[i + 1]
        assert imp["attn"][i] == pytest.approx(naive(hs[i], after_attn, metric), abs=2e-6)
        assert imp["mlp"][i] == pytest.approx(naive(after_attn, hs[i + 1], metric), abs=2e-6)


def test_dropped_sublayer_is_absent_not_zero_and_batching_does_not_matter():
    model = build("llama")
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    one = compute_importance(model, adapter, ids, batch_size=1, progress=False)
    four = compute_importance(model, adapter, ids, batch_size=4, progress=False)
    for kind in one:
        assert one[kind] == pytest.approx(four[kind], abs=1e-6)
    drop_sublayers(model, adapter, attn=[2])
    after = compute_importance(model, adapter, ids, progress=False)
    # a part the model no longer has is not scored (it would score 0 and be picked first by every selector)
    assert after["attn"][2] is None and None not in after["mlp"] + after["block"]
    assert after["attn"][:2] == pytest.approx(one["attn"][:2], abs=1e-6)  # layers before are untouched


def test_unknown_metric():
    model = build("llama")
    with pytest.raises(LlmdropError, match="unknown metric 'dot'"):
        compute_importance(model, adapter_for(model.config), torch.zeros(1, 4, dtype=torch.long), metric="dot")


def test_scores_file_round_trip_and_keys(tmp_path):
    s = Scores(
        "m",
        2,
        "cosine",
        {"source": "self", "samples": 1, "seq_len": 4, "seed": 0, "tokens": 4},
        {"attn": [0.1, 0.2], "mlp": [0.3, 0.4], "block": [0.5, 0.6]},
    )
    s.save(tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["format"] == FORMAT and set(d) >= {"model", "num_layers", "metric", "calibration", "importance"}
    assert set(d["calibration"]) == {"source", "samples", "seq_len", "seed", "tokens"}
    assert Scores.load(tmp_path / "s.json").importance == s.importance
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(LlmdropError, match="is not a llmdrop scores file"):
        Scores.load(tmp_path / "bad.json")


def test_a_layout_the_adapter_cannot_measure_is_refused(tiny_llama):
    """Parallel attention + MLP has no residual state between the two sublayers: refuse rather than score 0."""
    adapter = adapter_for(tiny_llama.config)
    ids = torch.randint(3, 30, (1, 8))
    tiny_llama.config.use_parallel_residual = True
    with pytest.raises(
        LlmdropError,
        match=r"^llama with use_parallel_residual=True runs attention and MLP in "
        r"parallel; llmdrop measures each sublayer between two residual adds",
    ):
        compute_importance(tiny_llama, adapter, ids, progress=False)
    tiny_llama.config.use_parallel_residual = False
    del tiny_llama.model.layers[0].post_attention_layernorm
    with pytest.raises(
        LlmdropError,
        match=r"^llama layers have no `post_attention_layernorm` module: not the "
        r"sequential pre-norm layout",
    ):
        compute_importance(tiny_llama, adapter, ids, progress=False)


def test_logits_from_hidden_states_match_the_model(tiny_llama):
    ids = torch.randint(3, 30, (2, 8))
    adapter = adapter_for(tiny_llama.config)
    with torch.no_grad():
        tiny_llama.model.norm.weight.uniform_(0.2, 3.0)  # so that norming twice is not a no-op
        out = tiny_llama(ids, output_hidden_states=True)
        normed = out.hidden_states[-1]  # transformers gives the last state after the final norm
        torch.testing.assert_close(adapter.logits(tiny_llama, normed, final_norm=False), out.logits, atol=1e-6, rtol=0)
        assert not torch.allclose(adapter.logits(tiny_llama, normed), out.logits, atol=1e-3)  # normed twice: differs
