"""Speed and memory of dropped models against their base: prefill / decode throughput, time to first token,
peak memory and KV-cache bytes per token, with the theoretical speedup bound of each drop printed beside
the measured speedup.

Models are either checkpoints (anything ``load_model`` loads: llmdrop exports, vanilla, GGUF) or, with
``random_weights``, variants of one architecture built at real size with random weights (``base``,
``attn:N``, ``mlp:N``, ``blocks:N``, ``attn:16-31``, joined with ``+``) through ``llmdrop.planning.surgery``, so
each variant is exactly what an export would be.

Timing: one prefill forward over a seeded random prompt (no padding), then a hand-written greedy decode
loop feeding the KV cache back one token per step. Models run interleaved (A B A B ...) so that
drift (thermals, other processes) hits all of them alike.
"""

import gc
import inspect
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmdrop.compat import cache_kwarg, output_cache, quiet_cache_rename
from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan, parse_layers
from llmdrop.record import BENCH_FORMAT

FORMAT = BENCH_FORMAT

# Public config.json values of well-known models (enough to rebuild their shapes offline).
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    # a few layers, small enough for tests (same sizes as tests/tiny_models.py)
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,  # Llama-3.2-1B
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,  # v0.3
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        use_sliding_window=False,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}
_VARIANT_HELP = "use base, attn:N, mlp:N, blocks:N or lists like attn:16-31, joined with + (attn:8+blocks:2)"


# ---------------------------------------------------------------------------------------------- models


class ModelShape:
    """What the bounds and the report read from a model under test: here a torch model (the meta device is enough:
    only shapes are read). An engine that runs other files gives its own (``speed_llamacpp.GGUFShape``)."""

    def __init__(self, model):
        self.model = model
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.attention_layers = attention_layer_count(config)
        self.vocab_size = config.vocab_size
        self.dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token_analytic(self.model)

    def weight_bytes_per_step(self) -> int:
        return weight_bytes_per_step(self.model)

    def decode_bytes_per_step(self, prompt_len: int, gen_len: int, batch: int) -> float:
        return decode_bytes_per_step(self.model, prompt_len, gen_len, batch)

    def prefill_flops(self, prompt_len: int, batch: int) -> float:
        positions = 1 if "logits_to_keep" in _forward_kwargs(self.model) else prompt_len
        return prefill_flops(self.model, prompt_len, batch, positions)


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module | None
    spec: dict | None = None  # how to rebuild it in a child process (CPU peak memory); None: not measured
    shape: ModelShape | None = None  # default: the shape of ``model``

    def __post_init__(self):
        if self.shape is None:
            self.shape = ModelShape(self.model)


def parse_variant(text: str, num_layers: int) -> DropPlan:
    """'attn:8+blocks:2' -> DropPlan. A count N takes the N highest-numbered layers still available
    (blocks first), because redundancy usually sits in the last layers; lists are explicit layers."""
    counts, lists = {}, {"attn": [], "mlp": [], "blocks": []}
    if text.strip() != "base":
        for part in text.split("+"):
            kind, sep, arg = part.strip().partition(":")
            kind = {"block": "blocks", "attention": "attn"}.get(kind, kind)
            if not sep or kind not in lists or not arg:
                raise LlmdropError(f"bad variant {text!r}: {_VARIANT_HELP}")
            if arg.isdigit():
                counts[kind] = counts.get(kind, 0) + int(arg)
            else:
                try:
                    lists[kind] += parse_layers(arg, num_layers)
                except LlmdropError as e:
                    raise LlmdropError(f"bad variant {text!r}: {e}") from None
    blocks = set(lists["blocks"])
    blocks |= set(_last(num_layers, counts.get("blocks", 0), blocks, "blocks", text))
    picked = {}
    for kind in ("attn", "mlp"):
        taken = blocks | set(lists[kind])
        picked[kind] = set(lists[kind]) | set(_last(num_layers, counts.get(kind, 0), taken, kind, text))
    return DropPlan(
        num_layers, sorted(blocks), sorted(picked["attn"]), sorted(picked["mlp"]), method=f"bench variant {text}"
    )


def _last(num_layers: int, n: int, taken: set, kind: str, text: str) -> list[int]:
    free = [i for i in range(num_layers) if i not in taken]
    if n > len(free):
        raise LlmdropError(f"variant {text!r}: cannot drop {n} {kind}, only {len(free)} layers are left")
    return free[len(free) - n :] if n else []


def shape_config(source: str):
    """Config of a builtin shape, a config.json file, a checkpoint dir or a Hub id (random weights)."""
    from transformers import AutoConfig, PretrainedConfig

    from llmdrop.modeling.configuration_llmdrop import CONFIG_CLASSES
    from llmdrop.source.arch import EXPORT_PREFIX, base_model_type

    path = Path(source).expanduser()
    if source in SHAPES:
        fields = dict(SHAPES[source])
    elif path.is_file() or (path / "config.json").is_file():
        try:
            fields = json.loads((path if path.is_file() else path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise LlmdropError(f"could not read a config from {source}: {e}") from e
    elif "/" in source:  # a Hub id (owner/name); the raw dict, so that no remote code runs
        try:
            fields = PretrainedConfig.get_config_dict(source)[0]
        except (OSError, ValueError) as e:
            raise LlmdropError(f"could not load the config of {source!r} from the Hub: {e}".splitlines()[0]) from e
    else:
        raise LlmdropError(
            f"--random-weights {source!r}: use a builtin shape ({', '.join(SHAPES)}), "
            "a config.json, a checkpoint dir or a Hub id"
        )
    # only the shape matters: random weights are never quantized, remote code is llmdrop's own or refused
    for key in ("quantization_config", "auto_map", "architectures", "torch_dtype", "dtype", "transformers_version"):
        fields.pop(key, None)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise LlmdropError(f"{source}: the config has no model_type")
    if model_type.startswith(EXPORT_PREFIX):  # an llmdrop export: its drops stay dropped
        return CONFIG_CLASSES[base_model_type(model_type)](**fields)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise LlmdropError(f"{source}: unknown model_type {model_type!r}") from e


def check_random_variants(shape: str, variants: list[str], prompt_lens, gen_len: int) -> None:
    """Fail on a bad shape, variant or length before anything big is built."""
    config = shape_config(shape)
    for variant in variants:
        parse_variant(variant, config.num_hidden_layers)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max(prompt_lens) + gen_len > limit:
        raise LlmdropError(
            f"prompt length {max(prompt_lens)} + gen length {gen_len} exceeds "
            f"{shape}'s max_position_embeddings ({limit})"
        )


def build_random(shape: str, variant: str, *, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """A random-weight model of ``shape`` with ``variant`` dropped, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    from llmdrop.modeling.modeling_llmdrop import MODEL_CLASSES
    from llmdrop.planning.surgery import apply_plan
    from llmdrop.source.arch import EXPORT_PREFIX, adapter_for, base_model_type

    config = shape_config(shape)
    plan = parse_variant(variant, config.num_hidden_layers)
    torch.manual_seed(seed)  # same seed: every variant keeps the base's weights in its kept layers
    # Under the device context the parameters are allocated and initialised on the device itself
    # (no CPU copy); default init is finite and speed does not depend on the values.
    with torch.device(device):
        if config.model_type.startswith(EXPORT_PREFIX):
            model = MODEL_CLASSES[base_model_type(config.model_type)]._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not plan.empty:
        apply_plan(model, adapter_for(model.config), plan)
    return model.eval()


def build(spec: dict) -> torch.nn.Module:
    """Load or build the model a spec describes (the same call in the parent and in memory children)."""
    if spec["kind"] == "random":
        return build_random(
            spec["shape"],
            spec["variant"],
            device=spec["device"],
            dtype=getattr(torch, spec["dtype"]),
            seed=spec["seed"],
        )
    from llmdrop.source.models import load_model

    return load_model(
        spec["source"],
        device=spec["device"],
        dtype=spec["dtype"],
        gguf_file=spec["gguf_file"],
        trust_remote_code=spec["trust_remote_code"],
    ).model


def model_specs(
    models: list[str],
    *,
    random_weights: str | None,
    device: torch.device,
    dtype: str,
    seed: int,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> list[tuple[str, dict]]:
    if not models:
        raise LlmdropError("give at least one model (the first is the baseline)")
    if random_weights and dtype == "auto":  # nothing to keep: pick the usual dtype of the device
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    specs = []
    for m in models:
        if random_weights:
            spec = {"kind": "random", "shape": random_weights, "variant": m, "dtype": dtype, "seed": seed}
        else:
            spec = {
                "kind": "checkpoint",
                "source": m,
                "dtype": dtype,
                "gguf_file": gguf_file,
                "trust_remote_code": trust_remote_code,
            }
        specs.append((m, {**spec, "device": str(device)}))
    names = [n for n, _ in specs]
    # duplicates get a suffix so that every result row names one model
    return [(n if names.count(n) == 1 else f"{n}#{i}", s) for i, (n, s) in enumerate(specs)]


def parse_int_list(text: str, option: str) -> list[int]:
    """'128,512,2048' -> [128, 512, 2048] (order kept, duplicates dropped)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise LlmdropError(f"bad {option} {text!r}: use positive integers like 128,512,2048")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------- analysis


def _dtype_bytes(model) -> int:
    return model.get_input_embeddings().weight.element_size()


def attention_layer_count(config) -> int:
    return config.num_hidden_layers - len(getattr(config, "drop_attn_list", None) or ())


def kv_bytes_per_token_analytic(model) -> int:
    """2 (K and V) x kept attention layers x KV heads x head dim x dtype bytes."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * attention_layer_count(c) * kv_heads * head_dim * _dtype_bytes(model)


def weight_bytes_per_step(model) -> int:
    """Parameter bytes one decode step reads: everything but the input embedding table, of which only
    the batch's rows are read (unless it is tied to the lm_head, which reads all of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is out else total - emb.numel() * emb.element_size()


def decode_bytes_per_step(model, prompt_len: int, gen_len: int, batch: int) -> float:
    """Weights + KV cache read per decode step, averaged over the steps: step i (0-based) attends to
    prompt_len + i + 1 tokens, so the mean context is prompt_len + (gen_len + 1) / 2."""
    context = prompt_len + (gen_len + 1) / 2
    return weight_bytes_per_step(model) + batch * context * kv_bytes_per_token_analytic(model)


def prefill_flops(model, prompt_len: int, batch: int, logits_positions: int = 1) -> float:
    """Matmul FLOPs of one prefill: 2 x tokens x weight-matrix elements of the kept layers, plus the
    attention scores (QK^T and AV over the causal triangle) of each kept attention layer, plus the lm_head
    for the positions whose logits are computed (1 with logits_to_keep=1)."""
    from llmdrop.source.arch import adapter_for

    c = model.config
    layers = adapter_for(c).layer_list(model)
    matrix_elems = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    scores = attention_layer_count(c) * 2 * batch * c.num_attention_heads * head_dim * prompt_len * (prompt_len + 1)
    lm_head = 2 * batch * logits_positions * model.get_output_embeddings().weight.numel()
    return 2 * batch * prompt_len * matrix_elems + scores + lm_head


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_kwargs(model) -> dict:
    kwargs = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # prefill computes the lm_head for the last position only
    return kwargs


def cache_bytes(cache) -> int | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


@torch.inference_mode()
@quiet_cache_rename()
def run_once(model, input_ids: torch.Tensor, gen_len: int) -> dict:
    """One prefill + greedy decode. The first new token comes from the prefill logits (TTFT = prefill
    forward + argmax); then gen_len decode forwards each feed one token and the cache back."""
    device = input_ids.device
    kwargs, cache_name = _forward_kwargs(model), cache_kwarg(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, **kwargs)
    _sync(device)
    t1 = time.perf_counter()
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    cache = output_cache(out)
    for _ in range(gen_len):
        out = model(input_ids=token, **{cache_name: cache}, **kwargs)
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t3 = time.perf_counter()
    batch, prompt_len = input_ids.shape
    cache_len = cache.get_seq_length()
    if cache_len != prompt_len + gen_len:  # the cache was not fed back: the numbers would be meaningless
        raise LlmdropError(f"KV cache holds {cache_len} tokens after decoding, expected {prompt_len + gen_len}")
    total = cache_bytes(cache)
    return {
        "prefill_s": t1 - t0,
        "ttft_s": t2 - t0,
        "decode_s": t3 - t2,
        "cache_len": cache_len,
        "cache_layers": len(getattr(cache, "layers", ())),
        "kv_bytes_per_token": None if total is None else total // (batch * cache_len),
    }


def make_prompt(vocab_size: int, batch: int, prompt_len: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).to(device)


def check_finite(bm: BenchModel, device) -> None:
    """Random weights must not produce NaN / inf (speed would still be measured, but on garbage)."""
    with torch.inference_mode():
        logits = bm.model(input_ids=make_prompt(bm.model.config.vocab_size, 1, 8, 0, device)).logits
    if not torch.isfinite(logits).all():
        raise LlmdropError(f"{bm.name}: the model produces NaN/inf logits")


def _rss_high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_rss_high_water_mark() -> None:
    """Drop freed heap back to the OS, then reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")


def child_peak_rss(spec: dict, configs: list[tuple[int, int]], gen_len: int, seed: int) -> list[int]:
    """Runs in a fresh process holding only this model: the RSS high-water mark of one prefill + decode
    per (prompt_len, batch), reset before each so that loading and earlier runs do not count."""
    model = build(spec)
    device = torch.device(spec["device"])
    run_once(model, make_prompt(model.config.vocab_size, 1, 8, seed, device), 2)  # lazy init out of the way
    peaks = []
    for prompt_len, batch in configs:
        ids = make_prompt(model.config.vocab_size, batch, prompt_len, seed, device)
        _reset_rss_high_water_mark()
        run_once(model, ids, gen_len)
        peaks.append(_rss_high_water_mark())
    return peaks


def _child_main() -> None:
    """Entry point of the memory child: a JSON request on stdin, the peaks as the last line of stdout."""
    import sys

    req = json.loads(sys.stdin.read())
    print(json.dumps(child_peak_rss(req["spec"], [tuple(c) for c in req["configs"]], req["gen_len"], req["seed"])))


def _cpu_peaks(spec: dict, configs, gen_len: int, seed: int) -> list[int | None]:
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        return [None] * len(configs)  # no resettable high-water mark on this OS: report nothing rather than a guess
    request = json.dumps({"spec": spec, "configs": configs, "gen_len": gen_len, "seed": seed})
    # a fresh interpreter (not multiprocessing): nothing of this process's memory or __main__ comes along
    proc = subprocess.run(
        [sys.executable, "-c", "from llmdrop.serving.speed import _child_main; _child_main()"],
        input=request,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlmdropError(f"peak-memory child process failed for {spec.get('source') or spec.get('variant')}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def _check_settings(prompt_lens, batch_sizes, gen_len: int, repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0 or gen_len < 1:
        raise LlmdropError("need --repeats >= 1, --warmup >= 0 and --gen-len >= 1")
    if not prompt_lens or not batch_sizes or min(prompt_lens) < 1 or min(batch_sizes) < 1:
        raise LlmdropError("prompt lengths and batch sizes must be positive")


def _check_lengths(entries: list[BenchModel], prompt_lens, gen_len) -> None:
    for bm in entries:
        limit = getattr(bm.model.config, "max_position_embeddings", None)
        if limit and max(prompt_lens) + gen_len > limit:
            raise LlmdropError(
                f"prompt length {max(prompt_lens)} + gen length {gen_len} exceeds {bm.name}'s "
                f"max_position_embeddings ({limit})"
            )


def _result(bm: BenchModel, runs: list[dict], p: int, b: int, gen_len: int, peak: int | None) -> dict:
    return {
        "model": bm.name,
        "prompt_len": p,
        "batch_size": b,
        "gen_len": gen_len,
        "prefill_tokens_per_s": _stats([b * p / r["prefill_s"] for r in runs]),
        "decode_tokens_per_s": _stats([b * gen_len / r["decode_s"] for r in runs]),
        "ttft_ms": _stats([1000 * r["ttft_s"] for r in runs]),
        "kv_cache_bytes_per_token": runs[0]["kv_bytes_per_token"],
        "kv_cache_bytes_per_token_analytic": bm.shape.kv_bytes_per_token(),
        "kv_cache_layers": runs[0]["cache_layers"],
        "peak_memory_bytes": peak,
        "theory": {
            "prefill_flops": bm.shape.prefill_flops(p, b),
            "decode_bytes_per_step": bm.shape.decode_bytes_per_step(p, gen_len, b),
        },
        "samples": {k: [r[k] for r in runs] for k in ("prefill_s", "ttft_s", "decode_s")},
    }


def run_benchmark(
    entries: list[BenchModel],
    *,
    prompt_lens=(128, 512, 2048),
    gen_len: int = 128,
    batch_sizes=(1, 8),
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    memory: bool = True,
    progress: bool = True,
) -> dict:
    """Measure already built models (``entries[0]`` is the baseline); returns the JSON-able report."""
    from tqdm.auto import tqdm

    _check_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup)
    _check_lengths(entries, prompt_lens, gen_len)
    device = next(entries[0].model.parameters()).device
    vocab = min(bm.model.config.vocab_size for bm in entries)  # the same prompt for every model
    for bm in entries:
        check_finite(bm, device)
    configs = [(p, b) for p in prompt_lens for b in batch_sizes]
    own_bytes = {
        bm.name: sum(t.numel() * t.element_size() for t in [*bm.model.parameters(), *bm.model.buffers()])
        for bm in entries
    }
    samples = {(bm.name, p, b): [] for bm in entries for p, b in configs}
    cuda_peaks = {key: 0 for key in samples}
    order = []
    bar = tqdm(total=len(configs) * len(entries) * (warmup + repeats), desc="bench", unit="run", disable=not progress)
    for p, b in configs:
        ids = make_prompt(vocab, b, p, seed, device)
        for r in range(warmup + repeats):
            for bm in entries:  # interleaved: A B A B ...
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                run = run_once(bm.model, ids, gen_len)
                if device.type == "cuda":
                    # this model's weights + what this run allocated (other models' weights excluded)
                    peak = own_bytes[bm.name] + torch.cuda.max_memory_allocated(device) - before
                    cuda_peaks[(bm.name, p, b)] = max(cuda_peaks[(bm.name, p, b)], peak)
                if r >= warmup:
                    samples[(bm.name, p, b)].append(run)
                    order.append(bm.name)
                bar.update()
    bar.close()

    if not memory:
        peaks, method = {}, "not measured"
    elif device.type == "cuda":
        peaks, method = cuda_peaks, "CUDA allocator peak: this model's weights + the run's allocations"
    else:
        peaks, method = {}, "process RSS high-water mark (VmHWM) in a child process holding only this model"
        for bm in entries:
            got = _cpu_peaks(bm.spec, configs, gen_len, seed) if bm.spec else [None] * len(configs)
            peaks.update({(bm.name, p, b): v for (p, b), v in zip(configs, got)})

    return assemble_report(
        entries,
        configs,
        samples,
        peaks,
        device=device_name(device),
        settings=run_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup, seed, peak_memory=method),
        order=order,
        parameter_bytes=own_bytes,
    )


def run_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup, seed, **engine_settings) -> dict:
    """The report's ``settings``: what both engines were asked for, then what is particular to one."""
    return {
        "prompt_lens": list(prompt_lens),
        "batch_sizes": list(batch_sizes),
        "gen_len": gen_len,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        **engine_settings,
    }


def assemble_report(
    entries: list[BenchModel],
    configs,
    samples: dict,
    peaks: dict,
    *,
    device: str,
    settings: dict,
    order: list[str],
    parameter_bytes: dict,
    engine: dict | None = None,
) -> dict:
    """The JSON-able report from the timed runs of every (model, prompt_len, batch): one row per model and setting,
    with the speedups against ``entries[0]`` measured in the same run beside their theoretical bounds. The bounds
    come from ``bm.shape``."""
    import transformers

    from llmdrop import __version__

    gen_len = settings["gen_len"]
    results = []
    for p, b in configs:
        rows = [_result(bm, samples[(bm.name, p, b)], p, b, gen_len, peaks.get((bm.name, p, b))) for bm in entries]
        base = rows[0]
        for row in rows:  # speedups against the baseline measured in the same run, beside their bounds
            bound = {
                "prefill": base["theory"]["prefill_flops"] / row["theory"]["prefill_flops"],
                "decode": base["theory"]["decode_bytes_per_step"] / row["theory"]["decode_bytes_per_step"],
            }
            speedup = {k: row[f"{k}_tokens_per_s"]["median"] / base[f"{k}_tokens_per_s"]["median"] for k in bound}
            row.update(speedup=speedup, bound=bound, of_bound={k: speedup[k] / bound[k] for k in bound})
        results += rows

    dtypes = sorted({bm.shape.dtype for bm in entries})
    return {
        "format": FORMAT,
        "engine": engine or {"name": "transformers", "version": transformers.__version__},
        "device": device,
        "dtype": ",".join(dtypes),
        "versions": {
            "llmdrop": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            **({engine["name"]: engine["version"]} if engine else {}),
        },
        "settings": settings,
        "baseline": entries[0].name,
        "models": [
            {
                "name": bm.name,
                "spec": bm.spec,
                "num_layers": bm.shape.num_layers,
                "kept_attention_layers": bm.shape.attention_layers,
                "parameter_bytes": parameter_bytes[bm.name],
                "weight_bytes_per_decode_step": bm.shape.weight_bytes_per_step(),
            }
            for bm in entries
        ],
        "order": order,
        "results": results,
    }


def transformers_bench(
    models,
    *,
    random_weights,
    prompt_lens,
    gen_len,
    batch_sizes,
    repeats,
    warmup,
    device,
    dtype,
    seed,
    memory,
    gguf_file,
    trust_remote_code,
    progress,
) -> dict:
    from llmdrop.source.models import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    resolve_dtype(dtype)  # validate early
    _check_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup)
    specs = model_specs(
        list(models),
        random_weights=random_weights,
        device=torch_device,
        dtype=dtype,
        seed=seed,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
    )
    if random_weights:
        check_random_variants(random_weights, [spec["variant"] for _, spec in specs], prompt_lens, gen_len)
    entries = [BenchModel(name, build(spec), spec) for name, spec in specs]
    return run_benchmark(
        entries,
        prompt_lens=prompt_lens,
        gen_len=gen_len,
        batch_sizes=batch_sizes,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        memory=memory,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------- output


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _cells(row: dict, base: bool, rich: bool) -> list[str]:
    """Table cells of one result; ``rich`` puts the secondary numbers on a dim second line."""
    sep, dim = ("\n[dim]", "[/]") if rich else (" (", ")")

    def speed(kind):
        s = row[f"{kind}_tokens_per_s"]
        return f"{_num(s['median'])}{sep}{_num(s['min'])}–{_num(s['max'])}{dim}"

    def vs_bound(kind):
        if base:
            return "base"
        measured, bound, share = row["speedup"][kind], row["bound"][kind], row["of_bound"][kind]
        rest = f"/ {bound:.2f}× = {share:.0%}"
        return f"{measured:.2f}×\n[dim]{rest}[/]" if rich else f"{measured:.2f}× {rest}"

    peak = row["peak_memory_bytes"]
    kv, kv_a = row["kv_cache_bytes_per_token"], row["kv_cache_bytes_per_token_analytic"]
    return [
        row["model"],
        str(row["prompt_len"]),
        str(row["batch_size"]),
        speed("prefill"),
        vs_bound("prefill"),
        f"{row['ttft_ms']['median']:,.1f}",
        speed("decode"),
        vs_bound("decode"),
        "–" if peak is None else f"{peak / 2**20:,.0f}",
        f"{kv:,}" if kv == kv_a else f"{kv} (analytic {kv_a:,})",
    ]


HEADERS = [
    "model",
    "prompt",
    "batch",
    "prefill tok/s (min–max)",
    "prefill speedup / bound = share",
    "TTFT ms",
    "decode tok/s (min–max)",
    "decode speedup / bound = share",
    "peak MiB",
    "KV B/token",
]
RICH_HEADERS = [
    "model",
    "prompt",
    "batch",
    "prefill tok/s",
    "prefill ×",
    "TTFT ms",
    "decode tok/s",
    "decode ×",
    "peak MiB",
    "KV B/tok",
]


def results_table(report: dict):
    from rich.table import Table

    s = report["settings"]
    table = Table(
        title=f"{report['device']}, {report['dtype']}, gen {s['gen_len']}, median (min–max) of {s['repeats']}",
        caption="× = measured speedup vs the first model / theoretical bound = share of the bound reached",
    )
    for h in RICH_HEADERS:
        table.add_column(h, justify="left" if h == "model" else "right", overflow="fold")
    last = report["models"][-1]["name"]
    for row in report["results"]:
        table.add_row(*_cells(row, row["model"] == report["baseline"], rich=True), end_section=row["model"] == last)
    return table


def print_table(report: dict, console) -> None:
    """Print the table; output that is not a terminal gets a wide console instead of rich's default 80 columns."""
    from rich.console import Console

    if not console.is_terminal:
        console = Console(file=console.file, width=max(console.width, 140))
    console.print(results_table(report))


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|" + "--:|" * (len(HEADERS) - 1)]
    lines += [
        "| " + " | ".join(_cells(r, r["model"] == report["baseline"], rich=False)) + " |" for r in report["results"]
    ]
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """Median throughput (min–max bars) against prompt length, one line per model and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4), dpi=120)
    batches = report["settings"]["batch_sizes"]
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), ("prefill", "decode")):
        for i, m in enumerate(report["models"]):
            for j, b in enumerate(batches):
                rows = sorted(
                    (r for r in report["results"] if r["model"] == m["name"] and r["batch_size"] == b),
                    key=lambda r: r["prompt_len"],
                )
                x = [r["prompt_len"] for r in rows]
                y = [r[key]["median"] for r in rows]
                err = [
                    [r[key]["median"] - r[key]["min"] for r in rows],
                    [r[key]["max"] - r[key]["median"] for r in rows],
                ]
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    color=f"C{i}",
                    linestyle=["-", "--", ":", "-."][j % 4],
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=f"{m['name']} (batch {b})",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["settings"]["prompt_lens"], [str(p) for p in report["settings"]["prompt_lens"]])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title} throughput")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{report['device']}, {report['dtype']}, gen {report['settings']['gen_len']}", fontsize=9)
    fig.tight_layout()
    from llmdrop.files import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
