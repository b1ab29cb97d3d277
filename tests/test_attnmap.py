"""llmdrop attnmap: attention rows and logit lens checked against transformers' own outputs on tiny models."""

import base64
import json
import re
import zlib

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import llmdrop.analysis.attnmaps as am
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.modeling.configuration_llmdrop import kept_attention_layers
from llmdrop.planning.surgery import drop_sublayers
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel, LoadSpec

PROMPT = "w5 w17 w3 w99 w42 w8 w61 w7 w23 w11 w90 w64"  # 12 tokens, no special tokens added


def loaded(model, tok=None):
    return LoadedModel(model, tok or tiny_tokenizer(), adapter_for(model.config), "tiny", "tiny")


def run_capture(model, steps=4, prompt=PROMPT):
    tok = tiny_tokenizer()
    ids = am.encode_prompt(tok, prompt)
    model.generation_config.eos_token_id = None  # random weights: never stop early, the tests count steps
    model.config.eos_token_id = None
    tok.eos_token = None
    return am.capture(model, adapter_for(model.config), tok, ids, max_new_tokens=steps, progress=False)


def hand_lens(model, ids):
    """Logit lens from output_hidden_states: argmax of lm_head(norm(h_l)) per layer, then the real prediction.

    transformers' last hidden state already went through the final norm, so it only needs the LM head."""
    out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    hs, L = out.hidden_states, model.config.num_hidden_layers
    cap = getattr(model.config, "final_logit_softcapping", None)
    soft = (lambda x: torch.tanh(x / cap) * cap) if cap else (lambda x: x)
    logits = [soft(model.lm_head(model.model.norm(hs[l + 1][0]))) for l in range(L - 1)]
    logits += [soft(model.lm_head(hs[L][0])), out.logits[0]]
    return torch.stack(logits, dim=1), out  # [positions, L + 1, vocab]


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_and_attention_match_a_full_forward(arch):
    model = tiny_model(arch, num_layers=4)
    cap = run_capture(model, steps=4)
    assert cap.steps == 4 and cap.n_prompt == 12 and len(cap.token_ids) == 16
    seq = cap.token_ids[:-1]  # every position that was fed to the model (the last token never is)
    with torch.no_grad():
        logits, out = hand_lens(model, seq)
    probs = torch.softmax(logits.float(), dim=-1)
    # the lens at past positions, computed once with the KV cache, equals a fresh full forward (causality)
    np.testing.assert_array_equal(cap.lens_ids[:, :, 0], logits.argmax(-1).numpy())
    np.testing.assert_allclose(cap.lens_probs[:, :, 0], probs.max(-1).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(cap.lens_probs[:, :, :5].sum(-1) <= 1 + 1e-6, True)
    assert np.all(np.diff(cap.lens_probs, axis=-1) <= 1e-7)  # top-k sorted by probability
    # greedy: generated token i is the real prediction at the query of step i
    for i in range(cap.steps):
        q = cap.n_prompt + i - 1
        assert cap.token_ids[q + 1] == cap.lens_ids[q, -1, 0]
    # attention: the query's row of every head equals transformers' own eager attention at that position
    for i, step in enumerate(cap.attn):
        T = cap.n_prompt + i
        assert step.shape == (4, 4, T)
        np.testing.assert_allclose(step.sum(-1), 1.0, atol=1e-5)  # every head's row sums to 1
        for l in range(4):
            np.testing.assert_allclose(step[l], out.attentions[l][0, :, T - 1, :T].numpy(), atol=1e-5)
    types = getattr(model.config, "layer_types", None) or []
    sliding = [l for l, t in enumerate(types) if t == "sliding_attention"]
    assert sliding or arch not in ("gemma2", "gemma3_text", "qwen2")
    if sliding:  # sliding layers (window 4) give keys further back exactly zero weight
        for i, step in enumerate(cap.attn):
            T = cap.n_prompt + i
            assert np.all(step[sliding, :, : T - 4] == 0) and np.all(step[sliding, :, T - 4 :] > 0)


def test_head_reductions():
    cap = run_capture(tiny_model("qwen2", num_layers=3), steps=2)
    a = cap.attn[1]  # [L, H, T]
    mx, mean, h2 = (am.reduce_heads(a, h) for h in ("max", "mean", 2))
    np.testing.assert_allclose(mean.sum(-1), 1.0, atol=1e-5)  # a mean of distributions is one
    np.testing.assert_array_equal(mx, np.max(a, axis=1))
    assert np.all(mx >= a[:, 0]) and np.all(mx <= 1) and np.all(mx.sum(-1) >= 1 - 1e-6)
    np.testing.assert_array_equal(h2, a[:, 2])
    assert am.parse_heads("MAX", 4) == "max" and am.parse_heads("3", 4) == 3
    with pytest.raises(LlmdropError, match=r"--heads 4 is out of range: the model has 4 attention heads \(0-3\)"):
        am.parse_heads(4, 4)
    with pytest.raises(LlmdropError, match="max, mean or a head index"):
        am.parse_heads("top", 4)


def test_windows_like_the_reference():
    # the reference's README: 42 tokens -> 0-32, 5-37, 10-42
    assert am.windows(42, 32, 5) == [(0, 32), (5, 37), (10, 42)]
    assert am.windows(43, 32, 5) == [(0, 32), (5, 37), (10, 42), (11, 43)]  # the last one ends at the query
    assert am.windows(32, 32, 5) == [(0, 32)] and am.windows(7, 32, 5) == [(0, 7)]
    with pytest.raises(LlmdropError):
        am.windows(10, 0, 5)


def test_png_file_names_and_atomic_output(tmp_path):
    model = tiny_model("llama", num_layers=2)
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    tok = tiny_tokenizer()
    tok.eos_token = None
    out = tmp_path / "maps"
    # 12 prompt tokens, window 8, stride 2: T = 12, 13, 14 -> 3, 4, 4 windows
    r = am.attnmap(
        loaded(model, tok),
        prompt=PROMPT,
        out=str(out),
        max_new_tokens=3,
        formats="png",
        window=8,
        stride=2,
        progress=False,
    )
    expected = {f"attn_{i}_{j}.png" for i, n in enumerate((3, 4, 4)) for j in range(n)}
    assert set(r["files"]) == expected and {p.name for p in out.iterdir()} == expected
    assert set(am.png_names(r["capture"], 8, 2)) == expected
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in expected)
    assert [p.name for p in tmp_path.iterdir()] == ["maps"]  # the temporary sibling is gone
    with pytest.raises(LlmdropError, match="already exists"):
        am.attnmap(loaded(model, tok), prompt=PROMPT, out=str(out))
    r = am.attnmap(
        loaded(model, tok),
        prompt=PROMPT,
        out=str(out),
        max_new_tokens=3,
        formats="png",
        window=8,
        stride=2,
        all_windows=False,
        overwrite=True,
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == ["attn_0_2.png", "attn_1_3.png", "attn_2_3.png"]
    with pytest.raises(LlmdropError, match="--format"):
        am.attnmap(loaded(model, tok), prompt=PROMPT, out=str(tmp_path / "x"), formats="svg")


def test_dropped_attention_layers():
    """An llmdrop model without attention in layers 1 and 3: those rows are NaN / 'dropped', the rest intact."""
    model = tiny_model("llama", num_layers=5)
    drop_sublayers(model, adapter_for(model.config), attn=[1, 3])
    cap = run_capture(model, steps=3)
    assert cap.dropped == [1, 3]
    with torch.no_grad():
        logits, out = hand_lens(model, cap.token_ids[:-1])
    np.testing.assert_array_equal(cap.lens_ids[:, :, 0], logits.argmax(-1).numpy())
    kept = kept_attention_layers(model.config)
    assert kept == [0, 2, 4] and [a is None for a in out.attentions] == [False, True, False, True, False]
    for i, step in enumerate(cap.attn):
        T = cap.n_prompt + i
        assert np.isnan(step[[1, 3]]).all()
        np.testing.assert_allclose(step[kept].sum(-1), 1.0, atol=1e-5)
        for l in kept:  # output_attentions has one entry per layer, None where the attention is dropped
            np.testing.assert_allclose(step[l], out.attentions[l][0, :, T - 1, :T].numpy(), atol=1e-5)
    assert np.isnan(am.reduce_heads(cap.attn[0], "max")[1]).all()
    # the viewer stores rows of kept layers only: 3 layers x 4 heads x T bytes per step
    payload = am.viewer_payload(
        cap,
        am.token_texts(tiny_tokenizer(), range(132)),
        model="m",
        prompt="p",
        chat=False,
        window=8,
        stride=5,
        heads="max",
    )
    rows = np.frombuffer(zlib.decompress(base64.b64decode(payload["attn"])), np.uint8)
    assert rows.size == sum(3 * 4 * (12 + i) for i in range(3)) and payload["dropped"] == [1, 3]


def test_viewer_payload_round_trip_and_escaping(tmp_path):
    model = tiny_model("mistral", num_layers=3)
    cap = run_capture(model, steps=3)
    texts = am.token_texts(tiny_tokenizer(), cap.token_ids + cap.lens_ids.ravel().tolist())
    prompt = 'w1 </script><script>alert(1)</script> "quoted"'
    html = am.render_html(
        am.viewer_payload(cap, texts, model="tiny", prompt=prompt, chat=False, window=8, stride=5, heads=2)
    )
    data = re.search(r'<script type="application/json" id="attnmap-data">(.*?)</script>', html, re.S).group(1)
    d = json.loads(data)
    assert d["prompt"] == prompt and d["heads"] == "2" and d["steps"] == 3 and d["num_heads"] == 4
    rows = np.frombuffer(zlib.decompress(base64.b64decode(d["attn"])), np.uint8).astype(np.float32) / 255
    offset = 0
    for i, a in enumerate(cap.attn):  # step, layer, head, key
        n = a.size
        np.testing.assert_allclose(rows[offset : offset + n].reshape(a.shape), a, atol=0.5 / 255 + 1e-7)
        offset += n
    assert offset == rows.size
    ids = np.frombuffer(base64.b64decode(d["lens_ids"]), "<i4").reshape(cap.lens_ids.shape)
    probs = np.frombuffer(base64.b64decode(d["lens_probs"]), "<u2").reshape(cap.lens_ids.shape) / 65535
    np.testing.assert_array_equal(ids, cap.lens_ids)
    np.testing.assert_allclose(probs, cap.lens_probs, atol=1e-5)
    assert all(str(int(i)) in d["vocab"] for i in ids.ravel())
    # self-contained: no URL to load anything from
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html


def test_chat_template():
    tok = tiny_tokenizer()
    with pytest.raises(LlmdropError, match="no chat template"):
        am.encode_prompt(tok, "w5 w6", chat=True)
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} <s>{% endif %}"
    )
    assert am.encode_prompt(tok, "w5 w6", chat=True) == [1, 9, 10, 2, 1]
    assert am.encode_prompt(tok, "w5 w6") == [9, 10]
    model = tiny_model("llama", num_layers=2)
    cap = am.capture(
        model,
        adapter_for(model.config),
        tok,
        am.encode_prompt(tok, "w5 w6", chat=True),
        max_new_tokens=1,
        progress=False,
    )
    assert cap.token_ids[:5] == [1, 9, 10, 2, 1] and cap.n_prompt == 5 and cap.attn[0].shape[-1] == 5


def test_cli_heads_out_of_range_and_json(tmp_path):
    model, tok = tiny_model("phi3", num_layers=2), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "attnmap",
            str(tmp_path / "m"),
            "--prompt",
            "w1 w2 w3",
            "-o",
            str(tmp_path / "o"),
            "--heads",
            "4",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]  # (progress bars aside)
    assert errors == ["error: --heads 4 is out of range: the model has 4 attention heads (0-3)"]
    assert not (tmp_path / "o").exists()
    res = runner.invoke(
        app,
        [
            "attnmap",
            str(tmp_path / "m"),
            "--prompt",
            "w1 w2 w3",
            "-o",
            str(tmp_path / "o"),
            "--heads",
            "1",
            "--format",
            "html",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["files"] == ["attnmap.html"] and result["heads"] == "1" and result["prompt_tokens"] == 3
    assert 1 <= result["steps"] <= 2 and (tmp_path / "o" / "attnmap.html").is_file()


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(tmp_path):
    """The builtin GGUF SmolLM2-135M (30 layers, 9 heads, GQA 3 KV heads), loaded with SDPA: the capture switches
    to eager and back, and agrees with transformers' own hidden states."""
    from llmdrop.source.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    lm.model.set_attn_implementation("sdpa")
    r = am.attnmap(
        lm, prompt="The capital of France is", out=str(tmp_path / "o"), formats="html", max_new_tokens=2, progress=False
    )
    assert lm.model.config._attn_implementation == "sdpa"  # restored after the capture run
    cap = r["capture"]
    assert (cap.num_layers, cap.num_heads, cap.steps) == (30, 9, 2)
    for step in cap.attn:
        np.testing.assert_allclose(step.sum(-1), 1.0, atol=1e-4)
    lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        logits, _ = hand_lens(lm.model, cap.token_ids[:-1])
    np.testing.assert_array_equal(cap.lens_ids[:, :, 0], logits.argmax(-1).numpy())
    assert r["generated_text"].strip().startswith("Paris")
    assert (tmp_path / "o" / "attnmap.html").stat().st_size > 10_000


def test_exported_checkpoint_with_dropped_attention(tmp_path):
    """A real export on disk (remote code, KV cache of kept layers only), loaded by path like any user would."""
    from llmdrop.formats.export import export
    from llmdrop.planning.plan import DropPlan

    model = tiny_model("qwen3", num_layers=4)
    export(loaded(model), DropPlan(4, attn=[0, 2]), tmp_path / "exp")  # layer 0 too: the first cache layer moves
    r = am.attnmap(
        LoadSpec(str(tmp_path / "exp"), device="cpu"),
        prompt=PROMPT,
        out=str(tmp_path / "o"),
        max_new_tokens=2,
        progress=False,
    )
    cap = r["capture"]
    assert r["dropped_attn"] == [0, 2] and cap.info["model_type"] == "llmdrop_qwen3"
    for step in cap.attn:
        assert np.isnan(step[[0, 2]]).all()
        np.testing.assert_allclose(step[[1, 3]].sum(-1), 1.0, atol=1e-5)
    assert sorted(r["files"]) == ["attn_0_0.png", "attn_1_0.png", "attnmap.html"]
