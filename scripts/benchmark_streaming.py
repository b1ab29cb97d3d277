"""Streamed vs in-memory scoring and export on a random-weight Llama-3.2-1B-shaped checkpoint (bfloat16, 2.5 GB).

Every measurement runs in a child process under ``/usr/bin/time -v`` (wall time, peak RSS). Run it under the shared
lock; it deletes its files at the end (``--keep`` keeps them):

    flock /tmp/llmdrop-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python scripts/benchmark_streaming.py \
        --out docs/streaming-bench.json
"""

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable


def measure(name: str, args: list[str]) -> dict:
    subprocess.run(["sync"], check=True)  # the previous command's dirty pages are flushed before, not during, this one
    proc = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, check=False)
    inner = re.search(r"WRITE_SECONDS (\S+)", proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    result = {
        "name": name,
        "wall_s": round(seconds, 2),
        "peak_rss_mib": round(rss_kb / 1024, 1),
    }
    if inner:
        result["inner_s"] = round(float(inner.group(1)), 2)  # timed inside the process, imports excluded
    print(json.dumps(result), flush=True)
    return result


def build(folder: Path) -> None:
    """The random checkpoint (llmdrop.serving.speed's llama-1b shape, saved in bfloat16) and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmdrop.serving.speed import build_random

    model = build_random("llama-1b", "base", dtype=torch.bfloat16)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(5000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder
    )


def max_tensor_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two exports' tensors (compared in float32)."""
    from safetensors.torch import load_file

    ta, tb = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in (a, b))
    assert ta.keys() == tb.keys()
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of cp / streamed export")
    parser.add_argument("--skip-scoring", action="store_true", help="only the export measurements")
    parser.add_argument(
        "--compensation-only",
        action="store_true",
        help="only `drop --compensate linear`, in memory and --stream (peak memory and the largest tensor difference)",
    )
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmdrop-streambench-"))
    try:
        src = work / "llama-1b-bf16"
        build(src)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        calib = work / "calib.txt"
        rng = random.Random(0)
        calib.write_text(" ".join(f"w{rng.randrange(5000)}" for _ in range(opts.samples * opts.seq_len * 2)))
        cal = [
            "--calib",
            str(calib),
            "--samples",
            str(opts.samples),
            "--seq-len",
            str(opts.seq_len),
        ]
        score = [
            PY,
            "-m",
            "llmdrop",
            "score",
            str(src),
            *cal,
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
        # the Python + torch + transformers + llmdrop runtime every command below starts with
        results = [measure("runtime only (imports)", [PY, "-c", "import torch, transformers; import llmdrop.api"])]
        diff = None
        comp = [PY, "-m", "llmdrop", "drop", str(src), "--block-layers", "3,7", "--compensate", "linear", *cal]
        results += [
            measure("drop --compensate linear, in memory", [*comp, "--device", "cpu", "-o", str(work / "cm")]),
            measure(
                "drop --compensate linear, streamed", [*comp, "--device", "cpu", "--stream", "-o", str(work / "cs")]
            ),
        ]
        comp_diff = max_tensor_difference(work / "cm", work / "cs")
        if opts.compensation_only:
            report = {"checkpoint_bytes": size, "max_abs_tensor_difference_compensated": comp_diff, "results": results}
            print(json.dumps(report, indent=2))
            if opts.out:
                Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
            return
        if not opts.skip_scoring:
            results += [
                measure("score, in memory", [*score, "-o", str(work / "mem.json")]),
                measure("score, streamed", [*score, "--stream", "-o", str(work / "stream.json")]),
            ]
            a, b = (json.loads((work / f).read_text())["importance"] for f in ("mem.json", "stream.json"))
            diff = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))

        # the weights alone (what `cp` does): write_weights into an empty folder, timed inside the process after the
        # imports (transformers' modeling code, which `drop` has loaded anyway, gives the default shard size)
        def weights_only(out: Path) -> str:
            return (
                "import time, torch, transformers.modeling_utils; from llmdrop.source.arch import ADAPTERS; "
                "from llmdrop.planning.plan import DropPlan; from llmdrop.formats.stream_export import write_weights; "
                f"from pathlib import Path; out = Path({str(out)!r}); out.mkdir(); t = time.perf_counter(); "
                f"write_weights({str(src)!r}, ADAPTERS['llama'], DropPlan(16, blocks=[3, 7]), out, "
                "dtype=torch.bfloat16, total_parameters=0, progress=False); "
                "print('WRITE_SECONDS', time.perf_counter() - t)"
            )

        memory_export = (
            "from llmdrop.formats.export import export; from llmdrop.source.models import load_model; "
            "from llmdrop.planning.plan import DropPlan; "
            f" export(load_model({str(src)!r}, device='cpu'), DropPlan(16, blocks=[3, 7]), "
            f"{str(work / 'm')!r})"
        )
        drop = [PY, "-m", "llmdrop", "drop", str(src), "--block-layers", "3,7", "-o"]
        results.append(measure("export in memory (same plan)", [PY, "-c", memory_export]))
        for i in range(opts.rounds):  # interleaved: the disk's speed drifts between runs
            results += [
                measure(f"cp -r ({i + 1})", ["cp", "-r", str(src), str(work / f"copy{i}")]),
                measure(f"drop --block-layers 3,7, streamed export ({i + 1})", [*drop, str(work / f"s{i}")]),
                measure(f"write_weights only, same plan ({i + 1})", [PY, "-c", weights_only(work / f"w{i}")]),
            ]
        report = {
            "checkpoint": "random llama-1b shape (Llama-3.2-1B: 16 layers, hidden 2048), bfloat16",
            "checkpoint_bytes": size,
            "calibration": f"{opts.samples} x {opts.seq_len} tokens, batch size 4, CPU",
            "max_abs_score_difference": diff,
            "max_abs_tensor_difference_compensated": comp_diff,
            "results": results,
        }
        print(json.dumps(report, indent=2))
        if opts.out:
            Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
