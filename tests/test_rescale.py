"""--compensate scale (planning.rescale): alpha is the mean norm ratio across each dropped run, a run that multiplies
the stream by c is restored exactly, and the fold into later output projections equals scaling the stream at
each cut, in every export format, reloaded from disk with no missing or unused tensor."""

import json

import pytest
import torch
from tiny_models import COMMON, random_words_file, save_checkpoint, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import llmdrop
from llmdrop.cli import app
from llmdrop.planning.plan import DropPlan, run_label, sublayer_runs
from llmdrop.planning.surgery import apply_plan
from llmdrop.source.arch import adapter_for
from llmdrop.source.calibration import CalibSpec

IDS = torch.randint(4, 132, (3, 20), generator=torch.Generator().manual_seed(1))  # not the calibration text


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return CalibSpec(str(random_words_file(tmp_path_factory.mktemp("calib"))), samples=6, seq_len=20)


def reload(out):
    model, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, trust_remote_code=True, dtype=torch.float32
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids, use_cache=False).logits


def test_runs_of_positions():
    plan = DropPlan(6, blocks=[1], attn=[2, 4], mlp=[0, 5])
    # mlp 0, attn 1, mlp 1, attn 2 | attn 4 | mlp 5
    assert sublayer_runs(plan) == [(1, 4), (8, 8), (11, 11)]
    labels = [("mlp 0", "attn 2", "mlp 0 - attn 2"), ("attn 4", "attn 4", "attn 4"), ("attn 3", "mlp 3", "block 3"),
              ("attn 12", "mlp 15", "blocks 12-15")]  # fmt: skip
    for first, last, label in labels:
        assert run_label({"from": first, "to": last}) == label


def scaling_block_model(c: float):
    """4 layers; block 2 returns c x its input exactly: its attention writes nothing, its MLP pre-norm is made the
    identity (eps 1e12, weight 1e6) and its MLP is (c - 1) x (a constant gate sigmoid(0) = 1/2, up = [I; 0],
    down = 2 (c - 1) [I 0]). Every other norm has eps 1e-12, so later layers ignore a common scale of the stream."""
    config = LlamaConfig(num_hidden_layers=4, **{**COMMON, "hidden_act": "sigmoid", "rms_norm_eps": 1e-12})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    block, hidden = model.model.layers[2], COMMON["hidden_size"]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.post_attention_layernorm.weight.fill_(1e6)
        block.post_attention_layernorm.variance_epsilon = 1e12
        block.mlp.gate_proj.weight.zero_()
        block.mlp.up_proj.weight.zero_()
        block.mlp.up_proj.weight[:hidden] = torch.eye(hidden)
        block.mlp.down_proj.weight.zero_()
        block.mlp.down_proj.weight[:, :hidden] = 2 * (c - 1) * torch.eye(hidden)
    return model


def test_a_block_that_scales_the_stream_is_restored_exactly(calib, tmp_path):
    from llmdrop.source.models import LoadedModel

    original = scaling_block_model(3.0)
    expected = logits(original)
    results = {}
    for method in (None, "scale"):
        out = tmp_path / f"out-{method}"
        model = scaling_block_model(3.0)
        loaded = LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "scaling-block", "scaling-block")
        record = llmdrop.drop(loaded, str(out), block_layers="2", compensate=method, calib=calib, progress=False,
                              dtype="float32")  # fmt: skip
        model = reload(out)
        assert type(model) is LlamaForCausalLM and model.config.num_hidden_layers == 3
        results[method] = (logits(model), record)
    assert (results[None][0] - expected).abs().max() > 1e-2  # the plain drop changes the logits
    torch.testing.assert_close(results["scale"][0], expected, atol=1e-4, rtol=1e-4)
    comp = results["scale"][1]["compensation"]
    (run,) = comp["runs"]
    assert run["from"] == "attn 2" and run["to"] == "mlp 2" and run["tokens"] == 6 * 20
    assert run["scale"] == pytest.approx(3.0, rel=1e-6)
    assert comp["method"] == "scale" and comp["forward_passes"] == 6
    assert "compensation" not in results[None][1]


def stream_scaled_reference(src, plan: DropPlan, scales: list[float]):
    """The source with ``plan`` applied in memory and the residual stream multiplied by each run's alpha at its cut
    (hooks, no fold): what the folded export must equal."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    layers = adapter.layer_list(model)  # hooked in the source's numbering, before blocks are removed
    for (first, last), alpha in zip(sublayer_runs(plan), scales, strict=True):
        # after an attention run the MLP reads layer last//2's input (its attention adds nothing); else the next layer
        at = last // 2 if last % 2 == 0 else last // 2 + 1
        target = layers[at] if at < len(layers) else model.get_submodule(adapter.final_norm)

        def scale(module, args, kwargs, alpha=alpha):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = kwargs["hidden_states"] * alpha
                return args, kwargs
            return (args[0] * alpha, *args[1:]), kwargs

        target.register_forward_pre_hook(scale, with_kwargs=True)
    apply_plan(model, adapter, plan)
    return model


@pytest.mark.parametrize(
    "arch, lists, fmt",
    [
        ("llama", {"block_layers": "1,3-4"}, "auto"),  # vanilla: two runs of blocks
        ("llama", {"attn_layers": "0,3", "mlp_layers": "3,5"}, "llmdrop"),  # a run across a layer, one at the end
        ("llama", {"attn_layers": "2", "mlp_layers": "1,4"}, "nemotron-nas"),
        ("qwen3", {"attn_layers": "2,3"}, "llmdrop"),  # q/k norms
        ("mixtral", {"mlp_layers": "1", "attn_layers": "4"}, "llmdrop"),  # every expert's down_proj
        ("phi3", {"block_layers": "2"}, "auto"),
        ("gemma2", {"attn_layers": "1", "mlp_layers": "3"}, "llmdrop"),  # sandwich: the post-sublayer norms
    ],
    ids=["llama-blocks", "llama-llmdrop", "llama-nemotron", "qwen3", "mixtral", "phi3", "gemma2"],
)
def test_the_fold_equals_scaling_the_stream_at_each_cut(arch, lists, fmt, calib, tmp_path):
    model = tiny_model(arch, 6)
    model.config.rms_norm_eps = 1e-12  # the norms then ignore a common scale exactly: what makes the fold exact
    src = save_checkpoint(model, tmp_path / "src")
    record = llmdrop.drop(str(src), str(tmp_path / "out"), compensate="scale", fmt=fmt, calib=calib, progress=False,
                          dtype="float32", **lists)  # fmt: skip
    plan = DropPlan(6, **{k: record["plan"][k] for k in ("blocks", "attn", "mlp")})
    scales = [run["scale"] for run in record["compensation"]["runs"]]
    assert len(scales) == len(sublayer_runs(plan)) and all(abs(s - 1) > 1e-3 for s in scales)
    expected = logits(stream_scaled_reference(src, plan, scales))
    got = logits(reload(tmp_path / "out"))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    plain = logits(stream_scaled_reference(src, plan, [1.0] * len(scales)))
    assert (plain - expected).abs().max() > 1e-3  # the compensation changed something


def test_alpha_of_an_attention_run_is_the_mean_norm_ratio(calib, tmp_path):
    src = save_checkpoint(tiny_model("llama", 4), tmp_path / "src")
    record = llmdrop.drop(str(src), str(tmp_path / "out"), attn_layers="2", compensate="scale", calib=calib,
                          progress=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tokens = calib.tokens(tiny_tokenizer())
    seen = {}
    model.model.layers[2].self_attn.register_forward_hook(lambda m, a, out: seen.update(attn=out[0]))
    ratios = []
    with torch.no_grad():
        for row in tokens:
            before = model(row[None], output_hidden_states=True).hidden_states[2]
            ratios.append(((before + seen["attn"]).norm(dim=-1) / before.norm(dim=-1)).flatten())
    (run,) = record["compensation"]["runs"]
    assert run["scale"] == pytest.approx(torch.cat(ratios).mean().item(), rel=1e-5)


def test_scale_is_recorded_and_reported_by_the_cli(calib, tmp_path):
    src = save_checkpoint(tiny_model("llama", 4), tmp_path / "src")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["drop", str(src), "-o", str(out), "--attn-layers", "1", "--compensate", "scale", "--calib",
              calib.source, "--samples", "4", "--seq-len", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "llmdrop.json").read_text())
    alpha = record["compensation"]["runs"][0]["scale"]
    assert f"attn 1 compensated: residual stream x {alpha:.3f}" in result.output
    card = (out / "README.md").read_text()
    assert "--compensate scale" in card and f"{alpha:.3f}" in card


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attn", "2", "--compensate", "quadratic"], "unknown --compensate 'quadratic'; use linear, scale"),
        (["--attn", "2", "--compensate", "linear"], "this request drops only attention or only MLP sublayers"),
    ],
)
def test_bad_compensation_requests_are_one_line_before_loading(args, message, tmp_path):
    result = CliRunner().invoke(app, ["drop", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_streamed_moe_whose_experts_are_stored_apart_is_refused_in_one_line(calib, tmp_path):
    src = save_checkpoint(tiny_model("mixtral", 4), tmp_path / "src")
    result = CliRunner().invoke(
        app, ["drop", str(src), "-o", str(tmp_path / "out"), "--mlp-layers", "1", "--format", "llmdrop", "--stream",
              "--compensate", "scale", "--calib", calib.source, "--samples", "4", "--seq-len", "16"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: --stream --compensate scale scales model.layers.2.mlp.down_proj.weight, which this checkpoint does "
        "not store (mixtral); compensate without --stream"
    )
    assert not (tmp_path / "out").exists()
