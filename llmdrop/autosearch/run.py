"""`llmdrop auto` from start to report: load, split the calibration rows, measure the cost model, search, measure the
speed of the verified plans on the engine, measure the chosen plan on the test rows (and held-out files), report.
The export is `api.auto`'s, once the target is met."""

import math
import time
from dataclasses import asdict
from pathlib import Path

from llmdrop.errors import LlmdropError

from .costs import Workload, cost_model
from .search import SPLITS, Quality, Search, Target, incumbent, pareto, split_rows

EXPORT_FORMATS = {"llama.cpp": "gguf", "transformers": "auto"}
EVAL_SEQ_LEN, EVAL_SAMPLES = 512, 12
CONFIRMATIONS = 3  # plans whose speed is measured again in a round before a speed target gives up
SPEED_ROUNDS = 3  # searches for a speed target, each with the cost model corrected by what the last one measured


def export_format(engine: str, plan) -> str:
    """The format the engine runs best: GGUF for llama.cpp, nemotron-nas (vLLM's DeciLM) for sublayer drops on vLLM,
    else what `--format auto` picks."""
    if engine == "vllm":
        return "nemotron-nas" if plan.attn or plan.mlp else "auto"
    return EXPORT_FORMATS[engine]


def run(
    loaded,
    gguf_path: Path | None,
    target: Target,
    *,
    engine: str,
    workload: Workload,
    calib: str,
    seq_len: int,
    splits: dict[str, int],
    candidates: int,
    verify: int,
    refine: int,
    bench_plans: int,
    bench_repeats: int,
    eval_texts: list[str],
    remeasure: bool,
    seed: int,
    batch_size: int = 1,
    progress: bool = True,
    say=print,
) -> dict:
    """The whole search; returns the report (``report["met"]``: whether the target was met, by measurement)."""
    started, seconds = time.perf_counter(), {}
    n = loaded.num_layers

    start = time.perf_counter()
    costs, meter = cost_model(
        loaded, gguf_path, engine, workload, repeats=bench_repeats, remeasure=remeasure, progress=progress
    )
    seconds["cost model"] = time.perf_counter() - start
    for line in costs.lines():
        say(line)

    start = time.perf_counter()
    rows = calibration_rows(loaded, calib, seq_len, sum(splits.values()), seed)
    quality = Quality(loaded, split_rows(rows, splits, seed), batch_size)
    seconds["calibration"] = time.perf_counter() - start

    found = Search(loaded, quality, costs, candidates=candidates, verify=verify, refine=refine, progress=progress)
    say(f"measured {len(found.deltas)} single-part losses on the search rows")
    chosen, rounds, bench_report = speed_rounds(
        found, costs, meter, target, bench_plans, bench_repeats, progress, say, seconds
    )
    verified = list(found.verified.values())
    table = [v.row(costs) for v in verified]
    seconds.update(found.seconds)
    say(f"verified {len(table)} plans on the held-out rows, measured {sum(v.measured is not None for v in verified)}")

    report = {
        "target": {"kind": target.kind, "value": target.value, "asked": target.describe()},
        "engine": engine,
        "workload": costs.workload,
        "cost_model": asdict(costs),
        "speed_measured": not meter.analytic,
        "calibration": {"source": calib, "rows": len(rows), "seq_len": seq_len, "splits": splits, "seed": seed},
        "candidates": {f"{k}{i}": round(d, 6) for (k, i), d in sorted(found.deltas.items(), key=lambda kv: kv[1])},
        "plans": table,
        "refinement": found.refinement,
        "rounds": rounds,
        "chosen": None,
        "met": chosen is not None,
    }
    if chosen is None:
        best = incumbent(verified, costs, target)
        report["best_found"] = best.row(costs) if best else None
    else:
        start = time.perf_counter()
        row = chosen.row(costs)
        held_out = held_out_quality(loaded, quality, chosen.plan, eval_texts, batch_size, progress)
        seconds["held-out quality"] = time.perf_counter() - start
        report["chosen"] = {**row, **held_out, "format": export_format(engine, as_drop_plan_of(row, n))}
    seconds["total"] = time.perf_counter() - started
    report["search_cost"] = {
        "forward_passes": quality.forward_passes,
        "tokens_per_forward_pass": int(rows.shape[1]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if bench_report is not None:
        report["bench"] = {k: bench_report[k] for k in ("engine", "device", "settings", "versions")}
    return report


def speed_rounds(found: Search, costs, meter, target: Target, bench_plans, repeats, progress, say, seconds):
    """Search, measure the speed of the verified plans that matter side by side with the source, confirm the best
    that meets the target; for a speed target the engine missed, correct the cost model's target and go again.
    Returns (the chosen Verified plan or None, a record per round, the last bench report)."""
    n = found.num_layers
    goal, chosen, rounds, bench_report = target, None, [], None
    for _ in range(SPEED_ROUNDS if target.kind == "speedup" else 1):
        found.round(goal)
        verified = list(found.verified.values())
        start = time.perf_counter()
        table = [v.row(costs) for v in verified]
        todo = [i for i in plans_to_bench(table, goal, bench_plans) if verified[i].measured is None]
        if todo:
            plans = {"base": as_drop_plan_of(None, n), **{f"plan{i}": as_drop_plan_of(table[i], n) for i in todo}}
            times, bench_report = meter.measure(plans, progress=progress)
            for i in todo:
                verified[i].measured = times["base"] / times[f"plan{i}"]
        key = "speed of the verified plans"
        seconds[key] = seconds.get(key, 0) + time.perf_counter() - start
        chosen = confirm(verified, costs, target, meter, n, repeats, progress, seconds)
        rounds.append({"cost_model_target": goal.value, "verified": len(verified), "measured": len(todo)})
        if chosen is not None or target.kind != "speedup":
            break
        goal = corrected(target, goal, verified, costs)
        if goal is None:
            break
        say(f"measured speeds fall short of the cost model's; searching again for {goal.value:.3f}x by the cost model")
    return chosen, rounds, bench_report


def confirm(verified: list, costs, target: Target, meter, num_layers: int, repeats: int, progress, seconds):
    """The best measured plan that meets the target, measured again alone with the source and twice as long: the
    winner of several close measurements is likely to have been measured fast by chance, so a speed target must hold
    there too (else the next, ``CONFIRMATIONS`` at most). Returns the Verified plan, or None."""
    start = time.perf_counter()
    chosen = None
    table = [v.row(costs) for v in verified]
    for i in [i for i in ranked(table, target) if verified[i].confirmed is None][:CONFIRMATIONS]:
        plans = {"base": as_drop_plan_of(None, num_layers), "plan": as_drop_plan_of(table[i], num_layers)}
        again, _ = meter.measure(plans, repeats=2 * repeats, progress=progress)
        verified[i].confirmed = again["base"] / again["plan"]
        if target.kind != "speedup" or verified[i].confirmed >= target.value:
            chosen = verified[i]
            break
    seconds["speed measured again"] = seconds.get("speed measured again", 0) + time.perf_counter() - start
    return chosen


def corrected(target: Target, goal: Target, verified: list, costs) -> Target | None:
    """The speed the cost model must predict for the engine to deliver ``target``, from how much of the predicted
    saving (1 - 1/speedup) the measured plans delivered (the median ratio); None when the shortfall is not the cost
    model's (the median ratio is 1 or more) or no plan could deliver it."""
    ratios = [
        (1 - 1 / v.measured) / (1 - 1 / costs.speedup(v.plan.counts))
        for v in verified
        if v.measured is not None and costs.speedup(v.plan.counts) > 1
    ]
    if not ratios:
        return None
    ratios.sort()
    ratio = ratios[len(ratios) // 2]
    needed = (1 - 1 / target.value) / ratio if ratio > 0 else math.inf
    if ratio >= 1 or needed >= 1 or 1 / (1 - needed) <= goal.value + 1e-9:
        return None
    return Target("speedup", 1 / (1 - needed))


def as_drop_plan_of(row: dict | None, num_layers: int):
    from llmdrop.planning.plan import DropPlan

    if row is None:
        return DropPlan(num_layers)
    return DropPlan(num_layers, **row["lists"], method="auto")


def plans_to_bench(table: list[dict], target: Target, limit: int) -> list[int]:
    """Indexes of the verified plans whose speed is measured: the best few that can meet the target, then the
    frontier of predicted speed against verified loss (``limit`` at most)."""
    meets = [i for i, r in enumerate(table) if _meets_by_prediction(r, target)]
    meets.sort(key=lambda i: (table[i]["verified_loss_increase"], -table[i]["predicted_speedup"]))
    if target.kind == "loss":
        meets.sort(key=lambda i: -table[i]["predicted_speedup"])
    frontier = [table.index(r) for r in pareto(table, "predicted_speedup")]
    picked = list(dict.fromkeys([*meets[:3], *frontier]))
    return picked[:limit]


def _meets_by_prediction(row: dict, target: Target) -> bool:
    if target.kind == "speedup":
        return row["predicted_speedup"] >= target.value
    if target.kind == "kv":
        return row["kv_cache_fraction"] <= target.value + 1e-12
    return row["verified_loss_increase"] <= target.loss_budget


def ranked(table: list[dict], target: Target) -> list[int]:
    """The measured plans that meet the target (speed: measured; KV: exact; loss: verified), best first: the least
    verified loss for a speed or KV target, the fastest measured for a loss target."""
    measured = [i for i, r in enumerate(table) if "measured_speedup" in r]
    if target.kind == "loss":
        ok = [i for i in measured if table[i]["verified_loss_increase"] <= target.loss_budget]
        return sorted(ok, key=lambda i: -table[i]["measured_speedup"])
    if target.kind == "speedup":
        ok = [i for i in measured if table[i]["measured_speedup"] >= target.value]
    else:
        ok = [i for i in measured if table[i]["kv_cache_fraction"] <= target.value + 1e-12]
    return sorted(ok, key=lambda i: table[i]["verified_loss_increase"])


def held_out_quality(loaded, quality: Quality, plan, eval_texts, batch_size, progress) -> dict:
    """The chosen plan against the source on the test rows (seen by no step of the search) and on held-out files."""
    from llmdrop.passes.evaluation import perplexity
    from llmdrop.planning.select import removed
    from llmdrop.source.calibration import load_texts, max_positions, tokens_from_texts

    base_test, test = quality.loss(None, "test"), quality.loss(plan, "test")
    out = {
        "test_perplexity": {"source": math.exp(base_test), "plan": math.exp(test)},
        "test_perplexity_increase": math.expm1(test - base_test),
    }
    texts = {}
    seq_len = min(EVAL_SEQ_LEN, max_positions(loaded.model.config) or EVAL_SEQ_LEN)  # as `llmdrop eval`
    for path in eval_texts:
        ids = tokens_from_texts(
            load_texts(path), loaded.tokenizer, samples=None, seq_len=seq_len, purpose="evaluation"
        )[:EVAL_SAMPLES]
        source = perplexity(loaded.model, ids, batch_size=batch_size, progress=False)["perplexity"]
        with removed(loaded.model, loaded.adapter, **plan.sublayers()):
            dropped = perplexity(loaded.model, ids, batch_size=batch_size, progress=False)["perplexity"]
        texts[str(path)] = {"source": source, "plan": dropped, "tokens": ids.numel()}
    if texts:
        out["eval_texts"] = texts
    return out


# ---------------------------------------------------------------------------------------------- the report


def missed(report: dict, target: Target) -> str:
    """The one error line of a target not met: the plans measured again, else the best verified plan."""
    best = report.get("best_found")
    found = f"the best plan found was {best['plan']}" if best else "no plan the search verified met it"
    again = [r for r in report["plans"] if "confirmed_speedup" in r]
    if again:
        found = "; ".join(
            f"{r['plan']} measured {r['measured_speedup']:.3f}x, then {r['confirmed_speedup']:.3f}x" for r in again
        )
    return f"target not met ({target.describe()}): {found}; nothing written"


def summary_lines(report: dict) -> list[str]:
    """The verified plans and the outcome, as the command prints them."""
    costs = report["cost_model"]
    speed = "measured" if report["speed_measured"] else "analytic"
    lines = [f"{'ppl ratio':>9} {'predicted':>9} {speed:>9} {'again':>7} {'KV':>5}  plan (verified on held-out rows)"]
    for r in sorted(report["plans"], key=lambda r: r["predicted_speedup"]):
        measured = f"{r['measured_speedup']:.3f}x" if "measured_speedup" in r else "-"
        again = f"{r['confirmed_speedup']:.3f}x" if "confirmed_speedup" in r else "-"
        lines.append(
            f"{r['verified_perplexity_ratio']:>9.3f} {r['predicted_speedup']:>8.3f}x {measured:>9} {again:>7} "
            f"{r['kv_cache_fraction']:>5.0%}  {r['plan']}"
        )
    chosen = report["chosen"]
    if chosen:
        t = chosen["test_perplexity"]
        lines.append(
            f"chosen: {chosen['plan']}: {chosen['confirmed_speedup']:.3f}x measured again ({speed}; {costs['unit']}), "
            f"KV cache "
            f"{chosen['kv_cache_fraction']:.0%}, test perplexity {t['source']:.2f} -> {t['plan']:.2f} "
            f"({chosen['test_perplexity_increase']:+.1%})"
        )
        for path, e in chosen.get("eval_texts", {}).items():
            lines.append(f"  {Path(path).name}: perplexity {e['source']:.2f} -> {e['plan']:.2f}")
    cost = report["search_cost"]
    lines.append(
        f"search cost: {cost['forward_passes']} forward passes of {cost['tokens_per_forward_pass']} tokens, "
        f"{cost['seconds']['total']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in cost["seconds"].items() if k != "total")
        + ")"
    )
    return lines


def markdown(report: dict) -> str:
    """The verified plans as a Markdown table."""
    head = [
        "| plan | verified perplexity ratio | predicted speedup | measured speedup | measured again | KV cache "
        "| found by |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = [
        f"| {r['plan']} | {r['verified_perplexity_ratio']:.3f} | {r['predicted_speedup']:.3f} | "
        + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in ("measured_speedup", "confirmed_speedup"))
        + f" | {r['kv_cache_fraction']:.0%} | {r['found_by']} |"
        for r in sorted(report["plans"], key=lambda r: r["predicted_speedup"])
    ]
    return "\n".join([*head, *rows]) + "\n"


def plot(report: dict, path: Path) -> None:
    """Verified perplexity ratio against speedup (measured where measured), the frontier and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["plans"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [r["predicted_speedup"] for r in rows],
        [r["verified_perplexity_ratio"] for r in rows],
        c="lightgray",
        label="verified plans (predicted speed)",
    )
    measured = [r for r in rows if "measured_speedup" in r]
    front = pareto(measured, "measured_speedup")
    engine = report["engine"] if report["speed_measured"] else "the analytic bound"
    ax.scatter(
        [r["measured_speedup"] for r in measured],
        [r["verified_perplexity_ratio"] for r in measured],
        c="tab:blue",
        label=f"measured on {engine}",
    )
    ax.plot(
        [r["measured_speedup"] for r in front],
        [r["verified_perplexity_ratio"] for r in front],
        "-",
        c="tab:blue",
        label="frontier (measured)",
    )
    if report["chosen"]:
        c = report["chosen"]
        ax.plot(
            [c["confirmed_speedup"]], [c["verified_perplexity_ratio"]], "r*", ms=14, label="chosen (measured again)"
        )
    t = report["target"]
    if t["kind"] == "speedup":
        ax.axvline(t["value"], color="r", ls=":", label="target")
    elif t["kind"] == "loss":
        ax.axhline(1 + t["value"], color="r", ls=":", label="target")
    ax.set_yscale("log")
    ax.set_xlabel("speedup of the workload")
    ax.set_ylabel("perplexity / source's (verify rows)")
    ax.set_title(f"llmdrop auto: {t['asked']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_settings(splits: dict[str, int], **counts) -> None:
    """One line for a count the search cannot work with, before any model work."""
    for split in SPLITS:
        if splits[split] < 1:
            raise LlmdropError(f"--{split}-rows must be >= 1 (got {splits[split]})")
    for name, value in counts.items():
        low = {"refine": 0, "seq_len": 2}.get(name, 1)
        if value < low:
            raise LlmdropError(f"--{name.replace('_', '-')} must be >= {low} (got {value})")


def calibration_rows(loaded, source: str, seq_len: int, rows: int, seed: int):
    """[rows, seq_len] tokens: sampled from the model (``self``, ``rows`` of them), or every non-overlapping block of
    the text (the splits take what they need)."""
    from llmdrop.source.calibration import calibration_tokens, check_seq_len

    check_seq_len(seq_len, loaded.model.config)
    samples = rows if source == "self" else None
    return calibration_tokens(source, loaded.tokenizer, samples=samples, seq_len=seq_len, seed=seed, model=loaded.model)


def write_report(report: dict, out: Path) -> None:
    """auto.json (everything), auto.md (the table), auto.png (the frontier) beside the export."""
    from llmdrop.files import atomic_write_text, write_json

    write_json(report, out / "auto.json")
    atomic_write_text(out / "auto.md", markdown(report))
    plot(report, out / "auto.png")
