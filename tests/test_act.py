"""Attention calibration (ACT): the math, exactness under caching / batching, export, search, CLI errors.

References are computed here by hand (plain loops over a small attention matrix), never with llmdrop code.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import ARCHS, FIRST_WORD_ID, VOCAB_SIZE, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from llmdrop.analysis import act
from llmdrop.cli import app
from llmdrop.compat import cache_kwarg, output_cache
from llmdrop.errors import LlmdropError
from llmdrop.modeling.attention_calibration import (
    NAME,
    act_attention_forward,
    calibrate_rows,
    disable_attention_calibration,
    enable_attention_calibration,
)
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel

HEADS = [[1, 0], [1, 3], [2, 1]]  # tiny models: 4 heads, GQA 2 KV heads
BETA, TAU = 0.4, 0.1


def ids(batch=1, length=14, seed=0):
    return torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibrated_tiny(arch, layers=4, impl="sdpa"):
    model = tiny_model(arch, layers, attn_implementation="eager" if arch == "gemma2" else impl)
    enable_attention_calibration(model, HEADS, BETA, TAU)
    return model


# --------------------------------------------------------------------------- 1. the calibration math


def test_calibrated_rows_sum_to_one_sinks_get_beta_first_untouched():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(5, 8) * 2, dim=-1)
    sinks = torch.zeros(5, 8, dtype=torch.bool)
    sinks[:, [0, 2, 5]] = True  # column 0 is also the first token: must stay as it is
    keep = torch.zeros(5, 8, dtype=torch.bool)
    keep[:, 0] = True
    out = calibrate_rows(attn, sinks, keep, BETA)
    for i in range(5):
        a = attn[i].tolist()
        freed = (1 - BETA) * (a[2] + a[5])
        others = [j for j in range(8) if j not in (0, 2, 5)]
        mass = sum(a[j] for j in others)
        expect = [a[0]] + [0.0] * 7
        for j in (2, 5):
            expect[j] = BETA * a[j]
        for j in others:
            expect[j] = a[j] + freed * a[j] / mass
        assert out[i].tolist() == pytest.approx(expect, abs=1e-6)
    assert out.sum(-1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    assert out[:, 0].tolist() == attn[:, 0].tolist()  # the first sink, bit for bit
    assert out[:, [2, 5]].sum(-1).tolist() == pytest.approx((BETA * attn[:, [2, 5]].sum(-1)).tolist(), abs=1e-7)


def test_row_without_other_keys_is_left_alone():
    attn = torch.tensor([[0.7, 0.3, 0.0]])  # key 2 masked: only the first token and a sink remain
    out = calibrate_rows(attn, torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]]), BETA)
    assert out.tolist() == attn.tolist()


def manual_act(q, k, v, beta, tau, pad=0):
    """Loop reference of the causal rule for one head: s_j(i) = mean_{j<=q<=i} A_qj; the first real key
    (index ``pad``) untouched; sinks x beta, freed mass to the other keys in proportion."""
    n = q.shape[0]
    scores = (q @ k.T) * q.shape[-1] ** -0.5
    attn = torch.zeros(n, n)
    for i in range(pad, n):
        attn[i, pad : i + 1] = torch.softmax(scores[i, pad : i + 1], -1)
    out = attn.clone()
    for i in range(pad, n):
        s = [attn[j : i + 1, j].mean().item() for j in range(n)]
        sinks = [j for j in range(pad + 1, i + 1) if s[j] > tau]
        others = [j for j in range(pad + 1, i + 1) if j not in sinks]
        freed = (1 - beta) * sum(attn[i, j].item() for j in sinks)
        mass = sum(attn[i, j].item() for j in others)
        if not sinks or mass == 0:
            continue
        for j in sinks:
            out[i, j] = beta * attn[i, j]
        for j in others:
            out[i, j] = attn[i, j] * (1 + freed / mass)
    return out, out @ v


def fake_module(heads):
    return SimpleNamespace(act_heads=heads, act_beta=BETA, act_threshold=TAU, training=False)


@pytest.mark.parametrize("pad", [0, 3])
def test_attention_function_matches_loop_reference(pad):
    torch.manual_seed(1)
    n, d = 9, 8
    q, k, v = (torch.randn(1, 2, n, d) * 1.5 for _ in range(3))
    mask = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    mask[..., :pad] = False  # left padding: keys 0..pad-1 are pads
    out, attn = act_attention_forward(fake_module([1]), q, k, v, mask)
    ref_attn, ref_out = manual_act(q[0, 1], k[0, 1], v[0, 1], BETA, TAU, pad)
    assert torch.allclose(attn[0, 1, pad:], ref_attn[pad:], atol=1e-6)
    assert torch.allclose(out[0, pad:, 1], ref_out[pad:], atol=1e-6)

    def plain(h):
        return torch.softmax(((q[0, h] @ k[0, h].T) * d**-0.5).masked_fill(~mask[0, 0], float("-inf")), -1)[pad:]

    assert (ref_attn[pad:] - plain(1)).abs().max() > 1e-2  # the reference really calibrates something here
    assert torch.allclose(attn[0, 0, pad:], plain(0), atol=1e-6)  # head 0 is not calibrated
    assert torch.allclose(attn[0, 1, pad:].sum(-1), torch.ones(n - pad), atol=1e-6)


# --------------------------------------------------------------------------- 2. exactness in real models


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward(arch):
    model = calibrated_tiny(arch)
    x = ids(length=14)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :6], use_cache=True)  # prefill longer than the sliding window (4)
        steps, cache = [out.logits], output_cache(out)
        for t in range(6, 14):
            out = model(x[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True)
            steps.append(out.logits)
            cache = output_cache(out)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    with torch.no_grad():
        uncalibrated = tiny_model(arch, 4, attn_implementation="eager")(x).logits
    assert (full - uncalibrated).abs().max() > 1e-3 or arch == "mistral"  # mistral: window 4, no key to give mass to


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_greedy_generate_with_cache_equals_full_recompute(arch):
    model = calibrated_tiny(arch)
    x = ids(length=7, seed=3)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=3)
        seq = x
        for _ in range(8):  # no cache: every step a full forward over the whole sequence
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert gen.tolist() == seq.tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "phi3"])
def test_left_padded_batch_equals_single(arch):
    model = calibrated_tiny(arch)
    a, b = ids(length=12, seed=4), ids(length=7, seed=5)
    batch = torch.full((2, 12), 3)
    batch[0], batch[1, 5:] = a[0], b[0]
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0], mask[1, 5:] = 1, 1
    with torch.no_grad():
        both = model(batch, attention_mask=mask).logits
        single_a, single_b = model(a).logits, model(b).logits
    assert torch.allclose(both[0], single_a[0], atol=1e-5)
    assert torch.allclose(both[1, 5:], single_b[0], atol=1e-5)


def test_only_calibrated_layers_leave_sdpa_and_disable_restores():
    model = tiny_model("llama", 4, attn_implementation="sdpa")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    enable_attention_calibration(model, HEADS, BETA, TAU)
    impls = [layer.self_attn.config._attn_implementation for layer in model.model.layers]
    assert impls == ["sdpa", NAME, NAME, "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[1].self_attn.act_heads == [0, 3]
    disable_attention_calibration(model)
    assert [layer.self_attn.config._attn_implementation for layer in model.model.layers] == ["sdpa"] * 4
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_bad_heads_are_one_line_errors():
    model = tiny_model("llama", 4)
    loaded = LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "tiny", "tiny")
    with pytest.raises(LlmdropError, match=r"head \[1, 4\]: head 4 is out of range \(heads 0-3\)"):
        act.enable(loaded, [[1, 4]])
    with pytest.raises(LlmdropError, match=r"layer 9 is out of range \(layers 0-3\)"):
        act.enable(loaded, [[9, 0]])


# --------------------------------------------------------------------------- 3. export


def tiny_loaded(arch="llama", layers=4):
    model = tiny_model(arch, layers, attn_implementation="sdpa" if arch != "gemma2" else "eager")
    return LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "tiny", "tiny")


def write_heads(path, heads=HEADS, beta=BETA, threshold=TAU):
    path.write_text(json.dumps({"format": act.FORMAT, "beta": beta, "threshold": threshold, "heads": heads}))
    return path


@pytest.mark.parametrize("arch,attn_layers", [("llama", None), ("gemma2", "0")])
def test_export_equals_in_memory(tmp_path, arch, attn_layers):
    heads = write_heads(tmp_path / "heads.json")
    x = ids(batch=2, length=10, seed=6)
    ref = tiny_loaded(arch)
    if attn_layers:
        from llmdrop.planning.surgery import drop_sublayers

        drop_sublayers(ref.model, ref.adapter, attn=[0])
    act.enable(ref, HEADS, BETA, TAU)
    with torch.no_grad():
        expect = ref.model(x).logits
    out = act.act_apply(tiny_loaded(arch), heads=str(heads), out=tmp_path / "out", attn_layers=attn_layers)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_calibration"] == {"heads": HEADS, "beta": BETA, "threshold": TAU}
    assert config["model_type"] == f"llmdrop_{arch}"
    assert (out / "attention_calibration.py").is_file()
    card = (out / "README.md").read_text()
    heads_text = ", ".join(f"{l}.{h}" for l, h in HEADS)
    assert f"in heads (layer.head) {heads_text}," in card and f"scaled by {BETA}" in card
    assert ("with layers dropped" in card) == bool(attn_layers)  # a calibration-only export drops nothing
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    impls = [
        layer.self_attn.config._attn_implementation
        for layer in model.model.layers
        if hasattr(layer.self_attn, "config")
    ]
    assert impls.count(NAME) == 2
    with torch.no_grad():
        got = model(x).logits
    assert torch.allclose(got, expect, atol=1e-5)
    with pytest.raises(ValueError):  # no silent uncalibrated model
        AutoConfig.from_pretrained(out)


def test_calibrated_export_loads_calibrated_after_a_plain_export_of_the_same_folder_name(tmp_path):
    """transformers caches remote code by folder name and file hash, and maps a remote config class to the first
    model class loaded with it: a plain export loaded first from another folder called `out` must not stand in for
    the calibrated one (it did: logits off by 0.1, uncalibrated)."""
    from llmdrop.formats.export import export
    from llmdrop.planning.plan import DropPlan
    from llmdrop.source.models import load_model

    export(tiny_loaded(), DropPlan(4, attn=[0]), tmp_path / "plain/out")
    export(tiny_loaded(), DropPlan(4, attn=[0]), tmp_path / "src")
    out = act.act_apply(str(tmp_path / "src"), heads=str(write_heads(tmp_path / "h.json")), out=tmp_path / "act/out")
    ref = load_model(str(tmp_path / "src"), device="cpu")
    act.enable(ref, HEADS, BETA, TAU)
    x = ids(batch=2, length=10, seed=6)
    AutoModelForCausalLM.from_pretrained(tmp_path / "plain/out", trust_remote_code=True)
    with torch.no_grad():
        expect = ref.model(x).logits
        got = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(x).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_apply_on_a_drop_export_keeps_its_drops(tmp_path):
    from llmdrop.formats.export import export
    from llmdrop.planning.plan import DropPlan
    from llmdrop.source.models import load_model

    export(tiny_loaded(), DropPlan(4, attn=[0], mlp=[3]), tmp_path / "drop")
    heads = write_heads(tmp_path / "heads.json")
    out = act.act_apply(str(tmp_path / "drop"), heads=str(heads), out=tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["drop_attn_list"], config["drop_mlp_list"]) == ([0], [3])
    ref = load_model(str(tmp_path / "drop"), device="cpu")
    act.enable(ref, HEADS, BETA, TAU)
    x = ids(batch=2, length=10, seed=7)
    with torch.no_grad():
        expect = ref.model(x).logits
        got = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(x).logits
    assert torch.allclose(got, expect, atol=1e-5)
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["attention_calibration"]["heads"] == HEADS
    # llmdrop loads the export calibrated; a temporary other calibration gives its own heads back on exit
    exported = load_model(str(out), device="cpu")
    with torch.no_grad():
        assert torch.allclose(exported.model(x).logits, expect, atol=1e-5)
        with act.calibrated(exported, [[2, 2]]):
            other = exported.model(x).logits
        assert (other - expect).abs().max() > 1e-4
        assert torch.allclose(exported.model(x).logits, expect, atol=1e-5)


def test_apply_refuses_calibrating_a_dropped_attention(tmp_path):
    heads = write_heads(tmp_path / "heads.json")
    with pytest.raises(LlmdropError, match="layer 1 has a calibrated head but its attention is dropped"):
        act.act_apply(tiny_loaded(), heads=str(heads), out=tmp_path / "out", attn_layers="1")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 4. task, scorer, search


def write_task(path, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(0, 128, (16,), generator=g)]
        # half the items have multi-token choices (two words each)
        choices = [f" w{i}", f" w{i + 1}", f" w{i + 2}"] if i % 2 else [f" w{i} w{i + 3}", f" w{i + 1} w{i + 4}"]
        lines.append(json.dumps({"prompt": " ".join(words), "choices": choices, "label": i % len(choices)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_is_seeded_and_disjoint(tmp_path):
    items = act.load_mc_task(write_task(tmp_path / "t.jsonl", n=20))
    cal, held = act.split_task(items, 0.4, seed=1)
    assert (len(cal), len(held)) == (8, 12)
    assert not set(cal) & set(held) and set(cal) | set(held) == set(items)
    assert act.split_task(items, 0.4, seed=1) == (cal, held)
    assert act.split_task(items, 0.4, seed=2) != (cal, held)


def test_scorer_matches_full_forward_logprobs(tmp_path):
    items = act.load_mc_task(write_task(tmp_path / "t.jsonl", n=6))
    loaded = tiny_loaded()
    tok = loaded.tokenizer
    scores = act.MultipleChoiceScorer(tok, items, batch_size=3).choice_logprobs(loaded.model)
    for item, got in zip(items, scores):
        for choice, value in zip(item.choices, got):
            p, c = tok(item.prompt).input_ids, tok(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = loaded.model(torch.tensor([p + c])).logits[0].log_softmax(-1)
            expect = sum(logp[len(p) - 1 + t, c[t]].item() for t in range(len(c)))
            assert value == pytest.approx(expect, abs=1e-4)


def test_replay_gives_the_same_scores(tmp_path):
    items = act.load_mc_task(write_task(tmp_path / "t.jsonl", n=8))
    loaded = tiny_loaded(layers=4)
    scorer = act.MultipleChoiceScorer(loaded.tokenizer, items, batch_size=3)
    scorer.choice_logprobs(loaded.model, record=True)
    with act.calibrated(loaded, [[2, 0], [2, 1], [2, 3]]):
        direct = scorer.choice_logprobs(loaded.model)
        replayed = scorer.choice_logprobs(loaded.model, replay_from=2)
    flat = [x for row in direct for x in row]
    assert [x for row in replayed for x in row] == pytest.approx(flat, abs=1e-5)
    assert flat != pytest.approx([x for row in scorer.choice_logprobs(loaded.model) for x in row], abs=1e-4)


def test_search_writes_heads_and_resumes(tmp_path, monkeypatch):
    task = write_task(tmp_path / "t.jsonl", n=16)
    out = tmp_path / "heads.json"
    loaded = tiny_loaded(layers=3)
    first = act.act_search(loaded, task=task, out=out, layers="1-2", progress=False)
    data = json.loads(out.read_text())
    assert data["format"] == act.FORMAT and data["beta"] == BETA and data["threshold"] == TAU
    assert sorted(data["per_head"]) == [f"{l},{h}" for l in (1, 2) for h in range(4)]
    gains = {k: v["gain"] for k, v in data["per_head"].items()}
    assert data["heads"] == [
        list(map(int, k.split(","))) for k, g in sorted(gains.items(), key=lambda kv: -kv[1]) if g > 0
    ]
    # resume: drop two measured heads; only those two are evaluated again
    del data["per_head"]["2,3"], data["per_head"]["1,0"]
    out.write_text(json.dumps(data))
    calls = []
    real = act.calibrated

    def counting(loaded_, heads, *a):
        calls.append([list(h) for h in heads])
        return real(loaded_, heads, *a)

    monkeypatch.setattr(act, "calibrated", counting)
    second = act.act_search(loaded, task=task, out=out, layers="1-2", progress=False)
    assert calls[:2] == [[[1, 0]], [[2, 3]]]
    assert second["per_head"] == first["per_head"]
    with pytest.raises(LlmdropError, match="other settings \\(beta\\)"):
        act.act_search(loaded, task=task, out=out, beta=0.5, layers="1-2", progress=False)


def test_eval_reports_baseline_and_calibrated(tmp_path):
    task = write_task(tmp_path / "t.jsonl", n=16)
    loaded = tiny_loaded()
    heads = write_heads(tmp_path / "heads.json")
    r = act.act_eval(loaded, task=task, heads=str(heads))
    held = act.split_task(act.load_mc_task(task), 0.5, 0)[1]
    scorer = act.MultipleChoiceScorer(loaded.tokenizer, held)
    assert r["items"] == len(held) == 8
    assert r["baseline"] == scorer.accuracy(loaded.model)[0]
    with act.calibrated(loaded, HEADS):
        assert r["calibrated"] == scorer.accuracy(loaded.model)[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["act", "eval", "x", "--task", "/nonexistent/task.jsonl"],
            "error: task file not found: /nonexistent/task.jsonl",
        ),
        (
            ["act", "apply", "x", "--heads", "/nonexistent/h.json", "-o", "o"],
            "error: heads file not found: /nonexistent/h.json",
        ),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [message]


def test_bad_task_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "choices": ["x", "y"], "label": 2}\n')
    with pytest.raises(LlmdropError, match=r"bad.jsonl:1: label must be an index into choices \(0-1\)"):
        act.load_mc_task(bad)
    (tmp_path / "h.json").write_text('{"format": "other"}')
    with pytest.raises(LlmdropError, match="not an llmdrop heads file"):
        act.load_heads(tmp_path / "h.json")
