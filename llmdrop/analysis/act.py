"""Attention calibration (ACT): find the heads whose sink calibration helps a task, measure it, export it.

The calibration itself lives in ``modeling/attention_calibration.py`` (copied into exports, so that a
checkpoint computes exactly what was measured here). This module has the task loader, the
multiple-choice scorer, and the three verbs: ``search`` (per-head gains on the calibration split),
``evaluate`` (held-out accuracy with and without) and ``apply`` (export with the heads in config.json).

A task is a JSONL file of ``{"prompt": str, "choices": [str], "label": int}``. Each choice is scored by
the summed log-probability of its tokens after the prompt (``--norm mean``: per token); the best one is
the prediction. Items are split into calibration and held-out parts by a seeded fraction; the held-out
part is never seen by ``search``.
"""

import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmdrop.errors import LlmdropError
from llmdrop.files import DATA_DIR, write_json
from llmdrop.modeling.attention_calibration import (
    DEFAULT_BETA,
    DEFAULT_THRESHOLD,
    apply_config_calibration,
    disable_attention_calibration,
    enable_attention_calibration,
)
from llmdrop.record import ACT_FORMAT
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel, ModelArg, as_loaded, model_input

FORMAT = ACT_FORMAT
DEFAULT_TASK = DATA_DIR / "act_mc.jsonl"


# ---------------------------------------------------------------- task


@dataclass(frozen=True)
class Item:
    prompt: str
    choices: tuple[str, ...]
    label: int


def load_mc_task(path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise LlmdropError(f"task file not found: {path}")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, choices, label = row["prompt"], row["choices"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlmdropError(f"{path}:{n}: expected a JSON object with prompt, choices and label") from None
        if not (
            isinstance(prompt, str)
            and isinstance(choices, list)
            and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)
        ):
            raise LlmdropError(
                f"{path}:{n}: prompt must be a string and choices a list of at least 2 non-empty strings"
            )
        if not (isinstance(label, int) and 0 <= label < len(choices)):
            raise LlmdropError(f"{path}:{n}: label must be an index into choices (0-{len(choices) - 1})")
        items.append(Item(prompt, tuple(choices), label))
    if not items:
        raise LlmdropError(f"task file {path} has no items")
    return items


def split_task(items: list[Item], split: float = 0.5, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(calibration, held-out): a seeded ``split`` fraction of the items for calibration, the rest held out."""
    if not 0 < split < 1:
        raise LlmdropError(f"--split must be between 0 and 1 (the calibration fraction), got {split}")
    order = random.Random(seed).sample(range(len(items)), len(items))
    k = max(1, min(len(items) - 1, round(split * len(items))))
    return [items[i] for i in sorted(order[:k])], [items[i] for i in sorted(order[k:])]


# ---------------------------------------------------------------- scoring


class _Replay(nn.Module):
    """Stands in for the decoder layers before the one under test: returns what they computed at baseline."""

    def __init__(self, outputs, attention_type=None):
        super().__init__()
        self.outputs, self.batch = outputs, 0
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return self.outputs[self.batch] if self.outputs is not None else hidden_states


class MultipleChoiceScorer:
    """Scores a fixed list of items on a model: accuracy and the chosen answers.

    When every choice of an item is one token, one row (the prompt) scores them all; otherwise each
    choice gets its own row (prompt + choice). Only the positions that predict a choice token go
    through the LM head. ``record`` keeps every decoder layer's output so that a later pass that
    changes only layer L onwards can ``replay`` layers < L instead of recomputing them.
    """

    def __init__(self, tokenizer, items: list[Item], *, batch_size: int = 16, norm: str = "sum"):
        if norm not in ("sum", "mean"):
            raise LlmdropError(f"unknown --norm {norm!r}; use sum or mean")
        self.items, self.norm, self.rows, self.targets = items, norm, [], []  # targets: (row, pos, token, item, choice)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for i, item in enumerate(items):
            prompt = tokenizer(item.prompt).input_ids
            choices = [tokenizer(c, add_special_tokens=False).input_ids for c in item.choices]
            if not prompt or any(not c for c in choices):
                raise LlmdropError(f"item {i}: the prompt and every choice must have at least one token")
            if all(len(c) == 1 for c in choices):
                self.rows.append(prompt)
                self.targets += [(len(self.rows) - 1, len(prompt) - 1, c[0], i, k) for k, c in enumerate(choices)]
            else:
                for k, c in enumerate(choices):
                    self.rows.append(prompt + c)
                    self.targets += [(len(self.rows) - 1, len(prompt) - 1 + t, tok, i, k) for t, tok in enumerate(c)]
        order = sorted(range(len(self.rows)), key=lambda r: (len(self.rows[r]), r))  # similar lengths together
        self.batches = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(self.rows[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # right padding: real tokens never see the pads
                ids[j, : len(self.rows[r])] = torch.tensor(self.rows[r])
                mask[j, : len(self.rows[r])] = 1
            where = {r: j for j, r in enumerate(rows)}
            targets = [(where[t[0]], *t[1:]) for t in self.targets if t[0] in where]
            self.batches.append((ids, mask, targets))
        self.recorded = None

    @torch.no_grad()
    def choice_logprobs(
        self, model, *, record: bool = False, replay_from: int | None = None, layers_path: str = "model.layers"
    ) -> list[list[float]]:
        """log p(choice | prompt) per item and choice (summed or mean over the choice's tokens)."""
        device = next(model.parameters()).device
        layers = model.get_submodule(layers_path)
        decoder, adapter = model.get_decoder(), adapter_for(model.config)
        totals = [[0.0] * len(it.choices) for it in self.items]
        counts = [[0] * len(it.choices) for it in self.items]
        hooks, saved = [], {}
        if record:
            self.recorded = [[] for _ in layers]
            hooks = [
                layer.register_forward_hook(lambda m, a, out, i=i: self.recorded[i].append(out))
                for i, layer in enumerate(layers)
            ]
        if replay_from:
            if self.recorded is None:
                raise RuntimeError("replay needs a recorded pass first")
            for i in range(replay_from):  # layers < L - 1 pass through, layer L - 1 returns its recorded output
                outputs = self.recorded[i] if i == replay_from - 1 else None
                saved[i] = layers[i]
                layers[i] = _Replay(outputs, getattr(saved[i], "attention_type", None))
        try:
            for b, (ids, mask, targets) in enumerate(self.batches):
                for i in saved:
                    layers[i].batch = b
                hidden = decoder(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).last_hidden_state
                rows = torch.tensor([t[0] for t in targets], device=device)
                pos = torch.tensor([t[1] for t in targets], device=device)
                logits = adapter.logits(model, hidden[rows, pos], final_norm=False).float()  # the decoder normed it
                logp = logits.log_softmax(-1)[
                    torch.arange(len(targets), device=device), torch.tensor([t[2] for t in targets], device=device)
                ]
                for (_, _, _, item, choice), lp in zip(targets, logp.tolist()):
                    totals[item][choice] += lp
                    counts[item][choice] += 1
        finally:
            for h in hooks:
                h.remove()
            for i, layer in saved.items():
                layers[i] = layer
        if self.norm == "mean":
            return [[t / c for t, c in zip(ts, cs)] for ts, cs in zip(totals, counts)]
        return totals

    def accuracy(self, model, **kwargs) -> tuple[float, list[int]]:
        """(accuracy, predicted choice per item); ties go to the first choice."""
        scores = self.choice_logprobs(model, **kwargs)
        preds = [max(range(len(s)), key=lambda k: (s[k], -k)) for s in scores]
        correct = sum(p == it.label for p, it in zip(preds, self.items))
        return correct / len(self.items), preds


# ---------------------------------------------------------------- heads.json


def load_heads(path) -> dict:
    """A heads.json: {"format", "beta", "threshold", "heads": [[layer, head], ...], ...}."""
    path = Path(path)
    if not path.is_file():
        raise LlmdropError(f"heads file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmdropError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LlmdropError(f"{path} is not an llmdrop heads file (format {FORMAT!r})")
    heads = data.get("heads")
    if not isinstance(heads, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) for x in h) for h in heads
    ):
        raise LlmdropError(f"{path}: heads must be a list of [layer, head] pairs")
    return data


def check_heads(heads, num_layers: int, num_heads: int) -> list[list[int]]:
    for layer, head in heads:
        if not 0 <= layer < num_layers:
            raise LlmdropError(f"head [{layer}, {head}]: layer {layer} is out of range (layers 0-{num_layers - 1})")
        if not 0 <= head < num_heads:
            raise LlmdropError(f"head [{layer}, {head}]: head {head} is out of range (heads 0-{num_heads - 1})")
    return sorted({(int(a), int(b)) for a, b in heads})


@contextmanager
def calibrated(loaded: LoadedModel, heads, beta: float = DEFAULT_BETA, threshold: float = DEFAULT_THRESHOLD):
    """Calibrate ``heads`` of ``loaded.model`` for the duration of the block (in place, undone on exit)."""
    enable(loaded, heads, beta, threshold)
    try:
        yield loaded.model
    finally:
        disable_attention_calibration(loaded.model, loaded.adapter.layers, loaded.adapter.attn[0])
        apply_config_calibration(loaded.model, loaded.model.config)  # an `act apply` export: back to its own heads


def enable(loaded: LoadedModel, heads, beta: float = DEFAULT_BETA, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Calibrate ``heads`` of ``loaded.model`` in place (replacing any earlier calibration)."""
    heads = check_heads(heads, loaded.num_layers, loaded.model.config.num_attention_heads)
    try:
        enable_attention_calibration(
            loaded.model, heads, beta, threshold, loaded.adapter.layers, loaded.adapter.attn[0]
        )
    except ValueError as e:
        raise LlmdropError(str(e)) from None


# ---------------------------------------------------------------- verbs


def _task_record(task, split: float, seed: int, norm: str) -> dict:
    import hashlib

    digest = hashlib.sha256(Path(task).read_bytes()).hexdigest()[:16]  # resuming needs the very same items
    return {"file": Path(task).name, "sha256": digest, "split": split, "seed": seed, "norm": norm}


def act_search(
    model: ModelArg = None,
    *,
    task=DEFAULT_TASK,
    out,
    beta: float = DEFAULT_BETA,
    threshold: float = DEFAULT_THRESHOLD,
    layers: str | None = None,
    max_heads: int | None = None,
    greedy: bool = False,
    split: float = 0.5,
    seed: int = 0,
    norm: str = "sum",
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Calibrate each (layer, head) alone on the calibration split; keep the heads that raise accuracy.

    Writes ``out`` after every head (atomically), so an interrupted search resumes from it. With
    ``greedy``, the kept heads are then added one at a time (best first) while accuracy keeps rising.
    """
    from tqdm.auto import tqdm

    from llmdrop.files import JSON, check_output
    from llmdrop.planning.plan import parse_layers

    # an existing heads.json is resumed from (its settings must match), never replaced
    out = check_output(out, kind="file", suffixes=JSON, option="--out", resume=True, inputs=[model_input(model), task])
    calib, _ = split_task(load_mc_task(task), split, seed)
    loaded = as_loaded(model)
    n_layers, n_heads = loaded.num_layers, loaded.model.config.num_attention_heads
    todo_layers = parse_layers(layers, n_layers) if layers else list(range(n_layers))
    settings = {"beta": float(beta), "threshold": float(threshold), "task": _task_record(task, split, seed, norm)}
    record = {
        "format": FORMAT,
        **settings,
        "model": loaded.source,
        "heads": [],
        "baseline": None,
        "calibration_items": len(calib),
        "per_head": {},
    }
    if out.exists():  # resume: same settings, or refuse
        old = load_heads(out)
        differs = [k for k in settings if old.get(k) != settings[k]]
        if differs:
            raise LlmdropError(
                f"{out} was written with other settings ({', '.join(differs)}); "
                "pass another --out or the same settings to resume"
            )
        record.update({k: old[k] for k in ("baseline", "per_head") if old.get(k) is not None})
    scorer = MultipleChoiceScorer(loaded.tokenizer, calib, batch_size=batch_size, norm=norm)
    base_acc, _ = scorer.accuracy(loaded.model, record=True, layers_path=loaded.adapter.layers)
    if record["baseline"] is not None and abs(record["baseline"] - base_acc) > 1e-9:
        raise LlmdropError(
            f"{out}: its baseline accuracy {record['baseline']} differs from this model's {base_acc}; "
            "is it the same model?"
        )
    record["baseline"] = base_acc
    todo = [(l, h) for l in todo_layers for h in range(n_heads) if f"{l},{h}" not in record["per_head"]]
    bar = tqdm(todo, desc="act search", unit="head", disable=not progress)
    for layer, head in bar:
        with calibrated(loaded, [[layer, head]], beta, threshold):
            acc, _ = scorer.accuracy(loaded.model, replay_from=layer, layers_path=loaded.adapter.layers)
        record["per_head"][f"{layer},{head}"] = {"accuracy": acc, "gain": acc - base_acc}
        bar.set_postfix(layer=layer, head=head, gain=f"{acc - base_acc:+.3f}")
        record["heads"] = _best_heads(record["per_head"], max_heads)
        write_json(record, out)
    scorer.recorded = None
    record["heads"] = _best_heads(record["per_head"], max_heads)
    record.pop("greedy", None)
    if greedy and record["heads"]:
        record["heads"], record["greedy"] = _greedy(
            loaded, scorer, record["heads"], base_acc, beta, threshold, progress
        )
    if record["heads"]:
        with calibrated(loaded, record["heads"], beta, threshold):
            record["calibrated"] = scorer.accuracy(loaded.model)[0]
    else:
        record["calibrated"] = base_acc
    write_json(record, out)
    return record


def _best_heads(per_head: dict, max_heads: int | None) -> list[list[int]]:
    """Heads with a positive gain alone, best first (ties: lower layer, head), at most ``max_heads``."""
    gains = [(v["gain"], tuple(map(int, k.split(",")))) for k, v in per_head.items() if v["gain"] > 0]
    gains.sort(key=lambda g: (-g[0], g[1]))
    return [list(h) for _, h in gains[:max_heads]]


def _greedy(loaded, scorer, candidates, base_acc, beta, threshold, progress):
    """Add candidates best-first, keeping each only if the combination's accuracy rises."""
    from tqdm.auto import tqdm

    chosen, best, steps = [], base_acc, []
    for head in tqdm(candidates, desc="act greedy", unit="head", disable=not progress):
        with calibrated(loaded, chosen + [head], beta, threshold):
            acc, _ = scorer.accuracy(loaded.model)
        steps.append({"head": head, "accuracy": acc, "kept": acc > best})
        if acc > best:
            chosen, best = chosen + [head], acc
    return chosen, steps


def act_eval(
    model: ModelArg = None,
    *,
    task=DEFAULT_TASK,
    heads: str | None = None,
    beta: float | None = None,
    threshold: float | None = None,
    split: float = 0.5,
    seed: int = 0,
    norm: str = "sum",
    part: str = "heldout",
    batch_size: int = 16,
) -> dict:
    """Accuracy on the held-out split (``part="calibration"`` or ``"all"`` for the others), without and with
    the heads of a heads.json (beta / threshold from the file unless given)."""
    if part not in ("heldout", "calibration", "all"):
        raise LlmdropError(f"unknown --part {part!r}; use heldout, calibration or all")
    spec = load_heads(heads) if heads else None
    items = load_mc_task(task)  # bad inputs fail before the model loads
    loaded = as_loaded(model)
    calib, held = split_task(items, split, seed)
    chosen = {"heldout": held, "calibration": calib, "all": items}[part]
    scorer = MultipleChoiceScorer(loaded.tokenizer, chosen, batch_size=batch_size, norm=norm)
    t0 = time.perf_counter()
    base, base_preds = scorer.accuracy(loaded.model)
    result = {
        "model": loaded.source,
        "task": _task_record(task, split, seed, norm),
        "part": part,
        "items": len(chosen),
        "baseline": base,
    }
    if spec is not None:
        beta = spec["beta"] if beta is None else beta
        threshold = spec["threshold"] if threshold is None else threshold
        with calibrated(loaded, spec["heads"], beta, threshold):
            acc, preds = scorer.accuracy(loaded.model)
        result.update(
            heads=spec["heads"],
            beta=beta,
            threshold=threshold,
            calibrated=acc,
            gain=acc - base,
            changed=sum(a != b for a, b in zip(base_preds, preds)),
        )
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def act_apply(
    model: ModelArg = None,
    *,
    heads: str,
    out,
    beta: float | None = None,
    threshold: float | None = None,
    attn_layers=None,
    mlp_layers=None,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Export ``model`` with the heads of ``heads`` calibrated (config.json ``attention_calibration`` + remote
    code); attention / MLP sublayers in ``attn_layers`` / ``mlp_layers`` are dropped too. A MODEL that is an
    llmdrop export keeps its drops. Layer numbers are MODEL's."""
    from llmdrop.files import check_output_dir
    from llmdrop.formats.export import export
    from llmdrop.planning.plan import DropPlan
    from llmdrop.planning.plan import layers as as_layers

    spec = load_heads(heads)
    check_output_dir(out, overwrite, inputs=[model_input(model), heads])
    beta = spec["beta"] if beta is None else beta
    threshold = spec["threshold"] if threshold is None else threshold
    loaded = as_loaded(model)
    n = loaded.num_layers
    plan = DropPlan(
        n,
        attn=as_layers(attn_layers, n) if attn_layers else [],
        mlp=as_layers(mlp_layers, n) if mlp_layers else [],
        method="explicit",
    )
    if plan.blocks:
        raise LlmdropError(
            "dropping a whole layer (attention and MLP) would renumber the calibrated heads; "
            "drop blocks first, then search and apply on that export"
        )
    dropped = set(plan.attn) | set(getattr(loaded.model.config, "drop_attn_list", None) or ())
    heads_list = check_heads(spec["heads"], n, loaded.model.config.num_attention_heads)
    if bad := sorted({l for l, _ in heads_list} & dropped):
        raise LlmdropError(f"layer {bad[0]} has a calibrated head but its attention is dropped")
    calibration = {"heads": [list(h) for h in heads_list], "beta": float(beta), "threshold": float(threshold)}
    # The config attribute goes through export's config swap into config.json; the remote code reads it there.
    loaded.model.config.attention_calibration = calibration
    from llmdrop.planning.surgery import drop_sublayers

    if not hasattr(loaded.model.config, "llmdrop_sublayers"):
        drop_sublayers(loaded.model, loaded.adapter)  # nothing dropped: only the remote-code config class
    return export(
        loaded,
        plan,
        out,
        dtype=dtype,
        overwrite=overwrite,
        extra={
            "attention_calibration": {
                **calibration,
                "heads_file": str(heads),
                "search": {k: spec.get(k) for k in ("task", "baseline", "calibrated")},
            }
        },
    )
