"""llmdrop heal on a tiny random Llama saved to disk: exports of it in every format are healed by distillation from it.

The loss, the training methods (lora, last:K, full), the held-out split, the saved checkpoint (format, tensor names,
loading without peft and without llmdrop) and the refusals.
"""

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import COMMON, WORDS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import llmdrop.checkpoints.healing as heal_module
from llmdrop.checkpoints.healing import (
    Method,
    distill,
    heal,
    kd_loss,
    make_trainable,
    split_heldout,
    tensor_shapes,
    trained_model,
)
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats.export import export
from llmdrop.planning.plan import DropPlan
from llmdrop.source.arch import adapter_for
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import load_model

N = 6
# .venv-quant (the fast suite on transformers 5.17) has no peft; .venv has it (`make test` installs llmdrop[heal])
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed (llmdrop[heal])")
METHODS = [pytest.param("lora", marks=needs_peft), "last:2", "full"]
PLANS = {  # format -> plan (source numbering); --format auto picks the first two by themselves
    "vanilla": dict(blocks=[2, 4]),
    "nemotron-nas": dict(blocks=[4], attn=[3], mlp=[1]),
    "llmdrop": dict(blocks=[4], attn=[0, 3], mlp=[1]),  # layer 0's attention: nemotron-nas cannot hold it
}
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The source model, a text to calibrate on, and one export of it per format."""
    d = tmp_path_factory.mktemp("heal")
    save(tiny_model("llama", N), d / "src")
    rng = torch.Generator().manual_seed(0)
    (d / "text.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (4000,), generator=rng)))
    for fmt, plan in PLANS.items():
        loaded = load_model(str(d / "src"), device="cpu")
        export(loaded, DropPlan(N, **plan), d / fmt, fmt=fmt)
    return d


def calib(d, samples=20):
    return CalibSpec(str(d / "text.txt"), samples, 32)


def teacher_and_student(d, fmt="llmdrop"):
    teacher = load_model(str(d / "src"), device="cpu").model.requires_grad_(False)
    student = load_model(str(d / fmt), device="cpu")
    return teacher, student


def fixed_batch(n=4, length=32):
    return torch.randint(4, 4 + len(WORDS), (n, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- the loss and the training step


def test_kd_loss_is_the_kl_divergence():
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p_t = torch.softmax(t / 2, -1)
    expected = (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0), expected)
    # its gradient is autograd's of the formula above
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(s, t, temperature=2.0), s)
    (reference,) = torch.autograd.grad(
        (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4, s
    )
    torch.testing.assert_close(grad, reference)
    t.requires_grad_(True)
    loss = kd_loss(t, t.detach())
    loss.backward()
    assert loss.item() == 0.0 and not t.grad.any()  # exactly: no rounding noise for Adam to amplify


@pytest.mark.parametrize("train", METHODS)
def test_loss_falls_on_a_fixed_batch(workdir, train):
    teacher, student = teacher_and_student(workdir)
    module = make_trainable(student.model, student.adapter, Method.parse(train), rank=8)
    run = distill(module, teacher, fixed_batch(), steps=15, lr=3e-3, batch_size=4, progress=False)
    losses = run["losses"]
    assert losses[0] > 0.01  # the drop costs something
    assert losses[-1] < 0.5 * losses[0], losses
    assert run["tokens_seen"] == 15 * 4 * 32


@pytest.mark.parametrize("train", METHODS)
def test_student_identical_to_teacher_has_zero_loss_and_keeps_its_weights(train):
    teacher = tiny_model("llama", N).requires_grad_(False)
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = make_trainable(student, adapter_for(student.config), Method.parse(train), rank=4)
    run = distill(module, teacher, fixed_batch(), steps=1, lr=1e-2, batch_size=4, progress=False)
    assert run["losses"] == [0.0]
    after = trained_model(module, Method.parse(train)).state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@needs_peft
def test_what_each_method_trains(workdir):
    _, student = teacher_and_student(workdir, "vanilla")  # 4 layers left
    model = student.model
    last = make_trainable(model, student.adapter, Method.parse("last:2"), rank=8)
    trained = {n for n, p in last.named_parameters() if p.requires_grad}
    assert trained == {
        n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.3."))
    } | {"model.norm.weight"}
    lora = make_trainable(model, student.adapter, Method.parse("lora"), rank=8)
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    # A and B of q, k, v, o, gate, up, down in every one of the 4 layers
    assert len(trained) == 4 * 7 * 2 and all("lora_" in n for n in trained)
    with pytest.raises(LlmdropError, match="last:5 asks for more layers than the student has"):
        make_trainable(model, student.adapter, Method.parse("last:5"), rank=8)


# --------------------------------------------------------------------------- the held-out share


def test_heldout_split_is_seeded_disjoint_and_complete():
    tokens = torch.arange(40 * 3).view(40, 3)
    train, held = split_heldout(tokens, 0.1, seed=0)
    assert (len(train), len(held)) == (36, 4)
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in held.tolist()}
    assert len(rows) == 40 and not ({tuple(r) for r in train.tolist()} & {tuple(r) for r in held.tolist()})
    assert torch.equal(split_heldout(tokens, 0.1, seed=0)[1], held)
    assert not torch.equal(split_heldout(tokens, 0.1, seed=1)[1], held)
    assert len(split_heldout(tokens, 0.0)[1]) == 0
    with pytest.raises(LlmdropError, match="leaves none to train on"):
        split_heldout(tokens[:1], 0.5)


def test_heldout_share_never_reaches_the_trainer(workdir, monkeypatch):
    """Every block the student runs on while training is a training block; the held-out ones are never seen."""
    seen = []
    original = heal_module.distill

    def spy(student, teacher, tokens, **kwargs):
        hook = student.register_forward_pre_hook(
            lambda m, a, kw: seen.extend(tuple(r) for r in kw["input_ids"].tolist()) if m.training else None,
            with_kwargs=True,
        )
        try:
            return original(student, teacher, tokens, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(heal_module, "distill", spy)
    spec = calib(workdir)
    result = heal(str(workdir / "llmdrop"), workdir / "spy", train="last:1", calib=spec, eval_split=0.25, steps=12)
    tokens = spec.tokens(tiny_tokenizer())
    train, held = split_heldout(tokens, 0.25, spec.seed)
    held_rows, train_rows = {tuple(r) for r in held.tolist()}, {tuple(r) for r in train.tolist()}
    assert len(held_rows) == 5 and len(train_rows) == 15
    assert len(seen) == 12 * 4 and set(seen) <= train_rows and not set(seen) & held_rows
    assert set(seen) == train_rows  # 48 draws in seeded passes over 15 blocks: all of them
    assert result["heldout"]["samples"] == 5 and result["data"]["train_samples"] == 15


# --------------------------------------------------------------------------- the checkpoint


@pytest.mark.parametrize("fmt", list(PLANS))
def test_output_keeps_the_input_format(workdir, fmt):
    src, out = workdir / fmt, workdir / f"healed-{fmt}"
    result = invoke("heal", src, "-o", out, "--train", "last:1", "--calib", workdir / "text.txt", "--samples", 12,
                    "--seq-len", 32, "--steps", 4, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "last:1" and summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 32
    # the same files, the same config and code, byte for byte; only the weights and the records changed
    names = {p.name for p in src.iterdir()} | {"healing_loss.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names - {"model.safetensors", "llmdrop.json", "README.md", "healing_loss.png"}:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "healing_loss.png").stat().st_size > 10_000
    assert tensor_shapes(out) == tensor_shapes(src)
    record, source_record = (json.loads((d / "llmdrop.json").read_text()) for d in (out, src))
    assert record["exported"] == source_record["exported"] and record["exported"]["format"] == fmt
    (entry,) = record["healing"]
    assert entry["teacher"]["model"] == str(workdir / "src")  # from the export's llmdrop.json
    assert entry["data"]["samples"] == 12 and entry["data"]["train_samples"] == 11 and entry["heldout"]["samples"] == 1
    assert len(entry["loss_curve"]) == 4 and entry["loss_curve"][::3] == [entry["loss_start"], entry["loss_end"]]
    assert {"perplexity_before", "perplexity_after", "teacher_perplexity"} <= entry["heldout"].keys()
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "![Distillation loss per step](healing_loss.png)" in card
    model, info = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=fmt != "vanilla", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


LOAD_WITHOUT_PEFT_OR_LLMDROP = """
import sys, torch
sys.modules["peft"] = None  # `import peft` / `import llmdrop` now fail, and find_spec says they are not there
sys.modules["llmdrop"] = None
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True)
assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
ids = torch.arange(4, 20).view(2, 8)
torch.save(model.eval()(ids, use_cache=False).logits, sys.argv[2])
"""


@needs_peft
def test_lora_merge_keeps_names_shapes_and_count_and_loads_without_peft_and_llmdrop(workdir, tmp_path):
    src, out = workdir / "nemotron-nas", workdir / "healed-lora"
    result = heal(str(src), out, train="lora", rank=4, calib=calib(workdir), steps=6, lr=3e-3, progress=False)
    assert result["lora_modules"] == 5 * 7 - 4 - 3  # 5 layers; layer 3 has no attention (4), layer 1 no MLP (3)
    assert result["trainable_parameters"] > 0
    before, after = tensor_shapes(src), tensor_shapes(out)
    assert after == before  # names, shapes, dtypes; so the count too
    from safetensors.torch import load_file

    old, new = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # LoRA merged into the projections only
    assert sum(v.numel() for v in new.values()) == sum(v.numel() for v in old.values())
    assert not any("lora" in k for k in new)
    logits = tmp_path / "logits.pt"
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT_OR_LLMDROP, str(out), str(logits)], check=True, cwd=tmp_path
    )
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model(torch.arange(4, 20).view(2, 8), use_cache=False).logits
    torch.testing.assert_close(torch.load(logits), expected)
    assert result["heldout"]["kl_after"] < result["heldout"]["kl_before"]


def test_lora_without_peft_is_one_error_line_before_loading(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails as if it were not installed
    with pytest.raises(
        LlmdropError, match=r"--train lora needs peft, which is not installed: pip install 'llmdrop\[heal\]'"
    ):
        heal(str(workdir / "llmdrop"), workdir / "no-peft", train="lora", calib=calib(workdir))
    assert not (workdir / "no-peft").exists()


def test_ctrl_c_writes_nothing(workdir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heal_module, "distill", interrupted)
    out = workdir / "interrupted"
    args = ["--train", "full", "--calib", workdir / "text.txt", "--samples", 8, "--seq-len", 32]
    result = invoke("heal", workdir / "vanilla", "-o", out, *args)
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1] == "error: interrupted"
    assert not out.exists() and not [p for p in workdir.iterdir() if "interrupted" in p.name]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def other_teachers(workdir):
    """A teacher with fewer layers, one with other MLP sizes, one with another vocabulary."""
    d = workdir / "teachers"
    save(tiny_model("llama", 4), d / "four-layers")
    config = LlamaConfig(num_hidden_layers=N, **{**COMMON, "intermediate_size": 96})
    save(LlamaForCausalLM(config), d / "other-mlp")
    config = LlamaConfig(num_hidden_layers=N, **{**COMMON, "vocab_size": 140})
    tok = tiny_tokenizer()
    tok.add_tokens([f"x{i}" for i in range(8)])
    save(LlamaForCausalLM(config), d / "other-vocab", tok)
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["{src}"], "is not an llmdrop export (no llmdrop.json): heal starts from the output of `llmdrop drop`"),
        (["{exp}", "--teacher", "{t}/four-layers"], "is not a drop of the teacher {t}/four-layers: it was cut from 6"),
        (
            ["{exp}", "--teacher", "{t}/other-mlp", "--train", "full"],
            "layer 0.mlp.gate_proj.weight has shape (128, 64), source layer 0's",
        ),
        (["{exp}", "--teacher", "{t}/other-vocab", "--train", "full"], "has another vocabulary than the student"),
        (["{exp}", "--train", "half"], "unknown --train 'half'; use lora, last:K (K >= 1 layers) or full"),
        (["{exp}", "--train", "last:9"], "--train last:9 asks for more layers than the student has (5)"),
        (["{exp}", "--eval-split", "1"], "--eval-split must be in [0, 1), got 1.0"),
        (["{exp}", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["{exp}", "-o", "{exp}/inside"], "would overwrite the input"),
    ],
)
def test_bad_inputs_give_one_error_line(workdir, other_teachers, args, message):
    fill = dict(src=workdir / "src", exp=workdir / "llmdrop", t=other_teachers)
    args = [a.format(**fill) for a in args]
    out = workdir / "refused"
    if "-o" not in args:
        args += ["-o", str(out)]
    result = invoke("heal", *args, "--calib", workdir / "text.txt", "--samples", 8, "--seq-len", 32)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()  # progress bars of the model load may come first
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("error: ") and message.format(**fill) in lines[-1], lines
    assert not out.exists()


def test_a_recorded_teacher_that_is_gone_points_to_teacher(workdir, tmp_path):
    shutil.copytree(workdir / "src", tmp_path / "moved-src")
    loaded = load_model(str(tmp_path / "moved-src"), device="cpu")
    export(loaded, DropPlan(N, blocks=[2]), tmp_path / "exp")
    shutil.rmtree(tmp_path / "moved-src")
    result = invoke("heal", tmp_path / "exp", "-o", tmp_path / "out", "--train", "full")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the teacher recorded in the export's llmdrop.json ({tmp_path / 'moved-src'}) cannot be found: no such "
        f"directory: {tmp_path / 'moved-src'}; pass the source model with --teacher"
    )


@pytest.mark.parametrize("teacher, warned", [("src", False), ("unrelated", True)])
def test_an_unrelated_teacher_of_the_same_shapes_is_warned_about(workdir, tmp_path, teacher, warned):
    if teacher == "unrelated":
        save(tiny_model("llama", N, seed=7), tmp_path / "unrelated")
    folder = workdir / "src" if teacher == "src" else tmp_path / "unrelated"
    args = ["--train", "full", "--steps", 1, "--calib", workdir / "text.txt", "--samples", 4, "--seq-len", 16]
    result = invoke("heal", workdir / "vanilla", "-o", tmp_path / "out", "--teacher", folder, *args)
    assert result.exit_code == 0, result.output
    distance = json.loads((tmp_path / "out" / "llmdrop.json").read_text())["healing"][-1]["teacher"]["weight_distance"]
    assert ("warning: the student's layers are" in result.stderr) is warned
    assert distance > 1.0 if warned else distance == 0.0  # the vanilla drop copies the kept layers bit for bit
