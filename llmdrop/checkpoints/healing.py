"""Heal an export: distil its source model (the teacher) into it (the student), and save it in its own format.

The loss is the KL divergence from the teacher's next-token distribution to the student's (both at temperature
``T``, scaled by ``T**2`` as in Hinton et al.), averaged over every token of calibration text from the same sources
as ``llmdrop score`` (``self`` samples the text from the teacher). A held-out share of the calibration blocks is
split off before training and only ever evaluated on.

What trains (``train``): ``lora`` (rank-r adapters on the kept attention and MLP projections, through ``peft``, merged
into the weights before saving), ``last:K`` (the last K layers of the student and the final norm) or ``full``.

The output keeps the input's format whatever it is (vanilla, nemotron-nas, llmdrop remote code): the input folder is
copied into the atomic output folder and only its weight files are rewritten, under the same tensor names, shapes
and dtype (checked), then ``llmdrop.json`` gains a ``healing`` entry and the card a Healing section and loss plot.
Ctrl-C stops cleanly and writes nothing (there is no resumable state).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from llmdrop.errors import LlmdropError
from llmdrop.files import atomic_dir, check_output_dir
from llmdrop.formats.card import HEAL_PLOT_FILE
from llmdrop.record import now, read_record, write_record
from llmdrop.source.calibration import CalibSpec, check_sizes
from llmdrop.source.models import (
    LoadedModel,
    LoadSpec,
    ModelArg,
    as_spec,
    model_input,
    resolve_source,
    source_num_layers,
)

INSTALL_PEFT = "pip install 'llmdrop[heal]'"
DEFAULT_LR = {"lora": 1e-3, "last": 2e-4, "full": 5e-5}  # per method; see docs/healing.md
WARMUP_SHARE = 0.1  # of the steps, linear warmup before the cosine decay
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")
STALE_FILES = ("eval_results.json",)  # measured on the unhealed weights: not carried over


# --------------------------------------------------------------------------- what trains


@dataclass(frozen=True)
class Method:
    kind: str  # lora | last | full
    last: int | None = None  # K of last:K

    @property
    def name(self) -> str:
        return f"last:{self.last}" if self.kind == "last" else self.kind

    @classmethod
    def parse(cls, text: str) -> "Method":
        text = str(text).strip()
        if text in ("lora", "full"):
            return cls(text)
        if text.startswith("last:") and text[5:].isdigit() and int(text[5:]) >= 1:
            return cls("last", int(text[5:]))
        raise LlmdropError(f"unknown --train {text!r}; use lora, last:K (K >= 1 layers) or full")


def lora_targets(model, adapter) -> list[str]:
    """Full names of the Linear projections inside the kept attention and MLP sublayers (dropped sublayers have
    none). MoE routers are left alone: their experts are not Linear modules, so a MoE MLP gets no adapter."""
    names = []
    layers_prefix = adapter.layers
    for i, layer in enumerate(adapter.layer_list(model)):
        for part in (adapter.attn[0], adapter.mlp[0]):
            sub = getattr(layer, part, None)
            if sub is None or hasattr(sub, "experts"):
                continue
            for name, module in sub.named_modules():
                if isinstance(module, torch.nn.Linear):
                    names.append(f"{layers_prefix}.{i}.{part}.{name}")
    return names


def make_trainable(model, adapter, method: Method, rank: int):
    """The module to train (``model`` itself, or a peft wrapper of it for LoRA) with only ``method``'s parameters
    requiring gradients."""
    if method.kind == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if method.kind == "last":
        layers = adapter.layer_list(model)
        if method.last > len(layers):
            raise LlmdropError(f"--train last:{method.last} asks for more layers than the student has ({len(layers)})")
        for layer in list(layers)[-method.last :]:
            layer.requires_grad_(True)
        model.get_submodule(adapter.final_norm).requires_grad_(True)
        return model
    peft = require_peft()
    targets = lora_targets(model, adapter)
    if not targets:
        raise LlmdropError("--train lora found no Linear projection in the kept attention / MLP sublayers")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return peft.get_peft_model(model, config)


def checkpointing(model, on: bool) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant, so frozen
    inputs need no gradient). transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_*;
    5.17 has only the old names."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def require_peft():
    try:
        import peft
    except ImportError:
        raise LlmdropError(f"--train lora needs peft, which is not installed: {INSTALL_PEFT}") from None
    return peft


def trained_model(module, method: Method):
    """The plain model to save: LoRA adapters merged into the weights they adapt (same names, shapes, count)."""
    if method.kind == "lora":
        return module.merge_and_unload()
    return module


# --------------------------------------------------------------------------- data, loss


def split_heldout(tokens: torch.Tensor, share: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) rows of ``tokens``: a seeded choice of round(share * rows) blocks (at least one when
    share > 0) is held out; both keep reading order."""
    n = len(tokens)
    n_eval = max(1, round(share * n)) if share > 0 else 0
    if n - n_eval < 1:
        raise LlmdropError(
            f"--eval-split {share} of {n} calibration blocks leaves none to train on; give more --samples"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    heldout = order[:n_eval].sort().values
    train = order[n_eval:].sort().values
    return tokens[train], tokens[heldout]


class _KLFromTeacher(torch.autograd.Function):
    """sum over rows of KL(p_t || p_s), p = softmax of the rows, from the student's logits and the teacher's
    log-probabilities. Its gradient is written out as softmax(s) - p_t: exactly zero when the student's logits are
    the teacher's (autograd's through log_softmax leaves rounding noise of size 1e-8, which Adam, dividing by the
    gradient's own scale, would turn into real weight changes)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logprobs):
        student_logprobs = F.log_softmax(student_logits, dim=-1)
        ctx.save_for_backward(student_logprobs, teacher_logprobs)
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum()

    @staticmethod
    def backward(ctx, grad):
        student_logprobs, teacher_logprobs = ctx.saved_tensors
        return grad * (student_logprobs.exp() - teacher_logprobs.exp()), None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions at ``temperature``, times T**2
    (so the gradient's scale does not depend on T). Computed in float32."""
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1).flatten(0, -2)
    s = (student_logits.float() / temperature).flatten(0, -2)
    return _KLFromTeacher.apply(s, t) / len(s) * temperature**2


@torch.no_grad()
def heldout_kl(student, teacher, tokens: torch.Tensor, temperature: float, batch_size: int) -> float:
    device = next(student.parameters()).device
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        loss = kd_loss(
            student(input_ids=batch, use_cache=False).logits,
            teacher(input_ids=batch, use_cache=False).logits,
            temperature,
        )
        total += loss.item() * batch.numel()
    return total / tokens.numel()


# --------------------------------------------------------------------------- training


def distill(
    student,
    teacher,
    tokens: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 4,
    grad_accum: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the parameters of ``student`` that require gradients for ``steps`` optimizer steps on ``tokens``
    (``[rows, seq_len]``, cycled through in a seeded order, reshuffled each pass), with AdamW (no weight decay),
    linear warmup over the first 10% of the steps and cosine decay to 0. Returns the loss of every step."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise LlmdropError("nothing to train: no parameter requires a gradient")
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = int(WARMUP_SHARE * steps)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    seen = 0
    teacher.eval()
    student.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=steps, desc="heal", unit="step", disable=not progress)
    try:
        for _ in range(steps):
            step_loss = 0.0
            for _ in range(grad_accum):
                if len(order) < batch_size:
                    order += torch.randperm(len(tokens), generator=gen).tolist()
                rows, order = order[:batch_size], order[batch_size:]
                batch = tokens[rows].to(device)
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
                loss = kd_loss(student(input_ids=batch, use_cache=False).logits, target, temperature)
                (loss / grad_accum).backward()
                step_loss += loss.item() / grad_accum
                seen += batch.numel()
            if not math.isfinite(step_loss):
                raise LlmdropError(f"the loss became {step_loss} at step {len(losses) + 1}: lower --lr")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix_str(f"loss {step_loss:.4f}, {seen / (time.perf_counter() - start):,.0f} tok/s")
    finally:
        bar.close()
        student.eval()
    return {
        "losses": losses,
        "tokens_seen": seen,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "warmup_steps": warmup,
    }


# --------------------------------------------------------------------------- checks


def teacher_spec(record: dict, teacher: ModelArg, student: LoadSpec) -> LoadSpec:
    """The teacher: ``teacher`` if given, else the source recorded in llmdrop.json (as typed, else the path loaded)."""
    if teacher is not None:
        spec = as_spec(teacher)
    else:
        src = record["source"]
        try:
            resolve_source(src["model"], src.get("gguf_file"))
            name = src["model"]
        except LlmdropError:
            name = src.get("path") or src["model"]  # e.g. a relative path recorded in another directory
            try:
                resolve_source(name, src.get("gguf_file"))
            except LlmdropError as e:
                raise LlmdropError(
                    f"the teacher recorded in the export's llmdrop.json ({src['model']}) cannot be found: {e}; "
                    "pass the source model with --teacher"
                ) from None
        spec = LoadSpec(name, gguf_file=src.get("gguf_file"))
    return replace(spec, device=student.device, dtype=student.dtype, trust_remote_code=student.trust_remote_code)


# A drop copies the kept layers' weight matrices; compensation (one matrix per dropped run), healing and a dtype cast
# move them by a few percent at most. Those of an unrelated model of the same shapes are about sqrt(2) apart
# (independent, same scale). Norm weights are left out: they start at 1 in every model.
UNRELATED_DISTANCE = 0.5


def check_pair(student: LoadedModel, teacher: LoadedModel, record: dict) -> float:
    """One clear line if ``student`` is not a drop of ``teacher``: the layer count recorded, the architecture, the
    vocabulary, and every kept layer's weights present in the teacher's layer it came from with the same shapes.
    Returns the median relative distance ||student - teacher|| / ||teacher|| of the kept layers' weight matrices."""
    who = f"the student {student.source} is not a drop of the teacher {teacher.source}"
    n_source = record["source"]["num_layers"]
    if teacher.num_layers != n_source:
        raise LlmdropError(f"{who}: it was cut from {n_source} layers, the teacher has {teacher.num_layers}")
    if student.adapter.model_type != teacher.adapter.model_type:
        raise LlmdropError(f"{who}: {student.adapter.model_type} vs {teacher.adapter.model_type} architecture")
    s_vocab, t_vocab = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    s_out = student.model.get_output_embeddings().weight.shape[0]
    t_out = teacher.model.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab or s_out != t_out:
        raise LlmdropError(
            f"the teacher {teacher.source} has another vocabulary than the student {student.source} "
            f"({len(t_vocab):,} tokens / {t_out:,} logits vs {len(s_vocab):,} / {s_out:,}): distillation needs the same"
        )
    layer_map = {int(v): int(k) for k, v in record["layer_map"].items()}  # exported layer -> source layer
    s_layers, t_layers = student.adapter.layer_list(student.model), teacher.adapter.layer_list(teacher.model)
    if len(layer_map) != len(s_layers):
        raise LlmdropError(f"{who}: llmdrop.json maps {len(layer_map)} layers, the student has {len(s_layers)}")
    distances = []
    for i, layer in enumerate(s_layers):
        source = dict(t_layers[layer_map[i]].named_parameters())
        for name, p in layer.named_parameters():
            if name not in source or source[name].shape != p.shape:
                shape = tuple(source[name].shape) if name in source else "none"
                raise LlmdropError(
                    f"{who}: layer {i}.{name} has shape {tuple(p.shape)}, source layer {layer_map[i]}'s {shape}"
                )
            if p.ndim >= 2:
                t = source[name].detach().float()
                distances.append(((p.detach().float() - t).norm() / t.norm().clamp_min(1e-12)).item())
    return statistics.median(distances) if distances else 0.0


# --------------------------------------------------------------------------- saving


def weight_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in the folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype the input checkpoint stores its weights in."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    dtypes = {d for _, d in tensor_shapes(folder).values() if d in names}
    if len(dtypes) != 1:
        raise LlmdropError(f"{folder} stores its weights in {sorted(dtypes) or 'no'} floating dtypes; expected one")
    return names[dtypes.pop()]


def replace_weights(model, folder: Path, dtype: torch.dtype) -> None:
    """Rewrite ``folder``'s weight files from ``model`` (saved by transformers, which writes the names the model
    class loads), refusing any change of tensor names, shapes or dtypes."""
    before = tensor_shapes(folder)
    scratch = folder / ".heal-weights"
    model.to(dtype)
    model.save_pretrained(scratch)
    for path in weight_files(folder):
        path.unlink()
    for path in weight_files(scratch):
        path.rename(folder / path.name)
    shutil.rmtree(scratch)
    after = tensor_shapes(folder)
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        raise LlmdropError(
            f"heal refused: the healed weights differ from the input's in {changed[0][0]} "
            f"(and {len(changed) - 1} more); nothing was written (please report this as an llmdrop bug)"
        )


def plot_losses(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = entry["loss_curve"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, "-", label=f"training batches ({entry['method']})")
    h = entry["heldout"]
    if h.get("kl_before") is not None:
        ax.plot([0, len(losses)], [h["kl_before"], h["kl_after"]], "o", color="C3", label="held-out, before / after")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"KL(teacher || student), T={entry['temperature']:g}")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the verb


def heal(
    student: ModelArg,
    out: str | Path | None = None,
    *,
    teacher: ModelArg = None,
    train: str = "lora",
    rank: int = 8,
    steps: int | None = None,
    lr: float | None = None,
    temperature: float = 1.0,
    calib: str | CalibSpec = "self",
    eval_split: float = 0.1,
    batch_size: int = 4,
    grad_accum: int = 1,
    gradient_checkpointing: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Distil ``teacher`` (default: the source model in ``student``'s llmdrop.json; a name, a LoadSpec or a loaded
    model, which is used as it is and left unchanged) into the export ``student`` and
    write the healed checkpoint to ``out`` in the student's format. ``steps`` None: one pass over the training
    blocks; ``lr`` None: the method's default (``DEFAULT_LR``). Returns the ``healing`` entry of llmdrop.json plus
    ``out``."""
    if not out:
        raise LlmdropError("give an output directory (-o OUT)")
    spec = as_spec(student)
    if spec is None or not spec.model or not Path(spec.model).expanduser().is_dir():
        raise LlmdropError(f"the student must be an llmdrop export directory, got {student!r}")
    folder = Path(spec.model).expanduser()
    method = Method.parse(train)
    calib = CalibSpec.of(calib)
    check_sizes(batch_size=batch_size)
    for name, value in (("--rank", rank), ("--grad-accum", grad_accum), ("--steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LlmdropError(f"{name} must be a whole number >= 1, got {value!r}")
    for name, value in (("--lr", lr), ("--temperature", temperature)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise LlmdropError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(eval_split, (int, float)) and 0 <= eval_split < 1):
        raise LlmdropError(f"--eval-split must be in [0, 1), got {eval_split!r}")
    record = read_record(
        folder, needs=("source.num_layers", "layer_map"), what="heal starts from the output of `llmdrop drop`"
    )
    if method.kind == "last":
        n_student = source_num_layers(str(folder))
        if n_student is not None and method.last > n_student:
            raise LlmdropError(f"--train last:{method.last} asks for more layers than the student has ({n_student})")
    t_spec = None if isinstance(teacher, LoadedModel) else teacher_spec(record, teacher, spec)
    check_output_dir(out, overwrite, inputs=[folder, model_input(t_spec or teacher), calib.input])
    n_teacher = source_num_layers(t_spec.model, t_spec.gguf_file) if t_spec else None
    if n_teacher is not None and n_teacher != record["source"]["num_layers"]:
        raise LlmdropError(
            f"the student {spec.model} is not a drop of the teacher {t_spec.model}: it was cut from "
            f"{record['source']['num_layers']} layers, the teacher has {n_teacher}"
        )
    if method.kind == "lora":  # before the models are loaded: a missing extra should not cost a load
        require_peft()
    lr = lr if lr is not None else DEFAULT_LR[method.kind]

    # Training runs in float32 unless a dtype is asked for; the checkpoint keeps the dtype it had.
    dtype = spec.dtype if spec.dtype != "auto" else "float32"
    save_dtype = stored_dtype(folder)
    s_loaded = replace(spec, dtype=dtype).load()
    t_loaded = teacher if t_spec is None else replace(t_spec, dtype=dtype).load()  # a loaded teacher is used as is
    distance = check_pair(s_loaded, t_loaded, record)
    if distance > UNRELATED_DISTANCE:
        from llmdrop.report import console

        console.print(
            f"warning: the student's layers are {distance:.2f} (relative) away from the teacher's layers they were cut "
            f"from, far more than a drop, compensation or healing moves them: is {t_loaded.source} the model "
            f"{spec.model} was cut from? (--teacher)",
            soft_wrap=True,
            markup=False,
        )
    tokens = calib.tokens(t_loaded.tokenizer, t_loaded.model)  # `self`: sampled from the teacher
    train_tokens, heldout = split_heldout(tokens, eval_split, calib.seed)
    if steps is None:
        steps = math.ceil(len(train_tokens) / (batch_size * grad_accum))

    from llmdrop.passes.evaluation import perplexity

    teacher_model, model = t_loaded.model.requires_grad_(False), s_loaded.model
    before = {}
    if len(heldout):
        before = {
            "perplexity_before": perplexity(model, heldout, batch_size=batch_size, progress=False)["perplexity"],
            "kl_before": heldout_kl(model, teacher_model, heldout, temperature, batch_size),
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(calib.seed)  # LoRA's initialisation
        if gradient_checkpointing:
            checkpointing(model, True)
        module = make_trainable(model, s_loaded.adapter, method, rank)
        n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        run = distill(
            module,
            teacher_model,
            train_tokens,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            temperature=temperature,
            seed=calib.seed,
            progress=progress,
        )
    model = trained_model(module, method)
    if gradient_checkpointing:
        checkpointing(model, False)
    model.requires_grad_(False)
    heldout_record = {"samples": len(heldout), "tokens": heldout.numel(), **before}
    if len(heldout):
        heldout_record.update(
            perplexity_after=perplexity(model, heldout, batch_size=batch_size, progress=False)["perplexity"],
            kl_after=heldout_kl(model, teacher_model, heldout, temperature, batch_size),
            teacher_perplexity=perplexity(teacher_model, heldout, batch_size=batch_size, progress=False)["perplexity"],
        )
    losses = run["losses"]
    entry = {
        "method": method.name,
        **(
            {"rank": rank, "lora_alpha": 2 * rank, "lora_modules": len(lora_targets(model, s_loaded.adapter))}
            if method.kind == "lora"
            else {}
        ),
        "trainable_parameters": n_trainable,
        "teacher": {
            "model": t_loaded.source,
            "path": t_loaded.path,
            "gguf_file": t_loaded.gguf_file,
            "weight_distance": round(distance, 6),
        },
        "data": {**calib.record(tokens), "eval_split": eval_split, "train_samples": len(train_tokens)},
        "loss": "KL(teacher || student) per token, times T^2",
        "temperature": temperature,
        "steps": steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "tokens_seen": run["tokens_seen"],
        "lr": lr,
        "schedule": f"AdamW (no weight decay), linear warmup {run['warmup_steps']} steps, cosine decay to 0",
        "gradient_checkpointing": gradient_checkpointing,
        "train_dtype": dtype,
        "loss_start": losses[0],
        "loss_end": losses[-1],
        "loss_curve": losses,
        "heldout": heldout_record,
        "seconds": round(run["seconds"], 1),
        "cpu_seconds": round(run["cpu_seconds"], 1),
        "device": str(next(model.parameters()).device),
        "created": now(),
    }
    record["healing"] = [*(record.get("healing") or []), entry]

    from llmdrop.formats.card import CARD_FILE, refresh_card
    from llmdrop.formats.export import check_reload
    from llmdrop.formats.exporters import EXPORTERS

    with atomic_dir(out, overwrite, inputs=[folder]) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*STALE_FILES, ".*"))
        replace_weights(model, tmp, save_dtype)
        write_record(record, tmp)
        plot_losses(entry, tmp / HEAL_PLOT_FILE)
        card, status = refresh_card(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        fmt = record.get("exported", {}).get("format", "llmdrop" if record["exported"]["remote_code"] else "vanilla")
        check_reload(tmp, EXPORTERS[fmt].model_class(json.loads((tmp / "config.json").read_text())))
    return {"out": str(Path(out)), **entry}
