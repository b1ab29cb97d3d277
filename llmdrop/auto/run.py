"""`llmdrop auto` from start to report: load, split the calibration rows, measure the cost model, search, measure the
speed of the verified plans on the engine, measure the chosen plan on the test rows (and held-out files), report.
The export is `api.auto`'s, once the target is met."""

import math
import time
from dataclasses import asdict
from pathlib import Path

from llmdrop.errors import LlmdropError

from .costs import Workload, cost_model
from .search import SPLITS, Quality, Target, incumbent, pareto, search, split_rows

EXPORT_FORMATS = {"llama.cpp": "gguf", "transformers": "auto"}
EVAL_SEQ_LEN, EVAL_SAMPLES = 512, 12


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

    result = search(
        loaded, quality, costs, target, candidates=candidates, verify=verify, refine=refine, progress=progress
    )
    seconds.update(result.seconds)
    table = [v.row(costs) for v in result.verified]
    say(f"searched: {len(result.deltas)} single-part losses, {len(table)} plans verified on held-out rows")

    # the speed of the verified plans that matter, measured side by side on the engine (the source first)
    start = time.perf_counter()
    benched = plans_to_bench(table, target, result.best, bench_plans)
    drop_plans = {"base": as_drop_plan_of(None, n)}
    drop_plans.update({f"plan{i}": as_drop_plan_of(table[i], n) for i in benched})
    times, bench_report = meter.measure(drop_plans, progress=progress)
    for i in benched:
        table[i]["measured_speedup"] = round(times["base"] / times[f"plan{i}"], 6)
    seconds["speed of the verified plans"] = time.perf_counter() - start

    chosen = choose(table, target)
    report = {
        "target": {"kind": target.kind, "value": target.value, "asked": target.describe()},
        "engine": engine,
        "workload": costs.workload,
        "cost_model": asdict(costs),
        "speed_measured": not meter.analytic,
        "calibration": {"source": calib, "rows": len(rows), "seq_len": seq_len, "splits": splits, "seed": seed},
        "candidates": {f"{k}{i}": round(d, 6) for (k, i), d in sorted(result.deltas.items(), key=lambda kv: kv[1])},
        "plans": table,
        "refinement": result.refinement,
        "chosen": None,
        "met": chosen is not None,
    }
    if chosen is None:
        best = incumbent(result.verified, costs, target)
        report["best_found"] = best.row(costs) if best else None
    else:
        start = time.perf_counter()
        plan = table[chosen]
        held_out = held_out_quality(loaded, quality, result, plan, eval_texts, batch_size, progress)
        seconds["held-out quality"] = time.perf_counter() - start
        report["chosen"] = {**plan, **held_out, "format": export_format(engine, as_drop_plan_of(plan, n))}
    seconds["total"] = time.perf_counter() - started
    report["search_cost"] = {
        "forward_passes": quality.forward_passes,
        "tokens_per_forward_pass": int(rows.shape[1]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if bench_report is not None:
        report["bench"] = {k: bench_report[k] for k in ("engine", "device", "settings", "versions")}
    return report


def as_drop_plan_of(row: dict | None, num_layers: int):
    from llmdrop.planning.plan import DropPlan

    if row is None:
        return DropPlan(num_layers)
    return DropPlan(num_layers, **row["lists"], method="auto")


def plans_to_bench(table: list[dict], target: Target, best, limit: int) -> list[int]:
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


def choose(table: list[dict], target: Target) -> int | None:
    """The plan that meets the target by *measured* speed (KV: exact; loss: verified) and is best at the rest."""
    measured = [i for i, r in enumerate(table) if "measured_speedup" in r]
    if target.kind == "speedup":
        ok = [i for i in measured if table[i]["measured_speedup"] >= target.value]
        return min(ok, key=lambda i: table[i]["verified_loss_increase"], default=None)
    if target.kind == "kv":
        ok = [i for i in measured if table[i]["kv_cache_fraction"] <= target.value + 1e-12]
        return min(ok, key=lambda i: table[i]["verified_loss_increase"], default=None)
    ok = [i for i in measured if table[i]["verified_loss_increase"] <= target.loss_budget]
    return max(ok, key=lambda i: table[i]["measured_speedup"], default=None)


def held_out_quality(loaded, quality: Quality, result, row: dict, eval_texts, batch_size, progress) -> dict:
    """The chosen plan against the source on the test rows (seen by no step of the search) and on held-out files."""
    from llmdrop.passes.evaluation import perplexity
    from llmdrop.planning.select import removed
    from llmdrop.source.calibration import load_texts, tokens_from_texts

    plan = next(v.plan for v in result.verified if v.plan.lists() == row["lists"])
    base_test, test = quality.loss(None, "test"), quality.loss(plan, "test")
    out = {
        "test_perplexity": {"source": math.exp(base_test), "plan": math.exp(test)},
        "test_perplexity_increase": math.expm1(test - base_test),
    }
    texts = {}
    lists = plan.lists()
    for path in eval_texts:
        ids = tokens_from_texts(
            load_texts(path), loaded.tokenizer, samples=None, seq_len=EVAL_SEQ_LEN, purpose="evaluation"
        )[:EVAL_SAMPLES]
        source = perplexity(loaded.model, ids, batch_size=batch_size, progress=False)["perplexity"]
        attn, mlp = sorted({*lists["attn"], *lists["blocks"]}), sorted({*lists["mlp"], *lists["blocks"]})
        with removed(loaded.model, loaded.adapter, attn=attn, mlp=mlp):
            dropped = perplexity(loaded.model, ids, batch_size=batch_size, progress=False)["perplexity"]
        texts[str(path)] = {"source": source, "plan": dropped, "tokens": ids.numel()}
    if texts:
        out["eval_texts"] = texts
    return out


# ---------------------------------------------------------------------------------------------- the report


def summary_lines(report: dict) -> list[str]:
    """The verified plans and the outcome, as the command prints them."""
    costs = report["cost_model"]
    speed = "measured" if report["speed_measured"] else "analytic"
    lines = [f"{'ppl ratio':>9} {'predicted':>9} {speed:>9} {'KV':>5}  plan (verified on held-out rows)"]
    for r in sorted(report["plans"], key=lambda r: r["predicted_speedup"]):
        measured = f"{r['measured_speedup']:.3f}x" if "measured_speedup" in r else "-"
        lines.append(
            f"{r['verified_perplexity_ratio']:>9.3f} {r['predicted_speedup']:>8.3f}x {measured:>9} "
            f"{r['kv_cache_fraction']:>5.0%}  {r['plan']}"
        )
    chosen = report["chosen"]
    if chosen:
        t = chosen["test_perplexity"]
        lines.append(
            f"chosen: {chosen['plan']}: {chosen['measured_speedup']:.3f}x ({speed}; {costs['unit']}), KV cache "
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
        "| plan | verified perplexity ratio | predicted speedup | measured speedup | KV cache | found by |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rows = [
        f"| {r['plan']} | {r['verified_perplexity_ratio']:.3f} | {r['predicted_speedup']:.3f} | "
        + (f"{r['measured_speedup']:.3f}" if "measured_speedup" in r else "-")
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
    ax.plot(
        [r["measured_speedup"] for r in front],
        [r["verified_perplexity_ratio"] for r in front],
        "o-",
        label="measured on " + (report["engine"] if report["speed_measured"] else "the analytic bound"),
    )
    if report["chosen"]:
        c = report["chosen"]
        ax.plot([c["measured_speedup"]], [c["verified_perplexity_ratio"]], "r*", ms=14, label="chosen")
    t = report["target"]
    if t["kind"] == "speedup":
        ax.axvline(t["value"], color="r", ls=":", label="target")
    elif t["kind"] == "loss":
        ax.axhline(1 + t["value"], color="r", ls=":", label="target")
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
