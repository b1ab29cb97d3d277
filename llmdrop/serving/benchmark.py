"""`llmdrop bench`: check the outputs, run one engine (``speed``: transformers, ``speed_vllm``: vLLM,
``speed_llamacpp``: llama.cpp), write the report (JSON, plot, Markdown). The engines share their settings, model
specs and report (``speed``)."""

from llmdrop.errors import LlmdropError
from llmdrop.files import JSON, MARKDOWN, atomic_write_text, check_outputs, plot_suffixes, write_json
from llmdrop.source.models import model_input

from .speed import markdown_table, plot_report, transformers_bench

ENGINES = ("transformers", "vllm", "llama.cpp")


def bench(
    models: list[str],
    *,
    random_weights: str | None = None,
    prompt_lens=(128, 512, 2048),
    gen_len: int = 128,
    batch_sizes=None,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    memory: bool = True,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    engine: str = "transformers",
    out: str | None = None,
    plot: str | None = None,
    markdown: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """`llmdrop bench`: load / build every model, measure them interleaved, write JSON / plot / markdown.

    ``engine="vllm"`` runs the same measurements through vLLM's offline API (``llmdrop.serving.speed_vllm``),
    ``engine="llama.cpp"`` through llama-cpp-python on GGUF files (``llmdrop.serving.speed_llamacpp``).
    ``batch_sizes``: default 1 and 8 (llama.cpp: 1)."""
    if engine not in ENGINES:
        raise LlmdropError(f"unknown --engine {engine!r}; use {', '.join(ENGINES)}")
    if batch_sizes is None:
        batch_sizes = (1,) if engine == "llama.cpp" else (1, 8)
    check_outputs(
        {"--out": (out, JSON), "--plot": (plot, plot_suffixes() if plot else None), "--markdown": (markdown, MARKDOWN)},
        overwrite=overwrite,
        inputs=[*(model_input(m) for m in ([] if random_weights else models)), random_weights],
    )
    common = dict(
        random_weights=random_weights,
        prompt_lens=prompt_lens,
        gen_len=gen_len,
        batch_sizes=batch_sizes,
        repeats=repeats,
        warmup=warmup,
        dtype=dtype,
        seed=seed,
        memory=memory,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    if engine == "vllm":
        from .speed_vllm import vllm_bench

        if device != "auto":
            raise LlmdropError("--engine vllm runs where its build runs (CUDA or CPU): leave --device at auto")
        report = vllm_bench(models, **common)
    elif engine == "llama.cpp":
        from .speed_llamacpp import llamacpp_bench

        if device != "auto":
            raise LlmdropError("--engine llama.cpp runs on the CPU here: leave --device at auto")
        report = llamacpp_bench(models, **common)
    else:
        report = transformers_bench(models, device=device, **common)
    if random_weights:
        report["random_weights"] = random_weights
    if out:
        write_json(report, out)
    if plot:
        plot_report(report, plot)
    if markdown:
        atomic_write_text(markdown, markdown_table(report) + "\n")
    return report
