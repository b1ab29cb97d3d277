"""The CLI end to end on a tiny random Llama saved to disk: score -> drop -> eval, and bad inputs."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import WORDS, identity_hooks, tiny_model, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.passes.evaluation import perplexity
from llmdrop.passes.scoring import compute_importance
from llmdrop.planning.surgery import drop_sublayers
from llmdrop.source.arch import adapter_for
from llmdrop.source.calibration import load_texts, tokens_from_texts

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny_model("llama", num_layers=6).save_pretrained(d / "tiny")
    tiny_tokenizer().save_pretrained(d / "tiny")
    rng = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=rng)]
    (d / "text.txt").write_text(" ".join(words))
    assert invoke("score", d / "tiny", *calib(d), "--out", d / "s.json").exit_code == 0
    return d


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def calib(d):
    return ["--calib", d / "text.txt", "--samples", 8, "--seq-len", 32]


def test_score_json_is_deterministic(workdir):
    first = invoke("score", workdir / "tiny", *calib(workdir), "--out", workdir / "s1.json", "--json")
    assert first.exit_code == 0, first.output
    invoke("score", workdir / "tiny", *calib(workdir), "--out", workdir / "s2.json")
    assert (workdir / "s1.json").read_text() == (workdir / "s2.json").read_text()
    d = json.loads(first.stdout)
    assert d["format"] == "llmdrop.scores/1" and d["num_layers"] == 6
    assert d["calibration"] == {
        "source": str(workdir / "text.txt"),
        "samples": 8,
        "seq_len": 32,
        "seed": 0,
        "tokens": 256,
    }
    assert all(len(d["importance"][k]) == 6 for k in ("attn", "mlp", "block"))


def test_drop_with_scores_then_eval_matches_identity_reference(workdir):
    imp = json.loads((workdir / "s.json").read_text())["importance"]["attn"]
    expected = sorted(sorted(range(6), key=lambda i: imp[i])[:2])
    out = workdir / "drop2"
    r = invoke("drop", workdir / "tiny", "-o", out, "--attn", 2, "--scores", workdir / "s.json", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["attn"] == expected
    assert json.loads((out / "config.json").read_text())["drop_attn_list"] == expected
    r = invoke("eval", out, "--text", workdir / "text.txt", "--seq-len", 64, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tokens"] == result["samples"] * 63
    blocks = tokens_from_texts(load_texts(workdir / "text.txt"), tiny_tokenizer(), samples=None, seq_len=64)
    with identity_hooks(tiny_model("llama", num_layers=6), attn=expected) as reference:
        assert result["perplexity"] == pytest.approx(
            perplexity(reference, blocks, progress=False)["perplexity"], rel=1e-5
        )


def test_mixed_plan_renumbers_sublayers(workdir):
    out = workdir / "mixed"
    r = invoke("drop", workdir / "tiny", "-o", out, "--block-layers", "1", "--attn-layers", "0,3", "--mlp-layers", "5")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert (config["drop_attn_list"], config["drop_mlp_list"]) == ([0, 2], [4])
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["plan"]["attn"] == [0, 3] and record["layer_map"] == {"0": 0, "2": 1, "3": 2, "4": 3, "5": 4}


def test_iterative_rescores_after_each_drop(workdir):
    out = workdir / "iter"
    r = invoke("drop", workdir / "tiny", "-o", out, "--attn", 2, "--iterative", *calib(workdir), "--json")
    assert r.exit_code == 0, r.output
    model = tiny_model("llama", num_layers=6)
    adapter = adapter_for(model.config)
    blocks = tokens_from_texts(load_texts(workdir / "text.txt"), tiny_tokenizer(), samples=8, seq_len=32)
    imp = compute_importance(model, adapter, blocks, progress=False)["attn"]
    first = min(range(6), key=lambda i: imp[i])
    drop_sublayers(model, adapter, attn=[first])
    imp = compute_importance(model, adapter, blocks, progress=False)["attn"]
    second = min((i for i in range(6) if i != first), key=lambda i: imp[i])
    assert json.loads(r.stdout)["plan"]["attn"] == sorted([first, second])
    record = json.loads((out / "llmdrop.json").read_text())
    assert [s["layer"] for s in record["iterative_steps"]] == [first, second]
    assert record["source"]["model_type"] == "llama"  # as loaded, not the in-memory dropped config


def test_help_has_examples():
    for verb in ("score", "drop", "eval"):
        assert "Example:" in invoke(verb, "--help").output


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=132)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["drop", "{tiny}", "-o", "{tmp}/x", "--attn-layers", "1,x"], "bad layer list '1,x'"),
        (
            ["drop", "{tiny}", "-o", "{tmp}/x", "--attn-layers", "6"],
            "layer 6 is out of range: the model has layers 0-5",
        ),
        (["drop", "{tiny}", "-o", "{tmp}/x", "--attn", 7, "--scores", "{tmp}/s.json"], "cannot drop 7 attention"),
        (["drop", "{tiny}", "-o", "{tiny}", "--attn", 1], "would overwrite the input"),
        (["drop", "{tiny}", "--attn", 1], "give an output directory"),
        (["drop", "{tiny}", "-o", "{tmp}/x"], "nothing to drop"),
        (["score", "{tmp}/nope"], "no such directory: "),
        (["score", "{gpt2}"], "unsupported architecture model_type='gpt2'; supported: gemma2, gemma3_text, llama"),
        (["score", "{tiny}", "--calib", "{tmp}/text.txt", "--samples", 500, "--seq-len", 64], "calibration text has"),
        (["score", "{tiny}", "--calib", "{tmp}/missing.txt"], "does not exist"),
        (["eval", "{tiny}", "--text", "{tmp}/text.txt", "--dtype", "float8"], "unknown dtype 'float8'"),
    ],
)
def test_bad_inputs_give_one_error_line(workdir, gpt2_dir, args, message):
    fill = {"tiny": workdir / "tiny", "tmp": workdir, "gpt2": gpt2_dir}
    r = invoke(*[str(a).format(**fill) for a in args])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()  # progress bars of the model load may come first
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert not (workdir / "x").exists()


def test_help_imports_neither_torch_nor_transformers():
    """`llmdrop --help` and `llmdrop VERB --help` must be instant: the heavy imports wait for a command that runs."""
    code = (
        "import sys; from typer.testing import CliRunner; from llmdrop.cli import app; "
        "codes = [CliRunner().invoke(app, args).exit_code for args in (['--help'], ['drop', '--help'], "
        "['act', 'search', '--help'])]; "
        "print(codes, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[0, 0, 0] []"


def test_debug_is_one_global_option(workdir, monkeypatch):
    from llmdrop.cli import common as cli
    from llmdrop.errors import LlmdropError

    monkeypatch.setitem(cli._state, "debug", False)
    r = invoke("score", workdir / "nope")
    assert r.exit_code == 1 and r.stderr.startswith("error: no such directory")
    r = invoke("--debug", "score", workdir / "nope")
    assert isinstance(r.exception, LlmdropError)  # raised, with its traceback, instead of the one line


def test_every_model_command_takes_the_load_options():
    from typer.main import get_command

    group = get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items()}
    commands.update({f"act {n}": c for n, c in commands.pop("act").commands.items()})
    loading = {name for name, cmd in commands.items() if any(p.name == "gguf_file" for p in cmd.params)}
    assert loading == {
        "score",
        "drop",
        "auto",
        "eval",
        "heal",
        "quantize",
        "bench",
        "probe",
        "inject",
        "act search",
        "act eval",
        "act apply",
        "attnmap",
    }
    assert all(not any(p.name == "debug" for p in cmd.params) for cmd in commands.values())
    json_flags = {name for name, cmd in commands.items() for p in cmd.params if "--json" in p.opts}
    assert all(p.is_flag for cmd in commands.values() for p in cmd.params if "--json" in p.opts)
    assert json_flags == set(commands)  # --json: machine output on stdout, in every command


def test_drop_says_which_format_it_wrote_and_why(workdir):
    out = workdir / "nas"
    r = invoke("drop", workdir / "tiny", "-o", out, "--attn-layers", "1,3")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[-1] == (  # what people read goes to stderr, --json to stdout
        f"wrote {out} in the nemotron-nas format (not vanilla: a vanilla checkpoint can only lose whole layers, "
        "not single attention / MLP sublayers)"
    )
    r = invoke("drop", workdir / "tiny", "-o", workdir / "x", "--attn-layers", "0", "--format", "nemotron-nas")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: --format nemotron-nas cannot hold this export: vLLM's DeciLM layer starts the residual stream in "
        "layer 0's attention, which this plan drops"
    )
    assert not (workdir / "x").exists()


def test_every_verb_is_a_function_of_the_api_with_the_same_options():
    """Library first: each CLI verb is an api function, listed once (llmdrop._PUBLIC), taking the verb's options."""
    import inspect

    from typer.main import get_command

    import llmdrop
    import llmdrop.api

    group = get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items()}
    commands.update({f"act {n}": c for n, c in commands.pop("act").commands.items()})
    function = {"eval": "evaluate"}
    cli_only = {"json_out", "calib", "samples", "seq_len", "seed", "device", "dtype", "gguf_file", "trust_remote_code"}
    for name, cmd in commands.items():
        fn = getattr(llmdrop, function.get(name, name.replace(" ", "_")))
        assert fn is getattr(llmdrop.api, fn.__name__) and fn.__name__ in llmdrop.api.__all__, name
        if name in ("drop", "bench", "push", "act search", "act eval", "act apply"):
            continue  # their options go through a DropRequest / the engine / a few renamed arguments
        params = set(inspect.signature(fn).parameters) | {"model", "models", "folder"}
        renamed = {"fmt": "formats"} if name == "attnmap" else {}  # --format png,html
        missing = {renamed.get(p.name, p.name) for p in cmd.params} - params - cli_only - {"nproc_per_node"}
        assert not missing, (name, missing)
