"""Selectors and compensations over several calibration sets and held-out texts of different kinds, with the spread.

    python scripts/compensation_study.py select --out docs/compensation-study-smollm2.json     # the plans
    python scripts/compensation_study.py evaluate --out docs/compensation-study-smollm2.json   # perplexities
    python scripts/compensation_study.py table --out docs/compensation-study-smollm2.json      # markdown

``select`` chooses a plan per calibration setting (``--settings 16x256:0,...``: samples x length : seed of
``llmdrop/data/english_sample.txt``), budget and selector with the functions ``llmdrop drop`` calls. ``evaluate``
applies each plan with the export's own code after each compensation (none, ``--compensate linear`` for plans with
blocks, ``--compensate scale``, and LinearPatch's rotate-scale, which this study applies as a hook because it cannot
be folded into the weights: see docs/selection.md) fitted on the same calibration tokens, and measures held-out
perplexity on the first 12 blocks of 512 tokens of each text. Both phases keep what they measured in ``--out`` and
skip it when run again. The "python-docs" text is the prose of Python's own reference (``pydoc_data.topics``).
"""

import argparse
import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmdrop.passes.evaluation import perplexity
from llmdrop.passes.runner import Collector, run
from llmdrop.passes.scoring import compute_importance
from llmdrop.planning.plan import DropPlan, sublayer_runs
from llmdrop.planning.rescale import hook_run_ends
from llmdrop.planning.surgery import apply_plan
from llmdrop.request import choose
from llmdrop.source.calibration import CalibSpec, load_texts, tokens_from_texts
from llmdrop.source.models import LoadSpec

BUDGETS = {"8 blocks": {"blocks": 8}, "8 attention": {"attn": 8}, "12 sublayers": {"joint": 12}}
# --select loss settings of docs/selection.md: 4 blocks per evaluation and 2 x count candidates for blocks; the
# sublayer budgets use 1 block and count + 2 candidates
LOSS = {"8 blocks": {"loss_samples": 4}, "8 attention": {"loss_samples": 1, "candidates": 10},
        "12 sublayers": {"loss_samples": 1, "candidates": 14}}  # fmt: skip
SELECTORS = ("cosine", "loss", "angular-contiguous", "gate-norm")
# english_sample.txt at two sizes and several seeds, and text sampled from the model itself (`--calib self`)
SETTINGS = ("16x256:0", "16x256:1", "8x256:1", "8x256:2", "self/16x256:0")
# a selector evaluated with fewer compensations: the contiguous cut and the data-free score lose without one
# (docs/selection.md), rotate-scale is measured on cosine's plans
ONLY = {"angular-contiguous": ("none", "scale"), "gate-norm": ("none", "scale"), "loss": ("none", "linear", "scale")}
TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py", "python-docs")
COMPENSATIONS = ("none", "linear", "scale", "rotate-scale")


def held_out_texts(path: str) -> list[str]:
    if path == "python-docs":
        from pydoc_data.topics import topics

        return ["\n\n".join(topics[k] for k in sorted(topics))]
    return load_texts(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("select", "evaluate", "table"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="llmdrop/data/english_sample.txt")
    p.add_argument("--settings", default=",".join(SETTINGS), help="[SOURCE/]SAMPLESxLEN:SEED, SOURCE: --calib")
    p.add_argument("--selectors", default=",".join(SELECTORS))
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--compensations", default=",".join(COMPENSATIONS))
    p.add_argument("--eval", action="append", help=f"held-out text (repeat) [default: {', '.join(TEXTS)}]")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {"model": args.model, "plans": [], "rows": []}
    if args.phase == "table":
        print(table(state))
        return

    def save():  # after every step: an interrupted run keeps what it measured
        out.write_text(json.dumps(state, indent=1) + "\n")

    loaded = LoadSpec(args.model, device="cpu").load()
    state["threads"] = torch.get_num_threads()
    for setting in args.settings.split(","):
        source, _, size = setting.rpartition("/")
        size, seed = size.split(":")
        samples, seq_len = map(int, size.split("x"))
        calib = CalibSpec.of(CalibSpec(source or args.calib, samples, seq_len, seed=int(seed)))
        tokens = calib.tokens(loaded.tokenizer, loaded.model)
        if args.phase == "select":
            select(state, save, loaded, tokens, setting, args)
        else:
            evaluate(state, save, loaded, tokens, setting, args)


def select(state, save, loaded, tokens, setting, args) -> None:
    importance = compute_importance(loaded.model, loaded.adapter, tokens, progress=False)
    for budget in args.budgets.split(","):
        for name in args.selectors.split(","):
            if (name == "angular-contiguous" and budget != "8 blocks") or (
                name == "gate-norm" and budget != "8 attention"
            ):
                continue
            if any(r["setting"] == setting and r["budget"] == budget and r["selector"] == name for r in state["plans"]):
                continue
            work = replace(loaded, model=copy.deepcopy(loaded.model))
            start = time.perf_counter()
            options = LOSS[budget] if name == "loss" else {}
            scores = importance
            if name == "gate-norm":  # data-free: its own scores, then cosine's way of picking the lowest
                scores = compute_importance(work.model, work.adapter, tokens, metric="gate-norm", progress=False)
            plan, record = choose("cosine" if name == "gate-norm" else name, work, tokens, importance=scores,
                                  **BUDGETS[budget], **options, progress=False)  # fmt: skip
            seconds = round(time.perf_counter() - start, 1)
            row = {"setting": setting, "budget": budget, "selector": name, "plan": plan.to_dict(), "seconds": seconds,
                   "forward_passes": record.get("forward_passes")}  # fmt: skip
            state["plans"].append(row)
            print(json.dumps(row), flush=True)
            save()


def evaluate(state, save, loaded, tokens, setting, args) -> None:
    from llmdrop.planning.compensate import compensate

    texts = args.eval or list(TEXTS)
    held_out = {
        path: tokens_from_texts(
            held_out_texts(path), loaded.tokenizer, samples=None, seq_len=512, purpose="evaluation"
        )[:12]
        for path in texts
    }
    for entry in state["plans"]:
        if entry["setting"] != setting or entry["budget"] not in args.budgets.split(","):
            continue
        plan = DropPlan(**{k: v for k, v in entry["plan"].items() if k in ("num_layers", "blocks", "attn", "mlp")})
        for method in args.compensations.split(","):
            if (method == "linear" and not plan.blocks) or method not in ONLY.get(entry["selector"], COMPENSATIONS):
                continue
            key = (setting, entry["budget"], entry["selector"], method)
            row = next((r for r in state["rows"] if tuple(r["key"]) == key), None)
            todo = [t for t in texts if row is None or t not in row["perplexity"]]
            if not todo:
                continue
            twin = same_plan_row(state, entry, method)
            if twin is not None:  # another selector chose the same parts: the same model, the same numbers
                state["rows"] = [r for r in state["rows"] if r is not row]
                state["rows"].append({**twin, "key": list(key), "same_plan_as": twin["key"]})
                save()
                continue
            model = copy.deepcopy(loaded.model)
            work = replace(loaded, model=model)
            start, record, handles = time.perf_counter(), None, []
            if method == "rotate-scale":
                handles = linear_patch(work, plan, tokens)
            elif method != "none":
                record, _ = compensate(method, work, plan, tokens, progress=False)
            seconds = round(time.perf_counter() - start, 1)
            apply_plan(model, loaded.adapter, plan)
            ppl = {t: round(perplexity(model, held_out[t], progress=False)["perplexity"], 2) for t in todo}
            for h in handles:
                h.remove()
            if row is None:
                row = {"key": list(key), "seconds": seconds, "record": record, "perplexity": {}}
                state["rows"].append(row)
            row["perplexity"].update(ppl)
            print(json.dumps({"key": key, "perplexity": row["perplexity"]}), flush=True)
            save()
            del model, work


def same_plan_row(state, entry, method: str) -> dict | None:
    """The row of ``method`` already measured on the same setting for an identical plan, if any."""
    lists = ("blocks", "attn", "mlp")
    for other in state["plans"]:
        if other is entry or other["setting"] != entry["setting"]:
            continue
        if all(other["plan"][k] == entry["plan"][k] for k in lists):
            key = [other["setting"], other["budget"], other["selector"], method]
            row = next((r for r in state["rows"] if r["key"] == key and "same_plan_as" not in r), None)
            if row is not None:
                return row
    return None


# --------------------------------------------------------------------------- LinearPatch (study only)


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n = 12^k 2^m: Kronecker products of Paley's order 12 and Sylvester's
    order 2 (SmolLM2's 576 = 12 x 12 x 4)."""
    residues = {(i * i) % 11 for i in range(1, 11)}
    jacobsthal = [
        [0.0 if i == j else (1.0 if (j - i) % 11 in residues else -1.0) for j in range(11)] for i in range(11)
    ]
    h12 = torch.eye(12, dtype=torch.float64)
    h12[0, 1:], h12[1:, 0], h12[1:, 1:] = 1.0, -1.0, h12[1:, 1:] + torch.tensor(jacobsthal, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    out, rest = torch.ones(1, 1, dtype=torch.float64), n
    while rest & (rest - 1) and rest % 12 == 0:
        out, rest = torch.kron(out, h12), rest // 12
    if rest & (rest - 1):
        raise ValueError(f"no Hadamard construction here for order {n}")
    while rest > 1:
        out, rest = torch.kron(out, h2), rest // 2
    return out / math.sqrt(n)


class RotatedMagnitudes(Collector):
    """Per channel of the Hadamard-rotated stream, the sum over tokens of |x H| before and after a run (at the
    points where ``--compensate scale`` measures its alpha)."""

    def __init__(self, first: int, last: int, h: torch.Tensor):
        self.first, self.last, self.h = first, last, h
        self.sums = {"before": 0.0, "after": 0.0}

    def attach(self, layer, index, adapter, step) -> list:
        return hook_run_ends(layer, index, adapter, self.first, self.last,
                             lambda x: self.add("before", x), lambda x: self.add("after", x))  # fmt: skip

    def add(self, where: str, stream: torch.Tensor) -> None:
        self.sums[where] = self.sums[where] + (stream.double() @ self.h).abs().reshape(-1, self.h.shape[0]).sum(0)


@torch.no_grad()
def linear_patch(loaded, plan: DropPlan, tokens) -> list:
    """LinearPatch (Chen et al., NeurIPS 2025), training-free: at each cut, P = H diag(d) H^T with d the ratio of the
    mean absolute Hadamard-rotated residual stream after the dropped run to that before it (their
    ``get_scale_params``), fitted run after run on the model with the earlier runs dropped and patched (they fit
    one contiguous run on the original model); applied as a hook on the stream at the cut, as their code does."""
    from llmdrop.planning.select import removed

    model, adapter = loaded.model, loaded.adapter
    layers = adapter.layer_list(model)
    h = hadamard(model.config.hidden_size)
    handles, attn, mlp = [], [], []

    def patch(p):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = kwargs["hidden_states"] @ p
                return args, kwargs
            return (args[0] @ p, *args[1:]), kwargs

        return hook

    for first, last in sublayer_runs(plan):
        stats = RotatedMagnitudes(first, last, h)
        with removed(model, adapter, attn=attn, mlp=mlp):
            run(loaded, tokens, [stats], progress=False, until=last // 2)
        p = (h @ torch.diag(stats.sums["after"] / stats.sums["before"]) @ h.T).float()
        at = last // 2 if last % 2 == 0 else last // 2 + 1  # after an attention run its layer's MLP reads the input
        target = layers[at] if at < len(layers) else model.get_submodule(adapter.final_norm)
        handles.append(target.register_forward_pre_hook(patch(p), with_kwargs=True))
        attn += [q // 2 for q in range(first, last + 1) if q % 2 == 0]
        mlp += [q // 2 for q in range(first, last + 1) if q % 2 == 1]
    return handles


# --------------------------------------------------------------------------- table


def table(state) -> str:
    """Per budget: median (min-max) perplexity over the calibration settings of every (selector, compensation) on
    every text, how many settings it was measured on, and in how many (setting, text) pairs it beat the same
    selector without compensation and cosine without compensation."""
    import statistics

    texts = sorted(
        {t for r in state["rows"] for t in r["perplexity"]}, key=lambda t: TEXTS.index(t) if t in TEXTS else 9
    )
    ppl = {tuple(r["key"]): r["perplexity"] for r in state["rows"]}
    lines = []
    for budget in BUDGETS:
        names = " | ".join(Path(t).name for t in texts)
        lines += ["", f"**{budget}**", "", f"| selector | compensation | n | {names} | beats no comp. | beats cosine |",
                  "|---|---|--:|" + "---:|" * len(texts) + "--:|--:|"]  # fmt: skip
        for name in SELECTORS:
            for method in COMPENSATIONS:
                keys = [k for k in ppl if k[1:] == (budget, name, method)]
                if not keys:
                    continue
                cells = []
                for t in texts:
                    v = [ppl[k][t] for k in keys if t in ppl[k]]
                    cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-")
                wins = {}
                for ref in ((name, "none"), ("cosine", "none")):
                    pairs = [(ppl[k][t], ppl[(k[0], budget, *ref)][t]) for k in keys for t in texts
                             if (k[0], budget, *ref) in ppl and t in ppl[k]]  # fmt: skip
                    wins[ref] = "-" if (name, method) == ref else f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
                lines.append(f"| {name} | {method} | {len(keys)} | " + " | ".join(cells)
                             + f" | {wins[(name, 'none')]} | {wins[('cosine', 'none')]} |")  # fmt: skip
    lines += ["", "**Head to head** (A beats B in k of n (setting, text) pairs measured for both; median of A / B)", "",
              "| budget | A | B | A beats B | median A / B |", "|---|---|---|--:|--:|"]  # fmt: skip
    for budget in BUDGETS:
        for a, b in HEAD_TO_HEAD:
            pairs = [(ppl[k][t], ppl[(k[0], budget, *b)][t]) for k in ppl if k[1:] == (budget, *a) for t in texts
                     if (k[0], budget, *b) in ppl and t in ppl[k] and t in ppl[(k[0], budget, *b)]]  # fmt: skip
            if pairs:
                ratio = statistics.median(x / y for x, y in pairs)
                lines.append(f"| {budget} | {' + '.join(a)} | {' + '.join(b)} | {sum(x < y for x, y in pairs)}/"
                             f"{len(pairs)} | {ratio:.3f} |")  # fmt: skip
    return "\n".join(lines)


HEAD_TO_HEAD = [
    (("cosine", "scale"), ("cosine", "none")),
    (("cosine", "scale"), ("cosine", "linear")),
    (("cosine", "scale"), ("cosine", "rotate-scale")),
    (("cosine", "linear"), ("cosine", "none")),
    (("loss", "none"), ("cosine", "none")),
    (("loss", "scale"), ("cosine", "scale")),
    (("loss", "scale"), ("cosine", "none")),
]


if __name__ == "__main__":
    main()
