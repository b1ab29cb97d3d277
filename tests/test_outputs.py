"""Every verb that writes a file or a folder goes through the one output check (llmdrop.files.check_output), before
any model work: an existing output is refused without --overwrite, an output equal to, inside or containing an input
is refused, a file name whose extension the writer cannot produce is refused; the inputs stay as they were.

The walk below covers every option of the CLI that names an output: a new verb (or a new output option) that is not
in WRITERS fails ``test_every_output_option_is_walked``, so it cannot skip the check."""

import hashlib
import json
from pathlib import Path

import pytest
import typer.main
from tiny_models import WORDS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import llmdrop.source.models
import llmdrop.source.streaming
from llmdrop.analysis.act import FORMAT as HEADS_FORMAT
from llmdrop.cli import app

OUTPUT_OPTIONS = ("--out", "--plot", "--markdown", "--save")

# (verb, output option) -> (the rest of a valid command line, what is written: "dir" or an extension it can write)
WRITERS = {
    ("score", "--out"): (["score", "{model}", "--calib", "{calib}", "--samples", "2", "--seq-len", "16"], ".json"),
    ("score", "--plot"): (["score", "{model}", "--calib", "{calib}", "--samples", "2", "--seq-len", "16"], ".png"),
    ("drop", "--out"): (["drop", "{model}", "--attn", "1", "--calib", "{calib}", "--seq-len", "16"], "dir"),
    ("auto", "--out"): (["auto", "{model}", "--speedup", "1.2", "--calib", "{calib}", "--seq-len", "16"], "dir"),
    ("quantize", "--out"): (["quantize", "{model}", "--method", "gptq", "--calib", "{calib}"], "dir"),
    ("heal", "--out"): (["heal", "{export}", "--train", "full", "--calib", "{calib}"], "dir"),
    ("bench", "--out"): (["bench", "{model}", "--repeats", "1", "--warmup", "0", "--no-memory"], ".json"),
    ("bench", "--plot"): (["bench", "{model}", "--repeats", "1", "--warmup", "0", "--no-memory"], ".png"),
    ("bench", "--markdown"): (["bench", "{model}", "--repeats", "1", "--warmup", "0", "--no-memory"], ".md"),
    ("probe", "--out"): (["probe", "{model}", "--samples", "2"], ".json"),
    ("probe", "--plot"): (["probe", "{model}", "--samples", "2"], ".png"),
    ("inject", "--out"): (["inject", "{model}", "--task", "capitals", "--samples", "2"], ".json"),
    ("inject", "--plot"): (["inject", "{model}", "--task", "capitals", "--samples", "2"], ".png"),
    ("attnmap", "--out"): (["attnmap", "{model}", "--prompt", "w1 w2 w3"], "dir"),
    ("act search", "--out"): (["act", "search", "{model}"], ".json"),
    ("act apply", "--out"): (["act", "apply", "{model}", "--heads", "{heads}"], "dir"),
}
# Written inside an input on purpose, and so outside this walk: `eval --save` records the result in
# MODEL/eval_results.json for `llmdrop push` (tests/test_hub.py).
BY_DESIGN = {("eval", "--save")}
# act search resumes from an existing heads.json (same settings, or refused): an existing output is its input
RESUMES = {("act search", "--out")}


def cli_outputs() -> set[tuple[str, str]]:
    """(verb, option) for every option of the CLI that names an output."""
    found = set()

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{prefix} {name}".strip())
        for param in getattr(command, "params", []):
            for opt in getattr(param, "opts", []):
                if opt in OUTPUT_OPTIONS:
                    found.add((prefix, opt))

    walk(typer.main.get_command(app), "")
    return found


def test_every_output_option_is_walked():
    assert cli_outputs() == set(WRITERS) | BY_DESIGN


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("outputs")
    model = d / "model"
    tiny_model("llama", 4).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    calib = d / "calib.txt"
    calib.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(0, 3000, 7)))
    heads = d / "heads.json"
    heads.write_text(json.dumps({"format": HEADS_FORMAT, "beta": 0.4, "threshold": 0.1, "heads": [[1, 0]]}))
    export = d / "export"
    r = CliRunner().invoke(app, ["drop", str(model), "-o", str(export), "--attn-layers", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return {"model": model, "calib": calib, "heads": heads, "export": export, "root": d}


@pytest.fixture
def no_model_work(monkeypatch):
    """Any model load fails loudly: every refusal below must come before it."""

    def refuse(*args, **kwargs):
        raise RuntimeError("a model was loaded before the output check")

    monkeypatch.setattr(llmdrop.source.models, "load_model", refuse)
    monkeypatch.setattr(llmdrop.source.streaming, "load_skeleton", refuse)


def fingerprint(*folders: Path) -> dict:
    """Every file under the inputs, with its content's hash: nothing may change."""
    out = {}
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths})
    return out


def refused(world, writer, out, expected: str) -> None:
    args, _ = WRITERS[writer]
    line = [a.format(**{k: str(v) for k, v in world.items()}) for a in args] + [writer[1], str(out)]
    inputs = [world["model"], world["calib"], world["heads"], world["export"]]
    before = fingerprint(*inputs)
    r = CliRunner().invoke(app, line)
    assert r.exit_code == 1, (line, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (line, r.stderr)
    assert fingerprint(*inputs) == before


@pytest.mark.parametrize("writer", sorted(WRITERS), ids=lambda w: f"{w[0]} {w[1]}")
def test_an_input_is_never_an_output(world, writer, no_model_work):
    kind = WRITERS[writer][1]
    if kind == "dir":
        # equal to, inside, and containing the model folder
        for out in (world["model"], world["model"] / "sub", world["root"]):
            refused(world, writer, out, "would overwrite the input")
    else:
        for out in (world["model"] / "config.json", world["calib"] if "--calib" in WRITERS[writer][0] else None):
            if out is not None:
                refused(world, writer, out, "would overwrite the input")


@pytest.mark.parametrize("writer", sorted(set(WRITERS) - RESUMES), ids=lambda w: f"{w[0]} {w[1]}")
def test_an_existing_output_needs_overwrite(world, writer, no_model_work, tmp_path):
    kind = WRITERS[writer][1]
    out = tmp_path / ("out" if kind == "dir" else f"out{kind}")
    if kind == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("mine")
    refused(world, writer, out, "already exists; pass --overwrite to replace it")
    assert (out / "keep.txt" if kind == "dir" else out).read_text() == "mine"


@pytest.mark.parametrize("writer", sorted(w for w in WRITERS if WRITERS[w][1] != "dir"), ids=lambda w: f"{w[0]} {w[1]}")
def test_a_file_the_writer_cannot_produce_is_refused(world, writer, no_model_work, tmp_path):
    refused(world, writer, tmp_path / "result.txt", "the file name must end in")
    refused(world, writer, tmp_path, "is a directory; give a file name")
    assert not (tmp_path / "result.txt").exists()


def test_score_writes_atomically_and_overwrite_replaces(world, tmp_path):
    out, plot = tmp_path / "scores.json", tmp_path / "scores.png"
    args = ["score", str(world["model"]), "--calib", str(world["calib"]), "--samples", "2", "--seq-len", "16"]
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    first = json.loads(out.read_text())
    assert first["format"] == "llmdrop.scores/1" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--plot", str(plot), "--overwrite", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["calibration"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "scores.png"]  # no temporary file left
