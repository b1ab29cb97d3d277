"""Dropping from an export again: the parts it no longer has are absent (not scored 0, never candidates, refused in
explicit lists), every selector picks among the parts that are there, and the record says what was gone already and
what this run removed. Exports of both remote-code formats (llmdrop, nemotron-nas), from checkpoints on disk."""

import json
import re

import pytest
import torch
from tiny_models import WORDS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.source.models import load_model

N = 6
GONE = {"attn": [1, 3], "mlp": [4]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("redrop")
    tiny_model("llama", N).save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    (d / "calib.txt").write_text(" ".join(WORDS[(i * 37) % len(WORDS)] for i in range(4000)))
    for fmt in ("llmdrop", "nemotron-nas"):
        invoke(
            "drop", d / "model", "-o", d / fmt, "--format", fmt, "--attn-layers", "1,3", "--mlp-layers", "4", ok=True
        )
    return d


def invoke(*args, ok=False):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def calib(d):
    return ["--calib", d / "calib.txt", "--samples", "4", "--seq-len", "32", "--device", "cpu"]


def logits(folder) -> torch.Tensor:
    loaded = load_model(str(folder), device="cpu")
    ids = torch.arange(4, 36).reshape(2, 16)
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


@pytest.mark.parametrize("fmt", ["llmdrop", "nemotron-nas"])
def test_scores_mark_absent_parts(world, fmt, tmp_path):
    r = invoke("score", world / fmt, *calib(world), "-o", tmp_path / "s.json", "--plot", tmp_path / "s.png", ok=True)
    imp = json.loads((tmp_path / "s.json").read_text())["importance"]
    assert [i for i, v in enumerate(imp["attn"]) if v is None] == GONE["attn"]
    assert [i for i, v in enumerate(imp["mlp"]) if v is None] == GONE["mlp"]
    assert None not in imp["block"] and all(v > 0 for v in imp["attn"] if v is not None)
    assert len(re.findall(r"absent(?!_)", r.stderr)) == 3  # the table says so too (not the folder's name)


@pytest.mark.parametrize("fmt", ["llmdrop", "nemotron-nas"])
@pytest.mark.parametrize(
    "args",
    [["--attn", "1"], ["--joint", "2"], ["--attn", "1", "--select", "loss"], ["--joint", "2", "--select", "reverse"]],
    ids=["cosine", "joint", "loss", "reverse"],
)
def test_a_redrop_removes_parts_that_are_there(world, fmt, args, tmp_path):
    out = tmp_path / "again"
    r = invoke("drop", world / fmt, "-o", out, *args, *calib(world), "--format", "llmdrop", ok=True)
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["already_dropped"] == GONE
    plan = record["plan"]
    new = {"attn": set(plan["attn"]), "mlp": set(plan["mlp"]), "blocks": set(plan["blocks"])}
    assert len(new["attn"]) + len(new["mlp"]) + len(new["blocks"]) == int(args[1])
    assert not new["attn"] & set(GONE["attn"]) and not new["mlp"] & set(GONE["mlp"])
    # the export lacks the old parts and the new ones, and computes something else than its source
    exported = record["exported"]
    kept = [i for i in range(N) if i not in new["blocks"]]
    assert exported["drop_attn_list"] == sorted(kept.index(i) for i in set(GONE["attn"]) | new["attn"] if i in kept)
    assert exported["drop_mlp_list"] == sorted(kept.index(i) for i in set(GONE["mlp"]) | new["mlp"] if i in kept)
    assert (logits(out) - logits(world / fmt)).abs().max() > 1e-3
    assert "had dropped attention [1, 3] and MLP [4] already" in r.stderr


def test_an_mlp_dropped_where_attention_is_gone_removes_the_layer(world, tmp_path):
    out = tmp_path / "block"
    invoke("drop", world / "llmdrop", "-o", out, "--mlp-layers", "1", ok=True)
    record = json.loads((out / "llmdrop.json").read_text())
    assert record["plan"]["blocks"] == [1] and record["plan"]["mlp"] == []
    assert record["exported"]["num_layers"] == N - 1 and record["exported"]["drop_attn_list"] == [2]


@pytest.mark.parametrize("fmt", ["llmdrop", "nemotron-nas"])
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--attn-layers", "3"],
            "attention of layer 3 is not in the model any more (it is an export that dropped attention 1, 3): leave "
            "it out of --attn-layers",
        ),
        (
            ["--mlp-layers", "0,4"],
            "the MLP of layer 4 is not in the model any more (it is an export that dropped the MLP 4): leave it out "
            "of --mlp-layers",
        ),
        (["--attn", "5"], "cannot drop 5 attention sublayers: only 4 are left to choose from"),
        (["--joint", "10"], "cannot drop 10 sublayers jointly: only 9 are left to choose from"),
    ],
)
def test_absent_parts_are_refused_before_any_model_work(world, fmt, args, message, tmp_path, no_model_work):
    r = invoke("drop", world / fmt, "-o", tmp_path / "x", *args)
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [f"error: {message}"]
    assert no_model_work == [] and not (tmp_path / "x").exists()
