"""Scoring on several processes: ``torchrun --nproc-per-node N -m llmdrop score ...``.

torchrun starts N copies of the command and tells each its rank through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); multi-node runs use torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``).
Each rank scores every WORLD_SIZE-th calibration batch (in memory or streamed), the float64 sums and the token
counts are summed over the ranks (the sum of sums, not a mean of means), and rank 0 alone writes files and prints.
Backend: NCCL when the ranks use CUDA devices, gloo on CPUs; the code path is the same. torch is imported inside the
functions: the CLI asks ``launched_by_torchrun`` before every verb, ``--help`` included.
"""

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup() -> None:
    """Join torchrun's process group (once); each rank gets its own CUDA device when there are any. The group is
    destroyed at exit: a gloo group left to the interpreter's teardown can abort a rank ("terminate called without
    an active exception") after its work is done, and torchrun then reports the run as failed."""
    import atexit

    import torch
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    atexit.register(_leave)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # no barrier: a rank that died must not keep the others waiting
        dist.destroy_process_group()


def device_for_rank(device: str) -> str:
    """``auto`` / ``cuda`` mean this rank's own GPU under torchrun."""
    import torch

    if launched_by_torchrun() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def is_main() -> bool:
    return rank_and_world()[0] == 0


def all_reduce(stats) -> None:
    """Sum the scoring collector's float64 sums and token count over the ranks, in place (no-op on one process)."""
    import torch
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    kinds = list(stats.sums)
    flat = torch.cat([stats.sums[k] for k in kinds] + [torch.tensor([float(stats.tokens)], dtype=torch.float64)])
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    n = len(stats.sums[kinds[0]])
    for j, k in enumerate(kinds):
        stats.sums[k] = flat[j * n : (j + 1) * n].clone()
    stats.tokens = int(flat[-1].item())


def launch(nproc: int, argv: list[str]) -> int:
    """``llmdrop ARGV`` on ``nproc`` processes of this machine, as ``torchrun --standalone --nproc-per-node`` starts
    them, and their exit code: rank 0 alone prints, and a failed rank ends in its exit code, not in torch's launcher
    report and traceback (which torchrun itself always prints)."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "llmdrop", *argv)
    except ChildFailedError as e:  # ranks stopped by the launcher after another failed have negative codes
        codes = [f.exitcode for _, f in sorted(e.failures.items()) if f.exitcode > 0]
        return codes[0] if codes else 1
    return 0
