"""Tensors as stored in a checkpoint's safetensors files: where each one's bytes are (headers only), and reading
one tensor at a time. The streamed runner and skeleton read layers with this, the streamed export copies
tensors with it."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError

INDEX_NAME = "model.safetensors.index.json"
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
# Module names in checkpoint files that transformers renames on load (its conversion_mapping): file name -> ours.
DISK_MODULE_NAMES = {"block_sparse_moe": "mlp"}  # Mixtral's sparse-MoE block


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    start: int  # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one .safetensors file (names, dtypes, shapes, where their bytes are), reading only its header;
    a file whose header is unreadable or whose tensors run past its end is refused, naming the file."""
    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes of a {size:,}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        tensors = {}
        for name, entry in header.items():
            if entry["dtype"] not in ST_DTYPES:
                raise LlmdropError(f"{path}: tensor {name} has dtype {entry['dtype']}, which llmdrop cannot stream")
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {name} runs past the end of the file")
            tensors[name] = StoredTensor(
                path, 8 + n + begin, end - begin, ST_DTYPES[entry["dtype"]], tuple(entry["shape"])
            )
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlmdropError(f"{path} is not a valid safetensors file (corrupt or truncated: {e})") from None
    return tensors


def safetensors_files(folder) -> list[Path]:
    """The weight files of a checkpoint folder (those its index names, else every *.safetensors); [] if none."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def stored_tensors(folder) -> dict[str, StoredTensor]:
    files = safetensors_files(folder)
    if not files:
        raise LlmdropError(f"{folder} holds no .safetensors weights")
    tensors = {}
    for path in files:
        tensors.update(read_header(path))
    return tensors


def _read_bytes(f, src: StoredTensor) -> bytearray:
    f.seek(src.start)
    data = bytearray(src.nbytes)
    view, done = memoryview(data), 0
    while done < src.nbytes:  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(view[done:])
        if not n:
            raise LlmdropError(f"{src.file} is truncated")
        done += n
    return data


def read_tensor(src: StoredTensor) -> torch.Tensor:
    """One stored tensor, read into memory."""
    with open(src.file, "rb", buffering=0) as f:
        data = _read_bytes(f, src)
    return (
        torch.frombuffer(data, dtype=src.dtype).reshape(src.shape) if data else torch.empty(src.shape, dtype=src.dtype)
    )
