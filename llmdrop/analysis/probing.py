"""`llmdrop probe` and `llmdrop inject`: the experiments of "Attend First, Consolidate Later".

Scoring, for a prompt and its gold answer under a manipulation (see llmdrop.analysis.manipulate for the numbering):

- The answer continues the prompt: ``" " + answer`` unless the prompt ends with (or the answer starts with)
  whitespace; its tokens are ``tokenizer(continuation, add_special_tokens=False)``.
- greedy answer: tokens are generated greedily with the manipulation applied at *every* step, each step a full
  forward without KV cache over prompt + tokens so far (so the previous tokens are always 0..n-2 of the
  current sequence). Generation stops as soon as the answer is decided (its normalised text starts with a
  candidate, or no candidate can start with it any more, or a newline / EOS ends it), at most
  len(answer tokens) + 2 steps. Normalisation: NFKD, accents dropped, lower case, only letters and digits kept.
- accuracy: the fraction of prompts whose greedy answer starts with the gold answer (normalised).
- gold log-prob: sum over the gold answer tokens of log p(token | prompt + earlier gold tokens), teacher-forced,
  each term computed like a generation step (the manipulation applied to all tokens but the last of that
  context); averaged over prompts (natural log).

Nothing is cached between forwards (correctness first: a cached previous token would have been computed when
it was still the unmanipulated last token).
"""

import json
import random
import re
import unicodedata
from contextlib import nullcontext
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError
from llmdrop.files import DATA_DIR, JSON, atomic_file, check_outputs, plot_suffixes, write_json
from llmdrop.planning.plan import parse_layers
from llmdrop.record import INJECT_FORMAT, PROBE_FORMAT
from llmdrop.source.models import ModelArg, as_loaded, model_input

from .manipulate import KINDS, PREVIOUS_TOKEN_KINDS, Manipulation, capture_layer_inputs, last_logits

CAPITALS_FILE = DATA_DIR / "capitals.jsonl"
# One-shot Q/A template as in the paper; France is the shot, so it is not among the questions. The answer restates
# the question: with a bare "A: Paris" shot SmolLM2-135M mostly repeats the country (5% vs 52% accuracy).
CAPITALS_TEMPLATE = (
    "Q: What is the capital of France?\nA: The capital of France is Paris.\n"
    "Q: What is the capital of {country}?\nA: The capital of {country} is"
)
LAYER_NOTE = "layer k manipulates x^k, the input of decoder layer k (hidden_states[k] in transformers' numbering)"


# ------------------------------------------------------------------------------------------------ tasks


def capitals() -> list[dict]:
    """The built-in task: {"prompt", "answer", "word" (the country)} for every country in data/capitals.jsonl."""
    rows = [json.loads(line) for line in CAPITALS_FILE.read_text().splitlines() if line.strip()]
    return [
        {"prompt": CAPITALS_TEMPLATE.format(country=r["country"]), "answer": r["capital"], "word": r["country"]}
        for r in rows
    ]


def load_prompt_task(task: str = "capitals", samples: int | None = None, seed: int = 0) -> list[dict]:
    """'capitals' or a JSONL file of {"prompt": str, "answer": str}; ``samples`` picks a seeded subset."""
    if task == "capitals":
        items = capitals()
    else:
        path = Path(task)
        if not path.is_file():
            raise LlmdropError(f"task file not found: {task} (use 'capitals' or a JSONL file of prompt/answer)")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                assert isinstance(item.get("prompt"), str) and isinstance(item.get("answer"), str)
            except (json.JSONDecodeError, AssertionError, AttributeError):
                raise LlmdropError(f"{task}:{n}: expected a JSON object with string fields prompt and answer") from None
            items.append(item)
        if not items:
            raise LlmdropError(f"{task} holds no examples")
    if samples is not None:
        if samples < 1:
            raise LlmdropError(f"--samples must be >= 1 (got {samples})")
        if samples < len(items):
            keep = sorted(random.Random(seed).sample(range(len(items)), samples))
            items = [items[i] for i in keep]
    return items


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text.lower() if c.isalnum() and not unicodedata.combining(c))


def continuation(prompt: str, answer: str) -> str:
    return answer if prompt[-1:].isspace() or answer[:1].isspace() else " " + answer


# ------------------------------------------------------------------------------------------------ forwards


def _pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _run_rows(model, seqs, wanted, *, pad_id, batch_size, manip=None, row_items=None):
    """Next-token (argmax id, {token: log-prob} for the wanted tokens) after each sequence, batched by length."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
    top, lps = [None] * len(seqs), [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = _pad_left([seqs[r] for r in chunk], pad_id, device)
        if manip is not None:
            manip.rows = None if row_items is None else [row_items[r] for r in chunk]
        logprobs = torch.log_softmax(last_logits(model, ids, mask), dim=-1).cpu()
        for i, r in enumerate(chunk):
            top[r] = int(logprobs[i].argmax())
            lps[r] = {t: float(logprobs[i, t]) for t in wanted[r]}
    return top, lps


def _decide(text: str, candidates: list[str], complete: bool) -> int | None:
    """Index of the candidate the answer starts with, -1 if none can match any more, None if undecided."""
    answer = normalise(text.split("\n")[0])
    complete = complete or "\n" in text
    for c, cand in enumerate(candidates):
        if normalise(cand) and answer.startswith(normalise(cand)):
            return c
    if not complete and any(normalise(c).startswith(answer) for c in candidates):
        return None
    return -1


def evaluate_items(
    model, tokenizer, items: list[dict], manip: Manipulation | None = None, *, batch_size: int = 32
) -> list[dict]:
    """For encoded items {"ids", "cands": [token lists], "cand_texts"}: the greedy answer (which candidate it
    starts with: "match", -1 for none), its first token and each candidate's teacher-forced log-prob.
    ``manip`` (not yet applied) is applied for the duration of the call."""
    with manip if manip is not None else nullcontext():
        return _evaluate_items(model, tokenizer, items, manip, batch_size)


def _evaluate_items(model, tokenizer, items, manip, batch_size):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    # teacher-forced rows: prompt + cand[:j] -> cand[j]; all candidates share the row prompt -> (first greedy step)
    row_of, seqs, wanted, row_items = {}, [], [], []
    for i, item in enumerate(items):
        for cand in item["cands"] or [[]]:
            for j in range(max(len(cand), 1)):
                key = (i, tuple(cand[:j]))
                if key not in row_of:
                    row_of[key] = len(seqs)
                    seqs.append(item["ids"] + cand[:j])
                    wanted.append(set())
                    row_items.append(i)
                if j < len(cand):
                    wanted[row_of[key]].add(cand[j])
    top, lps = _run_rows(model, seqs, wanted, pad_id=pad_id, batch_size=batch_size, manip=manip, row_items=row_items)
    results = []
    for i, item in enumerate(items):
        cand_lp = [sum(lps[row_of[(i, tuple(c[:j]))]][c[j]] for j in range(len(c))) for c in item["cands"]]
        first = top[row_of[(i, ())]]
        results.append(
            {
                "gen": [first],
                "cand_logprobs": cand_lp,
                "match": None,
                "max_steps": max((len(c) for c in item["cands"]), default=1) + 2,
            }
        )
    # greedy generation, one full forward per step, only for the undecided rows
    while True:
        open_rows = []
        for i, (item, res) in enumerate(zip(items, results)):
            if res["match"] is not None:
                continue
            complete = res["gen"][-1] == eos or len(res["gen"]) >= res["max_steps"]
            res["match"] = _decide(tokenizer.decode(res["gen"], skip_special_tokens=True), item["cand_texts"], complete)
            if res["match"] is None:
                open_rows.append(i)
        if not open_rows:
            break
        top, _ = _run_rows(
            model,
            [items[i]["ids"] + results[i]["gen"] for i in open_rows],
            [set()] * len(open_rows),
            pad_id=pad_id,
            batch_size=batch_size,
            manip=manip,
            row_items=open_rows,
        )
        for i, t in zip(open_rows, top):
            results[i]["gen"].append(t)
    for res in results:
        res["text"] = tokenizer.decode(res["gen"], skip_special_tokens=True)
        res["first_token"] = tokenizer.decode(res["gen"][:1], skip_special_tokens=True).strip()
    return results


def generate(
    model,
    tokenizer,
    prompts: list[str],
    manip: Manipulation | None = None,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations with ``manip`` (not yet applied) re-applied at every step: each step is a full forward
    over prompt + tokens so far, without KV cache. Stops at EOS."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    gens: list[list[int]] = [[] for _ in prompts]
    with manip if manip is not None else nullcontext():
        for _ in range(max_new_tokens):
            rows = [i for i, g in enumerate(gens) if not g or g[-1] != tokenizer.eos_token_id]
            if not rows:
                break
            top, _ = _run_rows(
                model,
                [ids[i] + gens[i] for i in rows],
                [set()] * len(rows),
                pad_id=pad_id,
                batch_size=batch_size,
                manip=manip,
                row_items=rows,
            )
            for i, t in zip(rows, top):
                gens[i].append(t)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in gens]


def encode(tokenizer, prompt: str, answers: list[str]) -> dict:
    return {
        "ids": tokenizer(prompt)["input_ids"],
        "cand_texts": answers,
        "cands": [tokenizer(continuation(prompt, a), add_special_tokens=False)["input_ids"] for a in answers],
    }


# ------------------------------------------------------------------------------------------------ probe


def _kinds(manipulation: str | list[str]) -> list[str]:
    kinds = (
        list(PREVIOUS_TOKEN_KINDS)
        if manipulation == "all"
        else ([k.strip() for k in manipulation.split(",")] if isinstance(manipulation, str) else list(manipulation))
    )
    bad = [k for k in kinds if k not in PREVIOUS_TOKEN_KINDS]
    if bad or not kinds:
        raise LlmdropError(
            f"unknown manipulation {bad[0] if bad else manipulation!r}; choose from "
            f"{', '.join(PREVIOUS_TOKEN_KINDS)} or all (inject has its own command)"
        )
    return kinds


def _summary(results: list[dict]) -> dict:
    n = len(results)
    return {
        "accuracy": sum(r["match"] == 0 for r in results) / n,
        "gold_logprob": sum(r["cand_logprobs"][0] for r in results) / n,
    }


def _layers(layers, n: int) -> list[int]:
    if layers is None or layers == "":
        return list(range(n))
    text = ",".join(map(str, layers)) if isinstance(layers, (list, tuple)) else layers
    return parse_layers(text, n)


def _check_outputs(model, out, plot, overwrite, task=None) -> None:
    """probe / inject: the results JSON and the plot, before any model work."""
    task_file = task if task and Path(task).exists() else None
    check_outputs(
        {"--out": (out, JSON), "--plot": (plot, plot_suffixes() if plot else None)},
        overwrite=overwrite,
        inputs=[model_input(model), task_file],
    )


def probe(
    model: ModelArg = None,
    *,
    manipulation: str | list[str] = "all",
    task: str = "capitals",
    layers: str | list[int] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Task accuracy and gold log-prob with each manipulation applied from each layer, plus the baseline."""
    from tqdm.auto import tqdm

    _check_outputs(model, out, plot, overwrite, task)
    kinds = _kinds(manipulation)
    items = load_prompt_task(task, samples, seed)
    if isinstance(layers, str):
        parse_layers(layers)  # syntax errors before loading
    loaded = as_loaded(model)
    n = loaded.num_layers
    layer_list = _layers(layers, n)
    tok = loaded.tokenizer
    encoded = [encode(tok, it["prompt"], [it["answer"]]) for it in items]
    base = evaluate_items(loaded.model, tok, encoded, batch_size=batch_size)
    result = {
        "format": PROBE_FORMAT,
        "model": loaded.source,
        "task": task,
        "samples": len(items),
        "seed": seed,
        "num_layers": n,
        "layer_numbering": LAYER_NOTE,
        "baseline": _summary(base),
        "baseline_answers": [
            {
                "prompt": it["prompt"],
                "answer": it["answer"],
                "greedy": r["text"].split("\n")[0],
                "correct": r["match"] == 0,
            }
            for it, r in zip(items, base)
        ],
        "results": [],
    }
    configs = [(k, layer) for k in kinds for layer in layer_list]
    for kind, layer in tqdm(configs, desc="probe", unit="config", disable=not progress):
        res = evaluate_items(
            loaded.model, tok, encoded, Manipulation(loaded, kind, layer, seed=seed), batch_size=batch_size
        )
        result["results"].append({"manipulation": kind, "layer": layer, **_summary(res)})
    if out:
        write_json(result, out)
    if plot:
        plot_probe(result, plot)
    return result


def harmless_from(result: dict, kind: str, fraction: float = 0.9) -> int | None:
    """First layer k from which the manipulation stays within ``fraction`` of baseline accuracy for all k' >= k."""
    rows = sorted((r["layer"], r["accuracy"]) for r in result["results"] if r["manipulation"] == kind)
    bar = fraction * result["baseline"]["accuracy"]
    first = None
    for layer, acc in rows:
        if acc >= bar:
            first = layer if first is None else first
        else:
            first = None
    return first


# ------------------------------------------------------------------------------------------------ inject


def word_span(tokenizer, text: str, word: str) -> list[int]:
    """Token indices (of ``tokenizer(text)``, special tokens included) covering every whole-word occurrence of
    ``word`` in ``text``; found by character offsets, so " France" vs "France" tokenization does not matter."""
    matches = list(re.finditer(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text)) if word.strip() else []
    if not matches:
        raise LlmdropError(f"word {word!r} not found in {text!r}")
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    span = []
    for m in matches:
        start, end = m.span()
        tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if not tokens:
            raise LlmdropError(f"word {word!r} maps to no token of {text!r}")
        span += [i for i in tokens if i not in span]
    return span


def _donor_states(loaded, donor_ids, donor_spans, layer_list, batch_size):
    """x^k at the donor word tokens for every k: {k: [rows, S, d]} (no manipulation)."""
    device = next(loaded.model.parameters()).device
    width = max(len(s) for s in donor_spans)
    d = loaded.model.config.hidden_size
    states = {k: torch.zeros(len(donor_ids), width, d) for k in layer_list}
    pad_id = loaded.tokenizer.pad_token_id or 0
    for start in range(0, len(donor_ids), batch_size):
        rows = list(range(start, min(start + batch_size, len(donor_ids))))
        ids, mask = _pad_left([donor_ids[r] for r in rows], pad_id, device)
        with capture_layer_inputs(loaded) as inputs:
            last_logits(loaded.model, ids, mask)
        for i, r in enumerate(rows):
            offset = ids.shape[1] - len(donor_ids[r])  # left padding
            for k in layer_list:
                for s, p in enumerate(donor_spans[r]):
                    states[k][r, s] = inputs[k][i, offset + p].cpu()
    return states


def _check_lengths(tokenizer, prompt, word, donor, donor_word):
    span, dspan = word_span(tokenizer, prompt, word), word_span(tokenizer, donor, donor_word)
    if len(span) != len(dspan):
        raise LlmdropError(
            f"{word!r} is {len(span)} token(s) in the prompt but {donor_word!r} is {len(dspan)} in the "
            f"donor (all occurrences); injection swaps token for token, pick words of equal token length"
        )
    return span, dspan


def _positions(spans) -> torch.Tensor:
    width = max(len(s) for s in spans)
    return torch.tensor([s + [-1] * (width - len(s)) for s in spans], dtype=torch.long)


def inject(
    model: ModelArg = None,
    *,
    prompt: str | None = None,
    word: str | None = None,
    donor: str | None = None,
    donor_word: str | None = None,
    watch: str | list[str] | None = None,
    task: str | None = None,
    layers: str | list[int] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Information injection: at each layer k, the word's x^k in ``prompt`` becomes ``donor_word``'s x^k in
    ``donor``. Reports the top next token and the watched answers' log-probs per layer (or, with
    ``task="capitals"``, how often each country swap is followed over the whole set)."""
    if task is not None:
        if task != "capitals":
            raise LlmdropError("inject --task supports only the built-in capitals task")
        if any(v is not None for v in (prompt, word, donor, donor_word)):
            raise LlmdropError("give either --task capitals or --prompt/--word/--donor/--donor-word, not both")
    elif None in (prompt, word, donor, donor_word):
        raise LlmdropError("inject needs --prompt, --word, --donor and --donor-word (or --task capitals)")
    _check_outputs(model, out, plot, overwrite)
    if isinstance(layers, str):
        parse_layers(layers)
    watch_list = [w.strip() for w in watch.split(",")] if isinstance(watch, str) else list(watch or [])
    loaded = as_loaded(model)
    layer_list = _layers(layers, loaded.num_layers)
    if task is not None:
        result = _inject_task(loaded, layer_list, samples=samples, seed=seed, batch_size=batch_size, progress=progress)
    else:
        result = _inject_one(loaded, layer_list, prompt, word, donor, donor_word, watch_list, batch_size, progress)
    result = {"format": INJECT_FORMAT, "model": loaded.source, "layer_numbering": LAYER_NOTE, **result}
    if out:
        write_json(result, out)
    if plot:
        plot_inject(result, plot)
    return result


def _inject_one(loaded, layer_list, prompt, word, donor, donor_word, watch, batch_size, progress):
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    span, dspan = _check_lengths(tok, prompt, word, donor, donor_word)
    item = encode(tok, prompt, watch)
    states = _donor_states(loaded, [tok(donor)["input_ids"]], [dspan], layer_list, batch_size)
    positions = _positions([span])

    def row(res):
        return {"top_token": res["first_token"], "watch_logprobs": dict(zip(watch, res["cand_logprobs"]))}

    base = evaluate_items(loaded.model, tok, [item], batch_size=batch_size)[0]
    out = {
        "prompt": prompt,
        "word": word,
        "donor": donor,
        "donor_word": donor_word,
        "watch": watch,
        "word_tokens": [tok.decode([item["ids"][p]]) for p in span],
        "baseline": row(base),
        "layers": [],
    }
    for k in tqdm(layer_list, desc="inject", unit="layer", disable=not progress):
        m = Manipulation(loaded, "inject", k, donor_states=states[k], positions=positions)
        res = evaluate_items(loaded.model, tok, [item], m, batch_size=batch_size)[0]
        out["layers"].append({"layer": k, **row(res)})
    return out


def capital_pairs(tokenizer, items: list[dict]) -> list[tuple[int, int]]:
    """(recipient, donor) index pairs: each country swapped with the next one of the same token length."""
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(len(word_span(tokenizer, it["prompt"], it["word"])), []).append(i)
    pairs = []
    for members in groups.values():
        if len(members) > 1:
            pairs += [(members[j], members[(j + 1) % len(members)]) for j in range(len(members))]
    return sorted(pairs)


def _inject_task(loaded, layer_list, *, samples, seed, batch_size, progress):
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    items = load_prompt_task("capitals", samples, seed)
    pairs = capital_pairs(tok, items)
    if not pairs:
        raise LlmdropError("no two countries of equal token length to swap; use more --samples")
    encoded = [encode(tok, items[a]["prompt"], [items[a]["answer"], items[b]["answer"]]) for a, b in pairs]
    spans = [word_span(tok, items[a]["prompt"], items[a]["word"]) for a, _ in pairs]
    dspans = [word_span(tok, items[b]["prompt"], items[b]["word"]) for _, b in pairs]
    states = _donor_states(
        loaded, [tok(items[b]["prompt"])["input_ids"] for _, b in pairs], dspans, layer_list, batch_size
    )
    positions = _positions(spans)

    def summary(res):
        n = len(res)
        firsts = [r["first_token"] for r in res]
        return {
            "top_token": max(set(firsts), key=lambda t: (firsts.count(t), t)),
            "watch_logprobs": {
                "original": sum(r["cand_logprobs"][0] for r in res) / n,
                "injected": sum(r["cand_logprobs"][1] for r in res) / n,
            },
            "keep": sum(r["match"] == 0 for r in res) / n,
            "follow": sum(r["match"] == 1 for r in res) / n,
            "other": sum(r["match"] == -1 for r in res) / n,
        }

    base = evaluate_items(loaded.model, tok, encoded, batch_size=batch_size)
    out = {
        "task": "capitals",
        "pairs": len(pairs),
        "seed": seed,
        "watch": ["original", "injected"],
        "baseline": summary(base),
        "layers": [],
    }
    for k in tqdm(layer_list, desc="inject", unit="layer", disable=not progress):
        m = Manipulation(loaded, "inject", k, donor_states=states[k], positions=positions)
        res = evaluate_items(loaded.model, tok, encoded, m, batch_size=batch_size)
        out["layers"].append({"layer": k, **summary(res)})
    return out


def followed_until(result: dict, fraction: float = 0.5) -> int | None:
    """Last layer at which at least ``fraction`` of the capital swaps are followed (None if never)."""
    layers = [r["layer"] for r in result["layers"] if r.get("follow", 0) >= fraction]
    return max(layers) if layers else None


# ------------------------------------------------------------------------------------------------ plots


def _save(fig, path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp)


def plot_probe(result: dict, path) -> None:
    """The paper's Figure 2 for this model: accuracy per layer (one line per manipulation, baseline dashed),
    and the gold log-prob below (more telling when the baseline accuracy is low)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True)
    kinds = list(dict.fromkeys(r["manipulation"] for r in result["results"]))
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "gold_logprob", "gold answer log-prob")):
        for c, kind in enumerate(kinds):
            rows = sorted((r["layer"], r[key]) for r in result["results"] if r["manipulation"] == kind)
            ax.plot([x for x, _ in rows], [y for _, y in rows], "o-", markersize=3, color=f"C{c}", label=kind)
        ax.axhline(result["baseline"][key], color="k", linestyle="--", linewidth=1, label="baseline")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("layer k (manipulation of previous tokens from the input of layer k)")
    axes[0].set_title(f"{result['model']}: {result['task']} ({result['samples']} prompts)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_inject(result: dict, path) -> None:
    """Per layer: the watched answers' log-probs (one prompt) or follow / keep rates (--task capitals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    layers = [r["layer"] for r in result["layers"]]
    if result.get("task") == "capitals":
        for c, key in enumerate(("follow", "keep", "other")):
            ax.plot(
                layers,
                [r[key] for r in result["layers"]],
                "o-",
                markersize=3,
                color=f"C{c}",
                label={"follow": "follows the injection", "keep": "keeps the original answer", "other": "neither"}[key],
            )
            ax.axhline(result["baseline"][key], color=f"C{c}", linestyle="--", linewidth=1)
        ax.set_ylabel("fraction of prompts (dashed: no injection)")
        ax.set_title(f"{result['model']}: injecting another country, {result['pairs']} capital swaps")
    else:
        for c, w in enumerate(result["watch"]):
            ax.plot(
                layers,
                [r["watch_logprobs"][w] for r in result["layers"]],
                "o-",
                markersize=3,
                color=f"C{c}",
                label=f"log p({w})",
            )
            ax.axhline(result["baseline"]["watch_logprobs"][w], color=f"C{c}", linestyle="--", linewidth=1)
        ymin = ax.get_ylim()[0]
        for r in result["layers"]:
            ax.annotate(r["top_token"], (r["layer"], ymin), rotation=90, fontsize=6, ha="center", va="bottom")
        ax.set_ylabel("log-prob (dashed: no injection); top token at the bottom")
        ax.set_title(f"{result['model']}: {result['word']!r} <- {result['donor_word']!r}")
    ax.set_xlabel("layer k (injection into the input of layer k)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


__all__ = [
    "probe",
    "inject",
    "generate",
    "load_prompt_task",
    "capitals",
    "word_span",
    "evaluate_items",
    "harmless_from",
    "followed_until",
    "plot_probe",
    "plot_inject",
    "KINDS",
]
