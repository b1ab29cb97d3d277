"""`llmdrop bench --engine llama.cpp`: the measurements of `llmdrop bench`, through llama-cpp-python, on GGUF files.

Every model is loaded once (flash attention on: layers without attention then keep no KV cache at all) and timed
interleaved (A B A B ...): prefill = evaluating the prompt, TTFT = that plus picking the first token, decode =
``gen_len`` single-token evaluations, each fed the previous argmax. One sequence at a time: llama-cpp-python's API
runs one.

The bounds are read from the GGUF files (``GGUFShape``): a decode step reads every tensor's stored bytes (quantized
as they are; the embedding table only if it is also the output layer) plus the KV cache, whose bytes per token
follow the per-layer KV-head counts (an f16 cache, as llama.cpp allocates by default; tests/test_llamacpp.py checks
this against llama.cpp's own report).
"""

import importlib.util
import os
import time
from pathlib import Path

from llmdrop.errors import LlmdropError

from .speed import BenchModel, _check_settings, assemble_report, make_prompt, model_specs, run_settings

KV_CACHE_BYTES = 2  # f16 K and V


def check_llamacpp() -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlmdropError(
            "--engine llama.cpp needs llama-cpp-python in this environment (it builds llama.cpp from source: "
            "`make .venv-llamacpp/.installed` builds one; see the Makefile for portable CMake options)"
        )
    import llama_cpp

    return llama_cpp.__version__


class GGUFShape:
    """A GGUF file's shape, for the bounds: per-layer head counts and MLP widths, stored tensor bytes."""

    def __init__(self, path: Path):
        from llmdrop.formats.gguf_export import Source

        source = Source.from_file(path)
        self.num_layers = source.num_layers
        self.heads, self.kv_heads, self.head_dim = (
            source.per_layer("attention.head_count"),
            source.kv_heads(),
            source.head_dim(),
        )
        self.attention_layers = sum(1 for h in self.heads if h)
        embd = source.value(f"{source.arch}.embedding_length")
        tensors = {t.name: t for t in source.tensors}
        self.vocab_size = tensors["token_embd.weight"].elements // embd
        total = sum(t.nbytes for t in source.tensors)
        # tied: the embedding table is the output layer too, read whole every step
        self.weight_bytes = total if "output.weight" not in tensors else total - tensors["token_embd.weight"].nbytes
        self.matrix_elems = sum(
            t.elements for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) >= 2
        )
        self.lm_head_elems = self.vocab_size * embd
        self.dtype = "gguf: " + ", ".join(sorted({t.ggml_type.name for t in source.tensors}))

    def kv_bytes_per_token(self) -> int:
        return sum(2 * k * self.head_dim * KV_CACHE_BYTES for k in self.kv_heads)

    def weight_bytes_per_step(self) -> int:
        return self.weight_bytes

    def decode_bytes_per_step(self, prompt_len: int, gen_len: int, batch: int) -> float:
        context = prompt_len + (gen_len + 1) / 2  # as the other engines' bound: the mean context of a step
        return self.weight_bytes + batch * context * self.kv_bytes_per_token()

    def prefill_flops(self, prompt_len: int, batch: int) -> float:
        scores = sum(2 * batch * h * self.head_dim * prompt_len * (prompt_len + 1) for h in self.heads)
        return 2 * batch * prompt_len * self.matrix_elems + scores + 2 * batch * self.lm_head_elems


def gguf_of(spec: dict) -> Path:
    """The GGUF file a model argument names: a .gguf file, the builtin model, or a `--format gguf` export folder."""
    from llmdrop.formats.exporters import GGUFExporter
    from llmdrop.source.models import resolve_source

    local = Path(spec["source"]).expanduser()
    if local.is_dir() and (local / GGUFExporter.FILE).is_file() and not (local / "config.json").exists():
        return local / GGUFExporter.FILE
    path, gguf = resolve_source(spec["source"], spec["gguf_file"])
    if gguf is None:
        raise LlmdropError(
            f"{spec['source']}: llama.cpp runs GGUF files; export with `llmdrop drop ... --format gguf` (from a GGUF "
            "source) and bench its folder or .gguf file"
        )
    return Path(path) / gguf


def _next_token(llm) -> int:
    """The argmax of the last evaluated position's logits (llama-cpp-python keeps no copy of them unless it
    computes the logits of every position, which would slow the prefill down)."""
    import numpy as np

    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())


def _timed_run(llm, prompt: list[int], gen_len: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    token = _next_token(llm)
    t2 = time.perf_counter()
    for _ in range(gen_len):
        llm.eval([token])
        token = _next_token(llm)
    t3 = time.perf_counter()
    if llm.n_tokens != len(prompt) + gen_len:
        raise LlmdropError(f"llama.cpp holds {llm.n_tokens} tokens after decoding, expected {len(prompt) + gen_len}")
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2}


def llamacpp_bench(
    models: list[str],
    *,
    random_weights: str | None = None,
    prompt_lens=(128, 512, 2048),
    gen_len: int = 128,
    batch_sizes=(1,),
    repeats: int = 5,
    warmup: int = 2,
    dtype: str = "auto",
    seed: int = 0,
    memory: bool = True,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Measure GGUF ``models`` (the first is the baseline) with llama.cpp; returns the report of `llmdrop bench`."""
    import torch
    from tqdm.auto import tqdm

    if random_weights:
        raise LlmdropError("--engine llama.cpp measures GGUF files; --random-weights is for transformers and vllm")
    if dtype != "auto":
        raise LlmdropError("--engine llama.cpp runs the GGUF files' own tensor types: leave --dtype at auto")
    if list(batch_sizes) != [1]:
        raise LlmdropError("--engine llama.cpp measures one sequence at a time (llama-cpp-python): --batch-sizes 1")
    _check_settings(prompt_lens, batch_sizes, gen_len, repeats, warmup)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    specs = model_specs(
        list(models),
        random_weights=None,
        device=torch.device("cpu"),
        dtype=dtype,
        seed=seed,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
    )
    files = [(name, spec, gguf_of(spec)) for name, spec in specs]  # every refusal before the first load
    version = check_llamacpp()
    import llama_cpp

    entries, engines = [], []
    n_ctx = max(prompt_lens) + gen_len + 1
    for name, spec, path in files:
        shape = GGUFShape(path)
        entries.append(BenchModel(name, None, spec, shape=shape))
        engines.append(
            llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=max(prompt_lens),
                n_ubatch=max(prompt_lens),
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=True,
                verbose=False,
            )
        )
    vocab = min(bm.shape.vocab_size for bm in entries)
    configs = [(p, 1) for p in prompt_lens]
    samples = {(bm.name, p, 1): [] for bm in entries for p, _ in configs}
    order = []
    bar = tqdm(total=len(configs) * len(entries) * (warmup + repeats), desc="bench (llama.cpp)", disable=not progress)
    for p, b in configs:
        prompt = make_prompt(vocab, 1, p, seed, "cpu")[0].tolist()
        for r in range(warmup + repeats):
            for bm, llm in zip(entries, engines):  # interleaved: A B A B ...
                run = _timed_run(llm, prompt, gen_len)
                run.update(cache_layers=bm.shape.attention_layers, kv_bytes_per_token=bm.shape.kv_bytes_per_token())
                if r >= warmup:
                    samples[(bm.name, p, b)].append(run)
                    order.append(bm.name)
                bar.update()
    bar.close()
    # the files are mapped, not copied: their bytes + the KV cache the run's tokens fill
    peaks = (
        {
            (bm.name, p, 1): path.stat().st_size + (p + gen_len) * bm.shape.kv_bytes_per_token()
            for bm, (_, _, path) in zip(entries, files)
            for p, _ in configs
        }
        if memory
        else {}
    )
    return assemble_report(
        entries,
        configs,
        samples,
        peaks,
        device=f"CPU, {threads} thread{'s' if threads > 1 else ''}",
        settings=run_settings(
            prompt_lens,
            batch_sizes,
            gen_len,
            repeats,
            warmup,
            seed,
            peak_memory="not measured"
            if not memory
            else "llama.cpp: the GGUF file's bytes (mapped) + the KV cache of the run's tokens (f16, attention layers "
            "only, flash attention on); not a measured high-water mark",
            threads=threads,
            flash_attn=True,
        ),
        order=order,
        parameter_bytes={bm.name: path.stat().st_size for bm, (_, _, path) in zip(entries, files)},
        engine={"name": "llama.cpp", "version": version},
    )
