"""`llmdrop auto`: the exact knapsack against brute force, the cost model's fit and cache, the token splits (the
verification never sees a search row), the targets, and whole runs on a tiny checkpoint on disk (the analytic cost
model: the engines' own measurements are in docs/auto.md)."""

import itertools
import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from llmdrop.autosearch import costs as auto_costs
from llmdrop.autosearch.costs import CostModel, Workload, fit, variant_plans
from llmdrop.autosearch.knapsack import OPTIONS, Plan, best_per_count, runs
from llmdrop.autosearch.search import Quality, Search, Target, neighbours, split_rows
from llmdrop.cli import app
from llmdrop.errors import LlmdropError

# --------------------------------------------------------------------------- the knapsack


def brute_force(deltas: dict, num_layers: int) -> dict:
    """Every assignment of one option (or none) per layer: the least loss per counts."""
    best = {}
    for choice in itertools.product([None, *OPTIONS], repeat=num_layers):
        parts = {(k, i) for i, k in enumerate(choice) if k}
        if any(p not in deltas for p in parts):
            continue
        plan = Plan(frozenset(parts))
        loss = sum(deltas[p] for p in parts)
        if plan.counts not in best or loss < best[plan.counts] - 1e-12:
            best[plan.counts] = loss
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_knapsack_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    n = 5
    # some options missing (not candidates), some negative (a part whose removal helps)
    deltas = {(k, i): rng.uniform(-0.1, 1.0) for k in OPTIONS for i in range(n) if rng.random() < 0.8}
    table = best_per_count(deltas, n)
    expected = brute_force(deltas, n)
    assert set(table) == set(expected)
    for counts, (loss, plan) in table.items():
        assert loss == pytest.approx(expected[counts], abs=1e-12)
        assert plan.counts == counts and sum(deltas[p] for p in plan.parts) == pytest.approx(loss)
        assert len({i for _, i in plan.parts}) == len(plan.parts)  # one option per layer


def test_plans_read_as_lists_and_labels():
    plan = Plan(frozenset({("block", 3), ("attn", 5), ("attn", 6), ("attn", 7), ("mlp", 9)}))
    assert plan.counts == (3, 1, 1)
    assert plan.lists() == {"blocks": [3], "attn": [5, 6, 7], "mlp": [9]}
    assert plan.label() == "blocks 3 + attn 5-7 + mlp 9"
    assert runs([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"


def test_neighbours_are_one_move_away():
    plan = Plan(frozenset({("attn", 2), ("block", 4)}))
    options = {(k, i) for k in OPTIONS for i in range(1, 6)}
    near = neighbours(plan, options, 6)
    assert plan not in near and len(set(near)) == len(near)
    for other in near:
        changed_layers = {i for _, i in plan.parts ^ other.parts}
        assert 1 <= len(changed_layers) <= 2 and other.parts <= options
    # moving the block from layer 4 to layer 5, and keeping layer 2's attention, are among them
    assert Plan(frozenset({("attn", 2), ("block", 5)})) in near
    assert Plan(frozenset({("block", 4)})) in near


# --------------------------------------------------------------------------- the cost model


def test_the_fit_recovers_known_savings_and_checks_them():
    n = 30
    saving = {"attn": 0.02, "mlp": 0.03, "block": 0.07}
    base = 2.0

    def time_of(plan):
        return (
            base - saving["attn"] * len(plan.attn) - saving["mlp"] * len(plan.mlp) - saving["block"] * len(plan.blocks)
        )

    times = {name: time_of(plan) for name, plan in variant_plans(n).items()}
    got = fit(times, n)
    assert got["base"] == base
    for kind in saving:
        assert got[kind] == pytest.approx(saving[kind])
    assert got["variants"]["fit_error"] == pytest.approx(0.0, abs=1e-12)
    times["mixed"] *= 1.1  # a mixed plan 10% slower than the fit says: reported
    assert fit(times, n)["variants"]["fit_error"] == pytest.approx(0.1)


def test_the_variants_keep_layer_0s_attention_and_are_disjoint():
    for n in (2, 4, 7, 30, 80):
        plans = variant_plans(n)
        for plan in plans.values():
            assert 0 not in plan.attn and 0 not in plan.blocks
        mixed = plans["mixed"]
        assert mixed.attn and mixed.mlp and mixed.blocks or n < 4
        assert not set(mixed.attn) & set(mixed.mlp) & set(mixed.blocks)


def cost_model(**kw) -> CostModel:
    values = dict(
        engine="test",
        unit="s",
        base=1.0,
        attn=0.01,
        mlp=0.02,
        block=0.04,
        num_layers=10,
        workload={"prefill": 8, "decode": 8, "batch": 1},
        variants={"fit_error": 0.0},
        how="test",
    )
    return CostModel(**{**values, **kw})


def test_targets_read_the_cost_model():
    costs = cost_model()
    assert costs.speedup((2, 1, 1)) == pytest.approx(1 / (1 - 0.02 - 0.02 - 0.04))
    assert costs.kv_fraction((2, 5, 1)) == pytest.approx(0.7)  # attention-only drops and blocks lose their cache
    speed, kv, loss = Target("speedup", 1.05), Target("kv", 0.8), Target("loss", 0.1)
    assert speed.cost_ok(costs, (0, 0, 2)) and not speed.cost_ok(costs, (1, 1, 0))
    assert kv.cost_ok(costs, (1, 0, 1)) and not kv.cost_ok(costs, (1, 9, 0))
    assert loss.key(costs, (0, 0, 1), math.log(1.1) + 1e-9) is None
    assert loss.key(costs, (0, 0, 1), 0.05) < loss.key(costs, (1, 0, 0), 0.01)  # faster wins within the budget


def test_the_cost_model_is_cached_by_shape_engine_and_workload(tmp_path, monkeypatch, tiny_tokenizer):
    from tiny_models import tiny_model

    from llmdrop.source.arch import adapter_for
    from llmdrop.source.models import LoadedModel

    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path))
    monkeypatch.setattr(auto_costs, "engine_available", lambda engine: False)  # the analytic bound: deterministic
    model = tiny_model("llama", 6)
    loaded = LoadedModel(model, tiny_tokenizer, adapter_for(model.config), "tiny", "tiny")
    first, _ = auto_costs.cost_model(loaded, None, "vllm", Workload(8, 8, 1), progress=False)
    assert first.engine == "analytic" and "not installed" in first.how
    assert 0 < first.attn and 0 < first.mlp and first.block > first.attn + first.mlp - 1e-9
    files = list((tmp_path / "costs").glob("*.json"))
    assert len(files) == 1
    again, _ = auto_costs.cost_model(loaded, None, "vllm", Workload(8, 8, 1), progress=False)
    assert again.base == first.base
    auto_costs.cost_model(loaded, None, "vllm", Workload(16, 8, 1), progress=False)  # another workload: its own
    auto_costs.cost_model(loaded, None, "transformers", Workload(8, 8, 1), progress=False)  # another engine
    assert len(list((tmp_path / "costs").glob("*.json"))) == 3


# --------------------------------------------------------------------------- tokens and verification


def test_the_splits_are_disjoint_and_seeded():
    tokens = torch.arange(20 * 4).view(20, 4)
    a = split_rows(tokens, {"search": 8, "verify": 6, "test": 4}, seed=0)
    rows = {s: {tuple(r.tolist()) for r in a[s]} for s in a}
    assert [len(rows[s]) for s in ("search", "verify", "test")] == [8, 6, 4]
    assert (
        not rows["search"] & rows["verify"] and not rows["search"] & rows["test"] and not rows["verify"] & rows["test"]
    )
    assert torch.equal(split_rows(tokens, {"search": 8, "verify": 6, "test": 4}, seed=0)["verify"], a["verify"])
    assert not torch.equal(split_rows(tokens, {"search": 8, "verify": 6, "test": 4}, seed=1)["verify"], a["verify"])
    with pytest.raises(LlmdropError, match="20 rows of 4 tokens; search, verify and test need 21"):
        split_rows(tokens, {"search": 8, "verify": 9, "test": 4}, seed=0)


def test_verification_never_reuses_search_rows(monkeypatch, tiny_tokenizer):
    """Every loss the search measures is recorded with the rows it was measured on: the single-part losses see
    search rows only, every plan is verified on verify rows only, and nothing touches the test rows."""
    from tiny_models import tiny_model

    import llmdrop.planning.select as select
    from llmdrop.source.arch import adapter_for
    from llmdrop.source.models import LoadedModel

    model = tiny_model("llama", 6)
    loaded = LoadedModel(model, tiny_tokenizer, adapter_for(model.config), "tiny", "tiny")
    tokens = torch.randint(4, 100, (12, 16), generator=torch.Generator().manual_seed(0))
    rows = split_rows(tokens, {"search": 4, "verify": 4, "test": 4}, seed=0)
    seen = []
    real = select.calibration_loss
    monkeypatch.setattr(
        select, "calibration_loss", lambda m, t, b=1: seen.append({tuple(r.tolist()) for r in t}) or real(m, t, b)
    )
    quality = Quality(loaded, rows)
    found = Search(loaded, quality, cost_model(num_layers=6), candidates=3, progress=False)
    best = found.round(Target("speedup", 1.05))
    found.round(Target("speedup", 1.1))  # a second round (a corrected speed target) verifies on the same rows
    split_of = {s: {tuple(r.tolist()) for r in rows[s]} for s in rows}
    kinds = [next(s for s in split_of if used == split_of[s]) for used in seen]
    first_verify = kinds.index("verify")
    assert set(kinds[:first_verify]) == {"search"} and set(kinds[first_verify:]) == {"verify"}
    assert len(found.deltas) == kinds.count("search") - 1  # one base loss, one per candidate option
    assert len(found.verified) == kinds.count("verify") - 1 and best is not None
    assert quality.forward_passes == 4 * (1 + kinds.count("search")) + 4 * kinds.count("verify")  # + the cosine prior


# --------------------------------------------------------------------------- whole runs


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """A 6-layer random Llama with its tokenizer, saved like a user's checkpoint; the analytic cost model."""
    from tiny_models import tiny_model, tiny_tokenizer

    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(auto_costs, "engine_available", lambda engine: False)
    path = tmp_path / "tiny"
    tiny_model("llama", 6).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


SMALL = ["--calib", "self", "--seq-len", "16", "--search-rows", "3", "--verify-rows", "3", "--test-rows", "2"]
SMALL += ["--candidates", "4", "--verify", "3", "--refine", "4", "--workload", "prefill=8,decode=8"]


def test_auto_exports_a_plan_that_meets_a_kv_target_and_reloads(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmdrop.planning.plan import DropPlan
    from llmdrop.planning.surgery import apply_plan
    from llmdrop.source.arch import adapter_for

    out = tmp_path / "out"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(" ".join(f"w{i * 7 % 128}" for i in range(800)))
    result = CliRunner().invoke(
        app,
        ["auto", str(tiny_checkpoint), "-o", str(out), "--kv-cache", "50%", "--engine", "vllm", "--eval", str(held_out)]
        + SMALL,
    )
    assert result.exit_code == 0, result.output
    assert "analytic" in result.output and "chosen:" in result.output
    report = json.loads((out / "auto.json").read_text())
    chosen = report["chosen"]
    assert chosen["kv_cache_fraction"] <= 0.5 and report["met"] and not report["speed_measured"]
    assert chosen["confirmed_speedup"] == pytest.approx(chosen["measured_speedup"])  # the bound: the same twice
    assert chosen["test_perplexity"]["plan"] > 0 and chosen["format"] in ("nemotron-nas", "auto")
    text = chosen["eval_texts"][str(held_out)]  # 256-position model: blocks of 256, not 512
    assert text["tokens"] == 3 * 256 and text["plan"] != text["source"] and "held_out.txt" in result.output
    assert (out / "auto.png").stat().st_size > 10_000 and chosen["plan"] in (out / "auto.md").read_text()
    assert report["search_cost"]["forward_passes"] > 0 and report["search_cost"]["seconds"]["total"] > 0
    record = json.loads((out / "llmdrop.json").read_text())
    plan = DropPlan(6, **chosen["lists"])
    assert DropPlan(**record["plan"]).to_dict() == {**plan.to_dict(), "method": record["plan"]["method"]}

    exported, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    source = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    apply_plan(source, adapter_for(source.config), plan)
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_loss_target_gets_the_fastest_verified_plan_within_it(tiny_checkpoint):
    result = CliRunner().invoke(
        app, ["auto", str(tiny_checkpoint), "--dry-run", "--max-loss-increase", "100%", "--json", *SMALL]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    chosen, budget = report["chosen"], math.log(2)
    assert chosen["verified_loss_increase"] <= budget
    within = [p for p in report["plans"] if p["verified_loss_increase"] <= budget and "measured_speedup" in p]
    assert chosen["measured_speedup"] == max(p["measured_speedup"] for p in within)


def test_cosine_plans_of_one_kind_are_verified_beside_the_search():
    from llmdrop.autosearch.search import cosine_plans

    importance = {k: [0.9, 0.5, 0.1, 0.3, 0.2, 0.4] for k in OPTIONS}
    deltas = {(k, i): 0.1 for k in OPTIONS for i in range(1, 6)}
    costs = cost_model(num_layers=6)  # attention 1%, MLP 2%, block 4% of the time
    plans = cosine_plans(importance, deltas, costs, Target("speedup", 1.035))
    # the least N of each kind that reaches 1.035x (a saving of 3.4%), lowest importance first: 2, 4, 3, 5, 1
    assert [p.lists() for p in plans] == [
        {"blocks": [], "attn": [2, 3, 4, 5], "mlp": []},  # 4 x 1%
        {"blocks": [], "attn": [], "mlp": [2, 4]},  # 2 x 2%
        {"blocks": [2], "attn": [], "mlp": []},  # 4%
    ]
    assert cosine_plans(importance, deltas, costs, Target("loss", 0.1)) == []


def test_a_speed_shortfall_corrects_the_cost_models_target():
    from llmdrop.autosearch.run import corrected
    from llmdrop.autosearch.search import Verified

    costs = cost_model()  # a block saves 4% of the time
    plans = [Plan(frozenset({("block", i) for i in range(1, k + 1)})) for k in (3, 4, 5)]
    predicted = [costs.speedup(p.counts) for p in plans]
    # the engine delivered half of every predicted saving: for 1.1x, ask the cost model for 1/(1-2(1-1/1.1))
    half = [Verified(p, 0.1, 0.1, "knapsack", measured=1 / (1 - (1 - 1 / s) / 2)) for p, s in zip(plans, predicted)]
    goal = corrected(Target("speedup", 1.1), Target("speedup", 1.1), half, costs)
    assert goal.value == pytest.approx(1 / (1 - 2 * (1 - 1 / 1.1)))
    assert corrected(Target("speedup", 1.1), goal, half, costs) is None  # asked for already: no progress
    full = [Verified(p, 0.1, 0.1, "knapsack", measured=s) for p, s in zip(plans, predicted)]
    assert corrected(Target("speedup", 1.1), Target("speedup", 1.1), full, costs) is None  # not the model's fault
    assert corrected(Target("speedup", 3.0), Target("speedup", 3.0), half, costs) is None  # beyond any plan


def test_plans_are_ranked_by_what_the_target_leaves_open():
    from llmdrop.autosearch.run import ranked

    table = [
        {"measured_speedup": 1.31, "verified_loss_increase": 0.30, "kv_cache_fraction": 0.7},
        {"measured_speedup": 1.29, "verified_loss_increase": 0.10, "kv_cache_fraction": 0.6},
        {"verified_loss_increase": 0.01, "kv_cache_fraction": 0.5},  # speed not measured: never chosen
        {"measured_speedup": 1.40, "verified_loss_increase": 0.20, "kv_cache_fraction": 0.5},
    ]
    assert ranked(table, Target("speedup", 1.3)) == [3, 0]  # measured fast enough, least loss first
    assert ranked(table, Target("kv", 0.6)) == [1, 3]
    assert ranked(table, Target("loss", 0.25)) == [3, 1]  # within exp(0.25) - 1, fastest first (ln 1.25 = 0.223)


def test_a_target_that_cannot_be_met_writes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    # only layer 0's attention would be left to keep 1% of the cache, and it is never dropped
    result = CliRunner().invoke(app, ["auto", str(tiny_checkpoint), "-o", str(out), "--kv-cache", "0.01", *SMALL])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: target not met (at most 1% of the KV cache)")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--speedup", "0.9"], "bad --speedup '0.9': it must be above 1"),
        (["--speedup", "fast"], "bad --speedup 'fast'"),
        (["--max-loss-increase", "-5%"], "bad --max-loss-increase '-5%': it must be above 0% and at most 100%"),
        (["--max-loss-increase", "150%"], "at most 100%"),
        (["--kv-cache", "1.2"], "bad --kv-cache '1.2'"),
        (["--kv-cache", "lots"], "bad --kv-cache 'lots': use a percentage"),
        ([], "give one target"),
        (["--speedup", "1.3", "--kv-cache", "0.5"], "give one target"),
        (["--speedup", "1.3", "--engine", "tensorrt"], "unknown --engine 'tensorrt'"),
        (["--speedup", "1.3", "--engine", "llama.cpp", "--workload", "batch=8"], "one sequence at a time"),
        (["--speedup", "1.3", "--workload", "decode=0"], "must be >= 1"),
        (["--speedup", "1.3", "--workload", "tokens=5"], "bad --workload 'tokens=5'"),
        (["--speedup", "1.3", "--verify-rows", "0"], "--verify-rows must be >= 1"),
        (["--speedup", "1.3", "--candidates", "0"], "--candidates must be >= 1"),
    ],
)
def test_bad_targets_are_one_line_before_any_model_work(flags, message, tmp_path, no_model_work):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["auto", "-o", str(out), *flags])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert no_model_work == [] and not out.exists()


def test_an_existing_output_is_refused_before_any_model_work(tmp_path, no_model_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["auto", "-o", str(out), "--speedup", "1.2"])
    assert result.exit_code == 1 and "exists" in result.output
    assert (out / "mine.txt").read_text() == "keep me" and no_model_work == []


def test_the_public_function_is_not_shadowed_by_its_package():
    import llmdrop
    import llmdrop.api
    import llmdrop.autosearch.run  # noqa: F401  (importing a subpackage sets an attribute on its parent)

    assert llmdrop.auto is llmdrop.api.auto and callable(llmdrop.auto)
