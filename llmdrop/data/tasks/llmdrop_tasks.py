"""Data and scoring of llmdrop's bundled lm-evaluation-harness tasks (referenced from the YAML files beside this one).

The items, prompts and answer normalisation are llmdrop's own (``llmdrop.analysis.act`` /
``llmdrop.analysis.probing``), imported rather than copied, so that the harness scores exactly what
``llmdrop act eval`` and ``llmdrop probe`` score.
Both tasks read files shipped inside the package: they run offline.
"""

import datasets

from llmdrop.analysis.act import DEFAULT_TASK, load_mc_task
from llmdrop.analysis.probing import capitals, normalise


def mc_docs(**kwargs) -> dict:
    """The 312 multiple-choice items of ``llmdrop act`` (``data/act_mc.jsonl``): prompt, choices, label."""
    rows = [{"prompt": it.prompt, "choices": list(it.choices), "label": it.label} for it in load_mc_task(DEFAULT_TASK)]
    return {"test": datasets.Dataset.from_list(rows)}


def capitals_docs(**kwargs) -> dict:
    """The capitals task of ``llmdrop probe``: the one-shot Q/A prompt (France as the shot) and the gold capital."""
    rows = [{"prompt": it["prompt"], "answer": it["answer"], "country": it["word"]} for it in capitals()]
    return {"test": datasets.Dataset.from_list(rows)}


def capitals_results(doc: dict, results: list[str]) -> dict:
    """probe's accuracy: the greedy answer's first line, normalised (NFKD, no accents, lower case, letters and
    digits only), starts with the normalised gold capital."""
    gold = normalise(doc["answer"])
    return {"acc": float(bool(gold) and normalise(results[0].split("\n")[0]).startswith(gold))}
