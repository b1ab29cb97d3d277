"""torchrun scoring: 2 CPU processes on the gloo backend give the single-process scores (1e-7), rank 0 alone writes
and prints, and each rank takes a disjoint share of the calibration batches."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from llmdrop.api import score
from llmdrop.passes import distributed, runner, scoring
from llmdrop.source.calibration import CalibSpec
from llmdrop.source.models import LoadSpec

CALIB = ["--samples", "7", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    tiny_model("qwen3", 4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    calib = folder.parent / "calib.txt"
    calib.write_text(" ".join(f"w{rng.randrange(128)}" for _ in range(1000)))
    return folder, calib


def run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


# streamed in every run; in memory (the same share and all-reduce code) only in the full run: each torchrun ~30 s
@pytest.mark.parametrize("stream", [pytest.param(False, marks=pytest.mark.slow), True], ids=["in-memory", "streamed"])
def test_torchrun_two_ranks_equal_one_process(source, tmp_path, stream):
    folder, calib = source
    extra = ["--stream"] if stream else []
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = str(29500 + stream)
    args = [
        "--nproc-per-node",
        "2",
        "--master-port",
        port,
        "-m",
        "llmdrop",
        "score",
        str(folder),
        "--calib",
        str(calib),
    ]
    two = run(torchrun, *args, *CALIB, *extra, "-o", "two.json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stderr + two.stdout).count("wrote two.json") == 1  # rank 0 alone writes and prints
    one = score(
        LoadSpec(str(folder), device="cpu"),
        calib=CalibSpec(str(calib), samples=7, seq_len=16),
        batch_size=2,
        stream=stream,
        progress=False,
    ).to_dict()
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["calibration"] == two["calibration"] and one["calibration"]["tokens"] == 7 * 16
    for kind in ("attn", "mlp", "block"):
        assert two["importance"][kind] == pytest.approx(one["importance"][kind], abs=1e-7, rel=0)


def test_llmdrop_launches_its_own_ranks(source, tmp_path):
    """`llmdrop score --nproc-per-node 2` is torchrun --standalone: the same scores, written once; a bad input is one
    line and exit 1, without torch's launcher report."""
    folder, calib = source
    llmdrop = str(Path(sys.executable).parent / "llmdrop")
    args = ["score", str(folder), "--calib", str(calib), "--nproc-per-node", "2", *CALIB, "--stream"]
    two = run(llmdrop, *args, "-o", "two.json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stderr + two.stdout).count("wrote two.json") == 1
    one = score(
        LoadSpec(str(folder), device="cpu"), calib=CalibSpec(str(calib), samples=7, seq_len=16), batch_size=2
    ).to_dict()
    two = json.loads((tmp_path / "two.json").read_text())
    for kind in ("attn", "mlp", "block"):
        assert two["importance"][kind] == pytest.approx(one["importance"][kind], abs=1e-7, rel=0)
    bad = run(llmdrop, *args, "--samples", "0", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: --samples must be a whole number >= 1, got 0"]


def test_torchrun_refuses_the_verbs_that_do_not_split(source, tmp_path):
    """Every rank would write OUT: refused, with the error line printed once (rank 0); torchrun's own report of the
    failed ranks follows (it always prints one) and carries the same line."""
    folder, _ = source
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = run(torchrun, "--nproc-per-node", "2", "--master-port", "29503", "-m", "llmdrop", "drop", str(folder),
            "-o", "out", "--attn", "1", cwd=tmp_path)  # fmt: skip
    message = (
        "llmdrop drop does not run under torchrun (only score splits its work over the ranks): run it as one process"
    )
    assert r.returncode == 1
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [f"error: {message}"]
    assert f"traceback : error: {message}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_ranks_take_disjoint_shares(monkeypatch):
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 3))
        shares.append(runner.batch_starts(15, 2))  # 8 batches: rows 0, 2, ..., 14
    assert shares == [[0, 6, 12], [2, 8, 14], [4, 10]]


def test_all_reduce_is_a_no_op_on_one_process():
    stats = scoring.Similarity(2, "cosine")
    stats.sums["attn"][0] = 3.0
    stats.tokens = 4
    distributed.all_reduce(stats)
    assert stats.sums["attn"].tolist() == [3.0, 0.0] and stats.tokens == 4
