"""llmdrop.formats.export on tiny random models of every supported architecture.

The reference for every export is the ORIGINAL model with forward hooks that zero the dropped
sublayers and make the dropped blocks return their input (tests/tiny_models.py, no llmdrop code).
"""

import json
import os
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import ARCHS, FIRST_WORD_ID, SUBLAYER_MODULES, VOCAB_SIZE, identity_hooks, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmdrop.compat import cache_kwarg, output_cache
from llmdrop.errors import LlmdropError
from llmdrop.formats.export import export
from llmdrop.formats.exporters import DROP_CODE_FILES
from llmdrop.planning.plan import DropPlan
from llmdrop.record import EXPORT_FORMAT as FORMAT
from llmdrop.source.models import load_model

N = 6
# Attention of layer 0 dropped: DynamicCache.get_seq_length() reads cache layer 0, which must be a kept one.
SUBLAYER_PLAN = dict(blocks=[4], attn=[0, 3], mlp=[1])  # exported: layers 0,1,2,3,5 -> 0..4; attn [0, 3]; mlp [1]
BLOCK_PLAN = dict(blocks=[0, 4])
SLIDING_ARCHS = ["mistral", "qwen2", "gemma2", "gemma3_text"]


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def token_ids(batch=2, length=14, seed=0):
    return torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


IDS = token_ids()


@cache
def source_dir(arch) -> Path:
    """The tiny model saved to disk: exports start from a checkpoint on disk, as users' do (transformers writes
    some architectures, Mixtral, in another layout than the one it runs)."""
    folder = Path(tempfile.mkdtemp(prefix=f"llmdrop-src-{arch}-"))
    tiny_model(arch, N).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def loaded(arch):
    model = load_model(str(source_dir(arch)), device="cpu")
    # transformers 5 reloads a word-level tokenizer saved beside a Qwen2 config as a (broken) Qwen2Tokenizer
    model.tokenizer = tiny_tokenizer()
    return model


@cache
def reference_logits(arch, attn=(), mlp=(), blocks=()):
    """Logits of the original model on IDS with these parts made identities (source numbering)."""
    model = tiny_model(arch, N)
    with torch.no_grad(), identity_hooks(model, attn, mlp, blocks):
        return model(IDS, use_cache=False).logits


def plan_reference(arch, plan):
    return reference_logits(arch, tuple(plan.get("attn", ())), tuple(plan.get("mlp", ())), tuple(plan["blocks"]))


def load(out, **kwargs):
    """Reload an export as a user would; every weight must come from the checkpoint and every tensor be used."""
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@torch.no_grad()
def logits(model, ids=IDS, **kwargs):
    return model(ids, use_cache=False, **kwargs).logits


def kept_attention_types(arch, plan):
    """Layer types (sliding / full) of the attention layers an export keeps, in order."""
    config = tiny_model(arch, N).config
    default = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"  # Mistral: all slide
    types = getattr(config, "layer_types", None) or [default] * N
    gone = set(plan["blocks"]) | set(plan.get("attn", ()))
    return [types[i] for i in range(N) if i not in gone]


@pytest.fixture(scope="module", params=ARCHS)
def sub_export(request, tmp_path_factory):
    """(arch, out dir) of an export with attention, MLP sublayers and a block dropped."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    export(loaded(request.param), DropPlan(N, **SUBLAYER_PLAN), out)
    return request.param, out


@pytest.fixture(scope="module")
def sub_model(sub_export):
    return load(sub_export[1], trust_remote_code=True)


# --------------------------------------------------------------------------- 1. round trip


def test_sublayer_export_matches_identity_reference(sub_export, sub_model):
    arch, out = sub_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"llmdrop_{arch}"
    assert (config["num_hidden_layers"], config["drop_attn_list"], config["drop_mlp_list"]) == (5, [0, 3], [1])
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert type(sub_model).__name__.startswith("Llmdrop")
    ref = plan_reference(arch, SUBLAYER_PLAN)
    torch.testing.assert_close(logits(sub_model), ref, atol=1e-5, rtol=0)
    # the hooks matter: the untouched original gives other logits
    assert (reference_logits(arch) - ref).abs().max() > 1e-2


# --------------------------------------------------------------------------- 2. KV cache


def check_kv_cache(model, arch, plan):
    kept_types = kept_attention_types(arch, plan)
    full = logits(model)
    with torch.no_grad():
        out = model(IDS[:, :8], use_cache=True)
        cache = output_cache(out)
        assert len(cache.layers) == len(kept_types)
        assert [layer.is_sliding for layer in cache.layers] == [t == "sliding_attention" for t in kept_types]
        steps = [out.logits[:, -1]]
        for t in range(8, IDS.shape[1] - 1):  # no position_ids: positions come from cache.get_seq_length()
            out = model(IDS[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length() == IDS.shape[1] - 1
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:-1], atol=1e-4, rtol=0)

    # generate() (incremental, its own cache) == greedy decoding by full forwards
    model.generation_config.eos_token_id = None  # never stop early
    prompt = IDS[:, :8]
    gen = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=3,
        return_dict_in_generate=True,
    )
    assert len(gen.past_key_values.layers) == len(kept_types)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.sequences, seq)


def test_kv_cache_holds_kept_attention_layers_only(sub_export, sub_model):
    check_kv_cache(sub_model, sub_export[0], SUBLAYER_PLAN)


# --------------------------------------------------------------------------- 3. left padding


def test_left_padding_matches_rows_alone(sub_model):
    lengths = (12, 7)
    rows = [token_ids(1, n, seed=n)[0] for n in lengths]
    ids = torch.full((2, 12), 3)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, 12 - len(row) :], mask[r, 12 - len(row) :] = row, 1
    sub_model.generation_config.eos_token_id = None
    batch_last = logits(sub_model, ids, attention_mask=mask)[:, -1]
    batch_gen = sub_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=3)
    for r, row in enumerate(rows):
        alone = row[None]
        torch.testing.assert_close(batch_last[r], logits(sub_model, alone)[0, -1], atol=1e-4, rtol=0)
        gen = sub_model.generate(
            alone, attention_mask=torch.ones_like(alone), max_new_tokens=4, do_sample=False, pad_token_id=3
        )
        assert torch.equal(batch_gen[r, 12:], gen[0, len(row) :])


# --------------------------------------------------------------------------- 4. attention implementations


def test_eager_and_sdpa_agree(sub_export):
    arch, out = sub_export
    eager = load(out, trust_remote_code=True, attn_implementation="eager")
    with torch.no_grad():
        assert len(eager(IDS, use_cache=False, output_hidden_states=True).hidden_states) == 5 + 1
        attentions = eager(IDS, use_cache=False, output_attentions=True).attentions
    # one entry per exported layer, as for hidden_states: attentions[i] is layer i's, None where it was dropped
    assert [a is None for a in attentions] == [i in (0, 3) for i in range(5)]
    for a in (attentions[i] for i in (1, 2, 4)):
        assert a.shape == (2, 4, IDS.shape[1], IDS.shape[1])
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    if not type(tiny_model(arch, 1))._supports_sdpa:  # Gemma 2 (softcapping): the base class refuses sdpa too
        with pytest.raises(ValueError, match="scaled_dot_product_attention"):
            load(out, trust_remote_code=True, attn_implementation="sdpa")
        return
    sdpa = load(out, trust_remote_code=True, attn_implementation="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    torch.testing.assert_close(logits(eager), logits(sdpa), atol=1e-4, rtol=0)


SUBLAYER_ONLY_PLAN = dict(blocks=[], attn=[1, 5], mlp=[0, 2])


@pytest.mark.parametrize("arch", ARCHS)
def test_sublayer_only_export_reloads_every_tensor(arch, tmp_path):
    out = export(loaded(arch), DropPlan(N, **SUBLAYER_ONLY_PLAN), tmp_path / "out")
    check_tensors(out, arch, SUBLAYER_ONLY_PLAN)
    model = load(out, trust_remote_code=True)  # asserts no missing / unexpected tensor
    torch.testing.assert_close(logits(model), plan_reference(arch, SUBLAYER_ONLY_PLAN), atol=1e-5, rtol=0)


def test_export_refuses_a_checkpoint_that_would_reload_with_random_weights(tmp_path, monkeypatch):
    """Without the Mixtral layout conversion for llmdrop_mixtral, the reload would miss the fused experts: the export
    must say so and write nothing (the defect that once shipped random experts silently)."""
    from transformers import conversion_mapping

    conversion_mapping.get_checkpoint_conversion_mapping("mixtral")  # builds the cache
    cache = dict(conversion_mapping._checkpoint_conversion_mapping_cache)
    del cache["llmdrop_mixtral"]
    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", cache)
    with pytest.raises(
        LlmdropError,
        match=r"export refused: the checkpoint would load without "
        r"model\.layers\.0\.mlp\.experts\.down_proj \(and \d+ more\)",
    ):
        export(loaded("mixtral"), DropPlan(N, **SUBLAYER_PLAN), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 5. sizes and tensor names


def expected_tensors(arch, plan):
    """name -> shape of what the export must hold, derived from the original model's modules."""
    model = tiny_model(arch, N)
    parts = SUBLAYER_MODULES[arch]
    keep = {src: dst for dst, src in enumerate(i for i in range(N) if i not in plan["blocks"])}
    dropped = {f"model.layers.{i}." for i in plan["blocks"]}
    dropped |= {f"model.layers.{i}.{m}." for kind in parts for i in plan.get(kind, ()) for m in parts[kind]}
    removed = sum(p.numel() for name, p in model.named_parameters() if any(name.startswith(d) for d in dropped))
    # the same count, straight from the modules (sublayer + its norms, whole blocks)
    layers = model.model.layers
    modules = [layers[i] for i in plan["blocks"]]
    modules += [layers[i].get_submodule(m) for kind in parts for i in plan.get(kind, ()) for m in parts[kind]]
    assert removed == sum(p.numel() for m in modules for p in m.parameters()) > 0

    def renumber(name):
        parts = name.split(".")
        parts[2] = str(keep[int(parts[2])])
        return ".".join(parts)

    expected = {}
    for name, p in model.named_parameters():  # tied weights appear once, as in the checkpoint
        if any(name.startswith(d) for d in dropped):
            continue
        expected[renumber(name) if name.startswith("model.layers.") else name] = tuple(p.shape)
    assert sum(torch.Size(s).numel() for s in expected.values()) == sum(p.numel() for p in model.parameters()) - removed
    return expected


def saved_tensors(out):
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def by_layer(tensors):
    """Number of weights per decoder layer ("model.layers.3") and per other tensor name."""
    groups = {}
    for name, shape in tensors.items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups[key] = groups.get(key, 0) + torch.Size(shape).numel()
    return groups


def check_tensors(out, arch, plan):
    """The checkpoint holds exactly the kept weights; Mixtral's in the Hub layout (unfused experts), which
    transformers converts on load, so those are compared per layer."""
    saved, expected = saved_tensors(out), expected_tensors(arch, plan)
    if arch == "mixtral":
        assert any(name.endswith("block_sparse_moe.experts.0.w1.weight") for name in saved)
        assert by_layer(saved) == by_layer(expected)
    else:
        assert saved == expected


def test_sublayer_export_size(sub_export):
    arch, out = sub_export
    check_tensors(out, arch, SUBLAYER_PLAN)


# --------------------------------------------------------------------------- 6. vanilla block export


@pytest.mark.parametrize("arch", ARCHS)
def test_block_export_is_vanilla(arch, tmp_path):
    source_config = tiny_model(arch, N).config
    out = export(loaded(arch), DropPlan(N, **BLOCK_PLAN), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not list(out.glob("*.py"))
    assert config["model_type"] == arch and config["num_hidden_layers"] == N - 2
    assert "drop_attn_list" not in config and "llmdrop_sublayers" not in config
    kept = [i for i in range(N) if i not in BLOCK_PLAN["blocks"]]
    if getattr(source_config, "layer_types", None) is not None:
        assert config["layer_types"] == [source_config.layer_types[i] for i in kept]
    if arch in SLIDING_ARCHS:
        assert config["sliding_window"] == source_config.sliding_window
        assert arch == "mistral" or len(set(config["layer_types"])) == 2  # still mixes sliding and full
    check_tensors(out, arch, BLOCK_PLAN)
    model = load(out)  # no trust_remote_code
    assert type(model) is type(tiny_model(arch, 1))
    torch.testing.assert_close(logits(model), plan_reference(arch, BLOCK_PLAN), atol=1e-5, rtol=0)
    check_kv_cache(model, arch, BLOCK_PLAN)


# --------------------------------------------------------------------------- re-exporting an export

# second plan on the 5-layer export (its numbering) -> everything gone from the source (source numbering)
REEXPORTS = {
    "blocks-only": (dict(blocks=[1]), dict(blocks=[1, 4], attn=[0, 3], mlp=[])),
    "sublayers": (dict(blocks=[1], attn=[2], mlp=[4]), dict(blocks=[1, 4], attn=[0, 2, 3], mlp=[5])),
}


@pytest.mark.parametrize("second", REEXPORTS)
def test_reexport_keeps_earlier_drops(sub_export, second, tmp_path):
    """An export loaded back with llmdrop.load_model and exported again still lacks its earlier sublayers."""
    arch, out = sub_export
    plan, total = REEXPORTS[second]
    out2 = export(load_model(str(out), device="cpu"), DropPlan(5, **plan), tmp_path / "out2")
    kept = [i for i in range(N) if i not in total["blocks"]]
    attn, mlp = ([kept.index(i) for i in total[k]] for k in ("attn", "mlp"))
    config = json.loads((out2 / "config.json").read_text())
    assert (config["model_type"], config["drop_attn_list"], config["drop_mlp_list"]) == (f"llmdrop_{arch}", attn, mlp)
    check_tensors(out2, arch, total)
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    model = load(out2, trust_remote_code=True)
    torch.testing.assert_close(logits(model), plan_reference(arch, total), atol=1e-5, rtol=0)
    # the provenance record and the model card describe the checkpoint as it is
    exported = json.loads((out2 / "llmdrop.json").read_text())["exported"]
    assert (exported["drop_attn_list"], exported["drop_mlp_list"], exported["remote_code"]) == (attn, mlp, True)
    assert "custom_code" in yaml.safe_load((out2 / "README.md").read_text().split("---\n")[1])["tags"]


# --------------------------------------------------------------------------- 7. no silent random weights


@pytest.mark.parametrize("trust", [None, False])
def test_sublayer_export_needs_trust_remote_code(sub_export, trust):
    out = sub_export[1]
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(out, **kwargs)
    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(out, **kwargs)


# --------------------------------------------------------------------------- 8. files


def test_export_dir_contents(sub_export):
    arch, out = sub_export
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "llmdrop.json",
        "README.md",
        *DROP_CODE_FILES,
    } <= {p.name for p in out.iterdir()}
    assert not list(out.glob("attention_calibration*"))  # a drop-only export ships only the drop code
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~current_umask())}
    assert not {"local_files_only", "is_local"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w0 w5 w127")["input_ids"] == tiny_tokenizer()("w0 w5 w127")["input_ids"] == [4, 9, 131]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")

    record = json.loads((out / "llmdrop.json").read_text())
    assert record["format"] == FORMAT == "llmdrop.export/1"
    assert record["plan"] == {"num_layers": N, "method": "explicit", **SUBLAYER_PLAN}
    assert record["layer_map"] == {"0": 0, "1": 1, "2": 2, "3": 3, "5": 4}
    assert record["source"]["model_type"] == arch
    assert (
        record["exported"].items()
        >= {
            "num_layers": 5,
            "drop_attn_list": [0, 3],
            "drop_mlp_list": [1],
            "remote_code": True,
            "dtype": "float32",
        }.items()
    )

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta and meta["library_name"] == "transformers"  # a local folder is no Hub id
    assert {"llmdrop", "custom_code"} <= set(meta["tags"])


# --------------------------------------------------------------------------- 9. overwrite and atomicity


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_out_refused_then_overwritten(tmp_path):
    out = export(loaded("llama"), DropPlan(N, blocks=[1]), tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(LlmdropError, match="already exists"):
        export(loaded("llama"), DropPlan(N, attn=[2]), out)
    assert snapshot(out) == before
    export(loaded("llama"), DropPlan(N, attn=[2]), out, overwrite=True)
    assert json.loads((out / "llmdrop.json").read_text())["plan"]["attn"] == [2]
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"  # auto: vLLM can serve it
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("fail_at", ["save", "rename"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, existing, fail_at):
    """A crash while writing (or while moving the finished dir into place) leaves OUT as it was, and no siblings."""
    out = tmp_path / "out"
    if existing:
        export(loaded("llama"), DropPlan(N, blocks=[1]), out)
    before = snapshot(out) if existing else None
    src = loaded("llama")
    if fail_at == "save":

        def boom(path, *args, **kwargs):
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_bytes(b"half a checkpoint")
            raise RuntimeError("disk full")

        monkeypatch.setattr(src.model, "save_pretrained", boom)
    else:
        rename = Path.rename

        def boom(self, target):
            if ".llmdrop-tmp-" in self.name:  # the finished temporary directory
                raise RuntimeError("disk full")
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(src, DropPlan(N, attn=[2]), out, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert snapshot(out) == before


# --------------------------------------------------------------------------- 10. nemotron-nas (vLLM's DeciLM format)

NAS_PLAN = dict(blocks=[4], attn=[1, 3], mlp=[2])  # exported: layers 0,1,2,3,5 -> 0..4; attn [1, 3]; mlp [2]


def nas_source(arch) -> Path:
    """Llama-family sources nemotron-nas can hold: Mistral and Qwen2 without a sliding window."""
    from tiny_models import COMMON
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config = {
        "llama": lambda: LlamaConfig(num_hidden_layers=N, **COMMON),
        "mistral": lambda: MistralConfig(num_hidden_layers=N, sliding_window=None, **COMMON),
        "qwen2": lambda: Qwen2Config(num_hidden_layers=N, use_sliding_window=False, **COMMON),
    }[arch]()
    folder = Path(tempfile.mkdtemp(prefix=f"llmdrop-nas-{arch}-"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def nas_export(request, tmp_path_factory):
    arch = request.param
    src = nas_source(arch)
    source = load_model(str(src), device="cpu")
    source.tokenizer = tiny_tokenizer()
    out = export(source, DropPlan(N, **NAS_PLAN), tmp_path_factory.mktemp(f"nas-{arch}") / "out")  # --format auto
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad(), identity_hooks(reference, **NAS_PLAN):
        ref = reference(IDS, use_cache=False).logits
    return arch, out, ref


def test_nemotron_nas_config_is_what_vllm_reads(nas_export):
    arch, out, _ = nas_export
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("nemotron-nas", ["DeciLMForCausalLM"])
    assert config["auto_map"]["AutoConfig"].startswith("configuration_nemotron_nas.")
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_nemotron_nas.DeciLM")
    assert not {"drop_attn_list", "drop_mlp_list", "llmdrop_sublayers"} & config.keys()  # block_configs is the truth
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, True, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, None, 2, None, 2]  # 4 query / 2 KV heads
    assert all(not b["attention"]["replace_with_linear"] and not b["ffn"]["replace_with_linear"] for b in blocks)
    # intermediate 128 does not round-trip through ffn_mult (multiples of 256): the size is given as such
    assert blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "intermediate_size": 128}
    assert (config.get("attention_bias"), config.get("qkv_bias")) == (
        (False, True) if arch == "qwen2" else (False, None)
    )
    assert {"configuration_nemotron_nas.py", "modeling_nemotron_nas.py", *DROP_CODE_FILES} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "llmdrop.json").read_text())["exported"]["format"] == "nemotron-nas"
    assert "vllm serve PATH_OR_REPO --trust-remote-code" in (out / "README.md").read_text()


def test_nemotron_nas_export_is_the_same_model_in_transformers(nas_export):
    arch, out, ref = nas_export
    model = load(out, trust_remote_code=True)  # asserts no missing / unexpected tensor
    assert type(model).__name__.startswith("DeciLM")
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)
    check_kv_cache(model, "llama", NAS_PLAN)  # KV cache of the kept attention layers only, cached == full forward
    sdpa = load(out, trust_remote_code=True, attn_implementation="sdpa")
    torch.testing.assert_close(logits(sdpa), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(out)  # no native nemotron-nas in transformers: loud, not random


def test_nemotron_nas_export_reexports(nas_export, tmp_path):
    """An llmdrop nemotron-nas export loaded back by llmdrop keeps its drops through another export."""
    arch, out, _ = nas_export
    again = load_model(str(out), device="cpu")
    assert again.adapter.model_type == ("qwen2" if arch == "qwen2" else "llama")
    out2 = export(again, DropPlan(5, mlp=[4]), tmp_path / "out2")
    config = json.loads((out2 / "config.json").read_text())
    assert [b["ffn"]["no_op"] for b in config["block_configs"]] == [False, False, True, False, True]
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, True, False, True, False]
    load(out2, trust_remote_code=True)


@pytest.mark.parametrize(
    "arch, plan, why",
    [
        (
            "llama",
            dict(attn=[0]),
            "vLLM's DeciLM layer starts the residual stream in layer 0's attention, which this plan drops",
        ),
        (
            "llama",
            dict(blocks=[0], attn=[1]),
            "vLLM's DeciLM layer starts the residual stream in layer 0's attention, which this plan drops",
        ),
        ("qwen3", dict(attn=[2]), "it holds Llama-family layers only (Llama, Mistral, Qwen2), not qwen3"),
        ("mistral", dict(attn=[2]), "its attention has no sliding window (this Mistral slides)"),
        ("qwen2", dict(attn=[2]), "its attention has no sliding window (this Qwen2 slides)"),
    ],
)
def test_nemotron_nas_refusals(arch, plan, why, tmp_path):
    with pytest.raises(LlmdropError) as e:
        export(loaded(arch), DropPlan(N, **plan), tmp_path / "x", fmt="nemotron-nas")
    assert str(e.value) == f"--format nemotron-nas cannot hold this export: {why}"
    out = export(loaded(arch), DropPlan(N, **plan), tmp_path / "auto")  # auto: the llmdrop format, and why
    exported = json.loads((out / "llmdrop.json").read_text())["exported"]
    assert exported["format"] == "llmdrop" and f"not nemotron-nas: {why}" in exported["format_reason"]


@pytest.mark.parametrize(
    "intermediate, hidden, fields",
    [
        (1536, 576, {"ffn_mult": 4.0}),  # SmolLM2-135M
        (14336, 4096, {"ffn_mult": 5.25}),  # Llama-3-8B
        (29568, 8192, {"intermediate_size": 29568}),  # Qwen2.5-72B: not a multiple of 256
        (128, 64, {"intermediate_size": 128}),
    ],
)
def test_ffn_size_round_trips_or_is_given(intermediate, hidden, fields):
    from llmdrop.formats.exporters import ffn_size_fields

    assert ffn_size_fields(intermediate, hidden) == fields


@pytest.mark.parametrize(
    "fmt, plan", [("vanilla", {"blocks": [1]}), ("nemotron-nas", {"attn": [2]}), ("llmdrop", {"mlp": [3]})]
)
def test_each_format_recognizes_its_exports_on_disk(fmt, plan, tmp_path):
    """The exporter owns recognising its checkpoints, whether they run remote code, and which engines serve them."""
    from llmdrop.formats.exporters import EXPORTERS, exporter_of
    from llmdrop.serving.speed_vllm import _servable_dir
    from llmdrop.source.models import is_llmdrop_export

    src = tmp_path / "src"
    tiny_model("llama", 4).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert exporter_of(src) is None and not is_llmdrop_export(str(src))
    export(load_model(str(src), device="cpu"), DropPlan(4, **plan), tmp_path / "out", fmt=fmt)
    exporter = exporter_of(tmp_path / "out")
    assert exporter is EXPORTERS[fmt]
    assert is_llmdrop_export(str(tmp_path / "out")) is (fmt != "vanilla")
    if "vllm" in exporter.engines:
        _servable_dir(tmp_path / "out")
    else:
        with pytest.raises(
            LlmdropError, match="vLLM cannot serve llmdrop's llmdrop format; re-export it with --format nemotron-nas"
        ):
            _servable_dir(tmp_path / "out")
