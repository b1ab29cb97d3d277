"""Selectors (planning.select) on tiny Llamas saved to disk: a planted useless part is found by every selector, the
loss search agrees with a brute-force enumeration, the contiguous angular cut with a hand computation."""

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_models import WORDS, identity_hooks, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import llmdrop
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.planning.select import reverse
from llmdrop.request import choose
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import load_model

N = 6
PLANTED = 4  # not the last layer, so that `reverse` (which keeps the final layer) must find it too


def save(model, folder):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(2000)))
    return path


@pytest.fixture(scope="module")
def calib(calib_file):
    return CalibSpec(str(calib_file), samples=6, seq_len=24)


def planted(kind: str):
    """A tiny Llama whose layer PLANTED has a zeroed attention output projection (kind attn) or whose block adds
    nothing (kind block: attention and MLP output projections zeroed). The other parts are scaled up and the
    head sharpened so that, on text sampled from the model itself, removing any of them raises the loss."""
    model = tiny_model("llama", N)
    layer = model.model.layers[PLANTED]
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
        for other in model.model.layers:
            other.self_attn.o_proj.weight.mul_(3)
            other.mlp.down_proj.weight.mul_(3)
        layer.self_attn.o_proj.weight.zero_()
        if kind == "block":
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def planted_dirs(tmp_path_factory):
    return {kind: save(planted(kind), tmp_path_factory.mktemp(f"planted-{kind}")) for kind in ("attn", "block")}


@pytest.mark.parametrize(
    "selector,kind",
    [(s, "block") for s in ("cosine", "loss", "angular-contiguous", "reverse")]
    + [(s, "attn") for s in ("cosine", "loss", "reverse")],
)
def test_every_selector_finds_a_planted_useless_part(selector, kind, planted_dirs, tmp_path):
    count = {"blocks": 1} if kind == "block" else {"attn": 1}
    if selector == "loss":
        count["candidates"] = N  # every layer: a search, not the cosine pre-filter, has to find it
    calib = CalibSpec("self", samples=6, seq_len=24)
    out = tmp_path / "out"
    record = llmdrop.drop(str(planted_dirs[kind]), str(out), selector=selector, calib=calib, progress=False, **count)
    assert record == json.loads((out / "llmdrop.json").read_text())
    assert record["plan"]["blocks" if kind == "block" else "attn"] == [PLANTED]
    assert record["selection"]["selector"] == selector
    assert record["plan"]["method"] == ("scores" if selector == "cosine" else selector)
    if selector == "loss":
        losses = record["selection"]["steps"][0]["candidates"]
        assert losses[f"{kind}{PLANTED}"] == pytest.approx(record["selection"]["base_loss"], abs=1e-6)
        assert len(losses) == N and min(losses.values()) == losses[f"{kind}{PLANTED}"]


def next_token_loss(model, ids, attn=(), mlp=(), blocks=()):
    """Cross-entropy with these parts made identities by forward hooks on the original model (no llmdrop code)."""
    with torch.no_grad(), identity_hooks(model, attn, mlp, blocks):
        logits = model(ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def test_loss_search_matches_brute_force(calib, tmp_path):
    folder = save(tiny_model("llama", 4, seed=1), tmp_path / "src")
    loaded = load_model(str(folder), device="cpu")
    ids = calib.tokens(loaded.tokenizer)
    original = tiny_model("llama", 4, seed=1)
    sublayers = [(k, i) for k in ("attn", "mlp") for i in range(4)]

    def loss(parts):
        return next_token_loss(original, ids, [i for k, i in parts if k == "attn"], [i for k, i in parts if k == "mlp"])

    brute = {parts: loss(parts) for n in (1, 2) for parts in itertools.combinations(sublayers, n)}
    importance = {"attn": [0.0] * 4, "mlp": [0.0] * 4, "block": [0.0] * 4}  # no pre-filter: every part is a candidate
    _, record = choose("loss", loaded, ids, importance=importance, joint=2, candidates=8, loss_samples=len(ids))
    first, second = record["steps"]
    # step 1: every single removal evaluated, and the best one taken, as the enumeration says
    for k, i in sublayers:
        assert first["candidates"][f"{k}{i}"] == pytest.approx(brute[((k, i),)], abs=1e-5)
    best_single = min(itertools.combinations(sublayers, 1), key=brute.get)[0]
    assert (first["kind"], first["layer"]) == best_single
    # step 2: every pair that contains the first choice, and the best of them
    pairs = {p: v for p, v in brute.items() if len(p) == 2 and best_single in p}
    assert len(second["candidates"]) == 7
    for pair, value in pairs.items():
        (other,) = set(pair) - {best_single}
        assert second["candidates"][f"{other[0]}{other[1]}"] == pytest.approx(value, abs=1e-5)
    best_pair = min(pairs, key=pairs.get)
    assert {(step["kind"], step["layer"]) for step in record["steps"]} == set(best_pair)
    assert record["evaluations"] == 8 + 7
    assert record["forward_passes"] == (8 + 7 + 1) * len(ids)
    # greedy is not exhaustive in general; on this model its pair is also the best of all 28 pairs
    assert second["loss"] == pytest.approx(min(v for p, v in brute.items() if len(p) == 2), abs=1e-5)


def test_loss_search_prefilters_by_cosine(calib, tmp_path):
    loaded = load_model(str(save(tiny_model("llama", N), tmp_path / "src")), device="cpu")
    ids = calib.tokens(loaded.tokenizer)
    importance = {"attn": [0.5, 0.1, 0.4, 0.2, 0.9, 0.3], "mlp": [1.0] * N, "block": [1.0] * N}
    plan, record = choose("loss", loaded, ids, importance=importance, attn=2, candidates=3)
    assert record["candidates"] == {"attn": ["attn1", "attn3", "attn5"]}
    assert set(plan.attn) <= {1, 3, 5} and len(plan.attn) == 2
    assert set(record["steps"][0]["candidates"]) == {"attn1", "attn3", "attn5"}
    with pytest.raises(LlmdropError, match="cannot drop 4 attn parts by loss from 3 candidates"):
        choose("loss", loaded, ids, importance=importance, attn=4, candidates=3)


def test_angular_contiguous_matches_hand_computation(calib, tmp_path):
    model = tiny_model("llama", N, seed=2)
    loaded = load_model(str(save(model, tmp_path / "src")), device="cpu")
    ids = calib.tokens(loaded.tokenizer)
    n = 2
    with torch.no_grad():
        out = model(ids, use_cache=False, output_hidden_states=True)
        last = {}
        handle = model.model.layers[-1].register_forward_hook(
            lambda m, a, o: last.update(h=o[0] if isinstance(o, tuple) else o)
        )
        model(ids, use_cache=False)
        handle.remove()
    states = [h[:, -1] for h in out.hidden_states[:N]] + [last["h"][:, -1]]  # layer inputs, then the raw output

    def distance(a, b):
        cos = F.cosine_similarity(states[a].double(), states[b].double(), dim=-1).clamp(-1, 1)
        return (torch.arccos(cos) / math.pi).mean().item()

    expected = [distance(ell, ell + n) for ell in range(N - n + 1)]
    plan, record = choose("angular-contiguous", loaded, ids, blocks=n, batch_size=4)
    assert [record["distances"][str(ell)] for ell in range(N - n + 1)] == pytest.approx(expected, abs=1e-5)
    best = min(range(len(expected)), key=expected.__getitem__)
    assert plan.blocks == [best, best + 1] and record["start"] == best


def test_reverse_keeps_the_final_layer():
    assert reverse(10, blocks=3)[0].blocks == [6, 7, 8]
    assert reverse(10, attn=2)[0].attn == [7, 8]
    plan, record = reverse(10, joint=3)  # MLP 8, attention 8 (= block 8), MLP 7
    assert (plan.blocks, plan.attn, plan.mlp) == ([8], [], [7])
    assert record["order"] == ["attn8", "mlp8", "mlp7"]
    plan, _ = reverse(10, blocks=2, attn=2)
    assert (plan.blocks, plan.attn) == ([7, 8], [5, 6])
    with pytest.raises(LlmdropError, match="9 are left below the final layer"):
        reverse(10, blocks=10)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--select", "best", "--blocks", "2"],
            "unknown --select 'best'; use cosine, loss, angular-contiguous, reverse",
        ),
        (["--select", "angular-contiguous", "--attn", "2"], "angular-contiguous cuts a run of whole blocks"),
        (["--select", "loss", "--attn-layers", "1"], "--select loss needs counts"),
        (["--select", "loss", "--attn", "2", "--iterative"], "does not combine with it"),
        (["--select", "loss", "--attn", "2", "--candidates", "0"], "--candidates must be >= 1 (got 0)"),
        (["--select", "reverse", "--attn", "2", "--scores", "s.json"], "--select reverse reads no scores"),
        (["--compensate", "quadratic", "--blocks", "2"], "unknown --compensate 'quadratic'; use linear, scale"),
    ],
)
def test_bad_selection_requests_fail_before_loading(args, message, tmp_path):
    result = CliRunner().invoke(app, ["drop", str(tmp_path / "missing-model"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_loss_with_a_scores_file_still_evaluates_on_calibration_tokens(planted_dirs, tmp_path):
    """--scores gives the cosine pre-filter only: the loss search still needs (and samples) its calibration tokens."""
    calib = CalibSpec("self", samples=6, seq_len=24)
    scores = llmdrop.score(str(planted_dirs["block"]), calib=calib, out=tmp_path / "s.json", progress=False)
    record = llmdrop.drop(
        str(planted_dirs["block"]), str(tmp_path / "out"), selector="loss", blocks=1, candidates=N,
        scores=str(tmp_path / "s.json"), calib=calib, progress=False,
    )  # fmt: skip
    assert record["plan"]["blocks"] == [PLANTED] and record["selection"]["loss_samples"] == 6
    assert record["scores"]["importance"] == scores.importance  # the file's scores, not new ones
