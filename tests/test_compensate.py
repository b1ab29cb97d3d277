"""--compensate linear (passes.compensate): a run that is exactly linear in the MLP output of the layer before it
is restored to the original logits, the fold is exact for every kind of MLP, and the export stays vanilla."""

import json

import pytest
import torch
from tiny_models import COMMON, random_words_file, save_checkpoint, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import llmdrop
from llmdrop.cli import app
from llmdrop.planning import compensate
from llmdrop.planning.compensate import fold, runs
from llmdrop.source.calibration import CalibSpec

HIDDEN = COMMON["hidden_size"]
SUB = torch.arange(HIDDEN // 2, HIDDEN)  # a subspace the residual stream leaves empty until layer 1's MLP
REST = torch.arange(0, HIDDEN // 2)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return CalibSpec(str(random_words_file(tmp_path_factory.mktemp("calib"))), samples=8, seq_len=24)


def linear_run_model():
    """4 layers; block 2 maps out_1 = h_mid + m (layer 1's post-attention stream plus its MLP output) to exactly
    h_mid + m (I + B) with B != 0: the linear map ReplaceMe estimates exists.

    - RMS norms are made linear (eps 1e12, weight 1e6: x / sqrt(mean x^2 + eps) * 1e6 = x up to 1e-12);
    - the embeddings, layer 0 and layer 1's attention write nothing into SUB, so h_mid has no SUB component;
    - block 2's attention adds nothing, its MLP reads only SUB (up_proj), with a constant gate (sigmoid(0) = 0.5):
      mlp(x) = 0.5 * down(up(x)) is linear and sees only m, so h_3 = h_mid + m + 0.5 m U^T D^T."""
    config = LlamaConfig(num_hidden_layers=4, **{**COMMON, "hidden_act": "sigmoid", "rms_norm_eps": 1e12})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    layers = model.model.layers
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.fill_(1e6)
        model.model.embed_tokens.weight.mul_(50)
        model.model.embed_tokens.weight[:, SUB] = 0
        model.lm_head.weight[:, SUB] *= 30  # the logits read the subspace the run changes
        layers[0].self_attn.o_proj.weight[SUB] = 0
        layers[0].mlp.down_proj.weight[SUB] = 0
        layers[1].self_attn.o_proj.weight[SUB] = 0
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.gate_proj.weight.zero_()
        layers[2].mlp.up_proj.weight[:, REST] = 0
        layers[2].mlp.down_proj.weight.mul_(30)
    return model


def test_exactly_linear_run_is_restored_and_the_export_is_vanilla(calib, tmp_path):
    original = linear_run_model()
    src = save_checkpoint(original, tmp_path / "src")
    ids = torch.randint(4, 132, (3, 20), generator=torch.Generator().manual_seed(1))  # not the calibration text
    with torch.no_grad():
        expected = original(ids, use_cache=False).logits
    logits = {}
    for method in (None, "linear"):
        out = tmp_path / f"out-{method}"
        plan = llmdrop.drop(
            str(src),
            str(out),
            block_layers="2",
            compensate=method,
            compensate_ridge=0,  # plain least squares: the exact map
            calib=calib,
            progress=False,
        )["plan"]
        assert plan["blocks"] == [2]
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
        assert config["num_hidden_layers"] == 3
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # plain transformers
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert type(model) is LlamaForCausalLM
        with torch.no_grad():
            logits[method] = model.eval()(ids, use_cache=False).logits
        record = json.loads((out / "llmdrop.json").read_text())
    assert (logits[None] - expected).abs().max() > 1e-2  # dropping the run alone changes the logits
    torch.testing.assert_close(logits["linear"], expected, atol=1e-5, rtol=0)
    (run,) = record["compensation"]["runs"]
    assert run["layers"] == [2, 2] and run["folded_into"] == "layer 1 MLP output projection"
    assert run["tokens"] == 8 * 24
    assert run["relative_error_plain_drop"] > 0.05 and run["relative_error_compensated"] < 1e-9
    assert record["exported"]["format"] == "vanilla" and record["compensation"]["ridge"] == 0


def test_runs_are_compensated_in_order_and_a_run_at_layer_0_is_reported(calib, tmp_path):
    src, out = save_checkpoint(tiny_model("llama", 8), tmp_path / "src"), tmp_path / "out"
    record = llmdrop.drop(str(src), str(out), block_layers="0,3,4,6", compensate="linear", calib=calib, progress=False)[
        "compensation"
    ]
    first, second, third = record["runs"]
    assert first == {
        "layers": [0, 0],
        "skipped": "the run starts at layer 0: there is no layer before it to fold the map into",
    }
    assert second["layers"] == [3, 4] and second["folded_into"] == "layer 2 MLP output projection"
    assert third["layers"] == [6, 6] and third["folded_into"] == "layer 5 MLP output projection"
    for run in (second, third):  # least squares on the calibration tokens beats the plain drop (T = identity)
        assert run["relative_error_compensated"] < run["relative_error_plain_drop"]
    assert record["forward_passes"] == 2 * 8
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    # the layers before the runs carry the folded weights, the others are the source's
    source = tiny_model("llama", 8).state_dict()
    state = model.state_dict()
    for exported, src_layer in ((0, 1), (1, 2), (2, 5), (3, 7)):
        name = "model.layers.{}.mlp.down_proj.weight"
        same = torch.equal(state[name.format(exported)], source[name.format(src_layer)])
        assert same == (src_layer not in (2, 5)), src_layer


def test_ridge_shrinks_the_map_from_least_squares_toward_the_plain_drop():
    """ridge 0 is the least-squares solution, a huge ridge the identity (the plain drop); in between the fit on the
    calibration rows gets worse as the ridge grows, never better than least squares nor worse than the plain drop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = x @ (torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64))
    y += 0.5 * torch.randn(300, 16, generator=g, dtype=torch.float64)
    stats = compensate._LeastSquares(16)
    stats.add(x, y)
    t0, r0 = stats.solve(0)
    torch.testing.assert_close(t0, torch.linalg.lstsq(x, y).solution, atol=1e-9, rtol=0)
    t_inf, r_inf = stats.solve(1e12)
    torch.testing.assert_close(t_inf, torch.eye(16, dtype=torch.float64), atol=1e-9, rtol=0)
    assert r_inf == pytest.approx(stats.plain / stats.yty, rel=1e-6)
    residuals = [stats.solve(ridge)[1] for ridge in (0, 0.01, 0.1, 1, 10)]
    assert residuals == sorted(residuals) and r0 < residuals[-1] < r_inf


def test_a_negative_ridge_is_refused_before_loading(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "drop",
            str(tmp_path / "no-model"),
            "-o",
            str(tmp_path / "out"),
            "--blocks",
            "1",
            "--compensate",
            "linear",
            "--compensate-ridge",
            "-1",
        ],
    )
    assert result.exit_code != 0
    assert "error: --compensate-ridge must be a number >= 0, got -1.0" in result.output


@pytest.mark.parametrize("arch", ["llama-bias", "phi3", "qwen3", "mixtral"])
def test_fold_multiplies_the_mlp_output_by_the_map(arch):
    if arch == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, mlp_bias=True, **COMMON))
    else:
        model = tiny_model(arch, 1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    transform = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(1)) / HIDDEN**0.5
    with torch.no_grad():
        expected = mlp(x) @ transform
        fold(mlp, transform)
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-4)


def test_runs():
    assert runs([9, 3, 4, 5]) == [(3, 5), (9, 9)]
    assert runs([]) == []


def test_sandwich_norms_are_refused_before_any_work(calib, tmp_path):
    src = save_checkpoint(tiny_model("gemma2", 4), tmp_path / "src")
    result = CliRunner().invoke(
        app, ["drop", str(src), "-o", str(tmp_path / "out"), "--blocks", "1", "--compensate", "linear"]
    )
    assert result.exit_code == 1
    assert "error: --compensate linear folds a map into the MLP output of the layer before a dropped run; gemma2" in (
        result.output
    )
    assert not (tmp_path / "out").exists()


def test_a_request_without_blocks_is_refused_before_loading(tmp_path):
    result = CliRunner().invoke(
        app, ["drop", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), "--attn", "2", "--compensate", "linear"]
    )
    assert result.exit_code == 1
    assert "--compensate linear replaces dropped blocks; this request drops only attention" in result.output
