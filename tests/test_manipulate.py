"""The Attend-First manipulations change exactly the positions and layers they should (tiny random models)."""

import pytest
import torch
from tiny_models import ARCHS, FIRST_WORD_ID, identity_hooks, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmdrop
from llmdrop.analysis.manipulate import Manipulation, capture_layer_inputs, last_logits, token_positions
from llmdrop.compat import output_cache
from llmdrop.errors import LlmdropError
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel

N_LAYERS, K = 6, 3
IDS = torch.tensor([[FIRST_WORD_ID + i for i in (5, 17, 3, 99, 42, 8, 61, 23)]])
PREV = slice(0, IDS.shape[1] - 1)  # the previous tokens of one unpadded row


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=N_LAYERS)


def run(model, ids=IDS, mask=None, manip=None):
    """(layer inputs x^0..x^{L-1}, last-position logits) with an optional manipulation open."""
    mask = torch.ones_like(ids) if mask is None else mask
    with capture_layer_inputs(model) as xs:
        if manip is None:
            logits = last_logits(model, ids, mask)
        else:
            with manip:
                logits = last_logits(model, ids, mask)
    return xs, logits


def test_token_positions_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pos, prev = token_positions(mask)
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]
    assert prev.tolist() == [
        [False, False, True, True, False],
        [True, True, True, True, False],
        [True, False, False, False, False],
    ]


def test_random_same_norm_new_direction_only_at_layer_k(llama):
    base, base_logits = run(llama)
    xs, logits = run(llama, manip=Manipulation(llama, "random", K, seed=1))
    for layer in range(K):  # layers below k: bitwise untouched
        assert torch.equal(xs[layer], base[layer])
    assert torch.equal(xs[K][:, -1], base[K][:, -1])  # the last token's x^k is untouched
    new, old = xs[K][0, PREV], base[K][0, PREV]
    torch.testing.assert_close(new.norm(dim=-1), old.norm(dim=-1), rtol=1e-5, atol=0)
    assert torch.cosine_similarity(new, old, dim=-1).abs().max() < 0.5  # random directions in 64 dims
    assert not torch.equal(xs[K + 1][:, -1], base[K + 1][:, -1])  # the last token reads the damage from k on
    assert not torch.allclose(logits, base_logits)
    # seeded, and a function of the token index only: a different prompt gets the same directions
    again, _ = run(llama, manip=Manipulation(llama, "random", K, seed=1))
    assert torch.equal(again[K], xs[K])
    other, _ = run(llama, ids=IDS.flip(1), manip=Manipulation(llama, "random", K, seed=1))
    base_other, _ = run(llama, ids=IDS.flip(1))
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(unit(other[K][0, PREV]), unit(new), rtol=0, atol=1e-5)
    assert not torch.allclose(unit(base_other[K][0, PREV]), unit(new))
    seed2, _ = run(llama, manip=Manipulation(llama, "random", K, seed=2))
    assert not torch.allclose(seed2[K], xs[K])


def test_shuffle_permutes_dimensions_of_previous_tokens(llama):
    base, _ = run(llama)
    xs, _ = run(llama, manip=Manipulation(llama, "shuffle", K, seed=0))
    for layer in range(K):
        assert torch.equal(xs[layer], base[layer])
    assert torch.equal(xs[K][:, -1], base[K][:, -1])
    new, old = xs[K][0, PREV], base[K][0, PREV]
    assert torch.equal(new.sort(dim=-1).values, old.sort(dim=-1).values)  # same values...
    assert not torch.equal(new, old)  # ...other places
    # recover each token's permutation: one per token, not one for all
    perms = [(old[t][None] == new[t][:, None]).float().argmax(1) for t in range(new.shape[0])]
    for t, perm in enumerate(perms):
        assert torch.equal(old[t][perm], new[t])
    assert len({tuple(p.tolist()) for p in perms}) == len(perms)


@pytest.mark.parametrize("k", [0, 1, K])
def test_freeze_keeps_x_k_minus_1_from_layer_k_on(llama, k):
    base, _ = run(llama)
    xs, _ = run(llama, manip=Manipulation(llama, "freeze", k))
    frozen = base[max(k - 1, 0)][0, PREV]  # x^{k-1}: the input of layer k-1 (the embeddings for k = 0)
    for layer in range(N_LAYERS):
        if layer < k:
            assert torch.equal(xs[layer], base[layer])
        else:
            assert torch.equal(xs[layer][0, PREV], frozen)
    assert torch.equal(xs[k][:, -1], base[k][:, -1])
    assert not torch.equal(xs[N_LAYERS - 1][:, -1], base[N_LAYERS - 1][:, -1])


def test_freeze_at_0_equals_freeze_at_1(llama):
    _, a = run(llama, manip=Manipulation(llama, "freeze", 0))
    _, b = run(llama, manip=Manipulation(llama, "freeze", 1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_attention_is_zero_attention_from_k_and_restores(arch):
    model = tiny_model(arch, num_layers=N_LAYERS)
    base, base_logits = run(model)
    with identity_hooks(model, attn=range(K, N_LAYERS)):  # reference written without llmdrop
        ref, ref_logits = run(model)
    config = model.config
    xs, logits = run(model, manip=Manipulation(model, "skip-attention", K))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for layer in range(K + 1):  # layer k's input is still the unmanipulated one
        assert torch.equal(xs[layer], base[layer])
    # leaving the context puts the original modules, config and cache numbering back
    assert model.config is config
    _, after = run(model)
    assert torch.equal(after, base_logits)
    layers = adapter_for(model.config).layer_list(model)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(N_LAYERS))


def test_inject_replaces_exactly_the_word_positions(llama):
    donor = torch.tensor([[FIRST_WORD_ID + i for i in (70, 71, 72, 73, 74)]])
    donor_xs, _ = run(llama, ids=donor)
    span, dspan = [2, 3], [1, 2]
    states = donor_xs[K][0, dspan][None]
    base, _ = run(llama)
    xs, _ = run(llama, manip=Manipulation(llama, "inject", K, donor_states=states, positions=[span]))
    for layer in range(K):
        assert torch.equal(xs[layer], base[layer])
    assert torch.equal(xs[K][0, span], donor_xs[K][0, dspan])
    others = [t for t in range(IDS.shape[1]) if t not in span]
    assert torch.equal(xs[K][0, others], base[K][0, others])
    assert not torch.equal(xs[K + 1][0, -1], base[K + 1][0, -1])


def test_errors(llama):
    with pytest.raises(LlmdropError, match="unknown manipulation"):
        Manipulation(llama, "scramble", 1)
    with pytest.raises(LlmdropError, match="out of range"):
        Manipulation(llama, "random", N_LAYERS)
    with pytest.raises(LlmdropError, match="inject needs"):
        Manipulation(llama, "inject", 1)


@pytest.mark.parametrize("kind", ["freeze", "random", "shuffle", "inject"])
def test_generate_under_a_manipulation_is_refused(llama, kind):
    """generate() decodes on a KV cache (``cache=`` or ``past_key_values=``, by transformers version) whose
    states escape the manipulation: it must fail, not return other tokens. skip-attention is real surgery."""
    extra = {"donor_states": torch.zeros(1, 1, 64), "positions": [[0]]} if kind == "inject" else {}
    with llmdrop.manipulation(llama, kind, K, **extra), pytest.raises(LlmdropError, match="without a KV cache"):
        llama.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=3)
    # the hooks are gone again: plain generation works
    assert llama.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=3).shape == (1, IDS.shape[1] + 3)


def test_a_cache_passed_positionally_is_refused(llama):
    cache = output_cache(llama(IDS[:, :4], use_cache=True))
    with Manipulation(llama, "random", K), pytest.raises(LlmdropError, match="without a KV cache"):
        llama.model(IDS[:, 4:5], None, None, cache)  # input_ids, attention_mask, position_ids, cache


# ------------------------------------------------------------------------------------------ batched = unbatched

ROWS = [IDS[0].tolist(), IDS[0, 2:7].tolist(), IDS[0, :3].tolist()]


def left_pad(rows, pad=3):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("kind", ["freeze", "random", "shuffle", "skip-attention", "inject"])
def test_left_padded_batch_equals_rows_alone(llama, kind):
    def manip(rows=None):
        if kind != "inject":
            return Manipulation(llama, kind, K, seed=3)
        states = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0))
        m = Manipulation(llama, kind, K, donor_states=states, positions=[[1], [0], [2]])
        m.rows = rows
        return m

    ids, mask = left_pad(ROWS)
    _, batch = run(llama, ids, mask, manip())
    for r, row in enumerate(ROWS):
        _, alone = run(llama, torch.tensor([row]), manip=manip(rows=[r]))
        torch.testing.assert_close(batch[r], alone[0], rtol=0, atol=1e-4)


def test_skip_attention_probe_equals_export(tmp_path):
    from llmdrop import api

    model = tiny_model("llama", num_layers=N_LAYERS)
    _, probe_logits = run(model, manip=Manipulation(model, "skip-attention", K))
    copy = tiny_model("llama", num_layers=N_LAYERS)  # the export transforms its model in place
    loaded = LoadedModel(copy, tiny_tokenizer(), adapter_for(copy.config), "tiny", "tiny")
    out = tmp_path / "skip"
    record = api.drop(loaded, out=str(out), skip_attention_from=K, progress=False)
    assert record["plan"]["attn"] == list(range(K, N_LAYERS))
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    _, export_logits = run(exported)
    torch.testing.assert_close(export_logits, probe_logits, rtol=0, atol=1e-6)
    with pytest.raises(LlmdropError, match="skip-attention-from"):
        api.drop(loaded, out=str(tmp_path / "x"), skip_attention_from=K, attn=2, progress=False)
