"""Weights of an export copied tensor by tensor from the source's safetensors files, never the whole model in memory.

``export.export`` uses this for a source checkpoint in safetensors (a local folder or a Hub download) whose weights
were not changed in memory: the model it holds is then a skeleton on the meta device, turned into the export's
model by the same exporter code as an in-memory export, so config, code, provenance and card are written by the
shared path. Only the weights come from here: every source tensor is renamed for the removed blocks (layer k ->
its new number), left out when it belongs to a removed block or a dropped sublayer (the module or one of its
norms, as the architecture adapter names them), and cast to the export's dtype.

The safetensors library writes a file only from a dict of tensors held in memory, so the files are written here:
an 8-byte little-endian header length, a JSON header (dtype, shape, byte range of every tensor), then the bytes.
Uncast tensors are copied by the kernel (``os.copy_file_range``: their bytes never pass through this process, so
the export runs at the speed of ``cp``); cast ones are read, cast and written one tensor at a time. The shards and the
index are split as transformers' ``save_pretrained`` splits them (huggingface_hub's splitter, its default size).
"""

import errno
import inspect
import json
import os
import re
import struct
from pathlib import Path

import torch

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan
from llmdrop.source.arch import Adapter
from llmdrop.source.stored import (
    DISK_MODULE_NAMES,
    INDEX_NAME,
    ST_CODES,
    StoredTensor,
    _read_bytes,
    read_tensor,
    stored_tensors,
)

CHUNK = 64 << 20  # bytes copied at a time
# copy_file_range's answers for "not here" (another filesystem on an old kernel, no such call): copy by hand instead
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's (decimal) units


def parse_shard_size(value: str | int) -> int:
    """``--max-shard-size`` in bytes: a whole number of bytes or a size like 5GB / 500MB / 1.5GB (KB, MB, GB, TB)."""
    text = str(value).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)?", text)
    size = int(float(match[1]) * SIZE_UNITS.get(match[2], 1)) if match else 0
    if size < 1:
        raise LlmdropError(
            f"--max-shard-size must be a positive size such as 5GB, 500MB or a number of bytes, got {value!r}"
        )
    return size


def default_max_shard_size():
    """transformers' own default for ``save_pretrained(max_shard_size=)``."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def export_name(name: str, adapter: Adapter, plan: DropPlan) -> str | None:
    """The name of a source tensor in the export, or None if the plan removes it."""
    prefix = adapter.layers + "."
    if not name.startswith(prefix):
        return name  # embeddings, final norm, LM head
    index, rest = name[len(prefix) :].split(".", 1)
    layer = int(index)
    if layer in plan.blocks:
        return None
    module = rest.split(".", 1)[0]
    module = DISK_MODULE_NAMES.get(module, module)
    if (layer in plan.attn and module in adapter.attn) or (layer in plan.mlp and module in adapter.mlp):
        return None
    return f"{prefix}{plan.layer_map()[layer]}.{rest}"


def _target_dtype(stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if stored.is_floating_point else stored  # as nn.Module.to(dtype): floating tensors only


def _copy_bytes(src, out, start: int, nbytes: int, path: Path) -> None:
    """Copy ``nbytes`` from ``start`` in file ``src`` to the end of ``out`` (both unbuffered). The kernel copies them
    (copy_file_range: no bytes through Python, reflinks where the filesystem has them); a plain read/write loop where
    it cannot (another filesystem on an old kernel, no such call)."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src.fileno(), out.fileno(), min(CHUNK, nbytes - done), start + done)
            if n == 0:
                raise LlmdropError(f"{path} is truncated")
            done += n
        return
    except (AttributeError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in NO_KERNEL_COPY:
            raise
    src.seek(start + done)
    while done < nbytes:
        chunk = src.read(min(CHUNK, nbytes - done))
        if not chunk:
            raise LlmdropError(f"{path} is truncated")
        _write_all(out, chunk)
        done += len(chunk)


def _write_all(out, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view) :]


def _write_file(path: Path, items: list[tuple[str, StoredTensor, torch.dtype]], computed: dict | None = None) -> None:
    """The safetensors file of ``items`` (export name, stored tensor, dtype): bytes copied, or cast, from the source;
    ``computed`` maps an export name to a function giving its new value (a folded compensation map)."""
    computed = computed or {}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, src, dtype in items:
        nbytes = src.nbytes // src.dtype.itemsize * dtype.itemsize
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(src.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb", buffering=0) as out:
        _write_all(out, struct.pack("<Q", len(raw)) + raw)
        for name, src, dtype in items:
            if name in computed:
                _write_all(out, computed[name]().to(dtype).contiguous().view(torch.uint8).numpy().data)
                continue
            with open(src.file, "rb", buffering=0) as f:
                if dtype == src.dtype:
                    _copy_bytes(f, out, src.start, src.nbytes, src.file)
                else:
                    data = _read_bytes(f, src)
                    tensor = torch.frombuffer(data, dtype=src.dtype).to(dtype) if data else torch.empty(0, dtype=dtype)
                    _write_all(out, tensor.view(torch.uint8).numpy().data)


def write_weights(
    source_folder,
    adapter: Adapter,
    plan: DropPlan,
    folder: Path,
    *,
    dtype: torch.dtype,
    total_parameters: int,
    max_shard_size=None,
    progress: bool = True,
    replacements: dict | None = None,
) -> dict:
    """Write the export's weights (model.safetensors, or shards + index) into ``folder``; returns what was written:
    ``{"tensors": n, "bytes": n, "shards": n}``. ``replacements``: source tensor name -> function of the stored
    tensor giving what the export holds instead (e.g. a folded compensation map), read when it is written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    stored = stored_tensors(source_folder)
    chosen, computed = {}, {}
    for name, src in stored.items():
        new = export_name(name, adapter, plan)
        if new is not None:
            chosen[new] = (src, _target_dtype(src.dtype, dtype))
    for name, replace in (replacements or {}).items():
        if name in stored:  # read when written: one tensor in memory at a time
            computed[export_name(name, adapter, plan)] = lambda src=stored[name], fn=replace: fn(read_tensor(src))
    meta = {name: torch.empty(src.shape, dtype=dt, device="meta") for name, (src, dt) in chosen.items()}
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size or default_max_shard_size()
    )
    total = sum(src.nbytes // src.dtype.itemsize * dt.itemsize for src, dt in chosen.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            items = [(n, *chosen[n]) for n in sorted(names)]
            _write_file(folder / filename, items, computed)
            bar.update(sum(src.nbytes // src.dtype.itemsize * dt.itemsize for _, src, dt in items))
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"tensors": len(chosen), "bytes": total, "shards": len(split.filename_to_tensors)}
