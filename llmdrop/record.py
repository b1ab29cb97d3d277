"""The provenance files llmdrop writes: every format string, the versions and time each record carries, the source
block, and ``llmdrop.json`` itself (written by an export, read by heal / quantize / push, extended by heal's
``healing`` entries and quantize's ``quantization`` entry)."""

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from llmdrop import __version__
from llmdrop.errors import LlmdropError

RECORD_FILE = "llmdrop.json"
# the "format" of every JSON file llmdrop writes
EXPORT_FORMAT = "llmdrop.export/1"  # llmdrop.json of an export
QUANTIZE_FORMAT = "llmdrop.quantize/1"  # llmdrop.json of a quantized checkpoint whose source had none
SCORES_FORMAT = "llmdrop.scores/1"
BENCH_FORMAT = "llmdrop.bench/1"
ACT_FORMAT = "llmdrop.act/1"
PROBE_FORMAT = "llmdrop.probe/1"
INJECT_FORMAT = "llmdrop.inject/1"


def versions(**extra) -> dict:
    """llmdrop's, transformers', torch's and Python's versions (plus ``extra`` packages)."""
    import torch
    import transformers

    return {
        "llmdrop": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }


def now() -> str:
    """The ``created`` time of a record: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def source(loaded, num_layers: int | None = None) -> dict:
    """What was loaded: as asked for, the path, the GGUF file, the model type as loaded and the layer count."""
    return {
        "model": loaded.source,
        "path": loaded.path,
        "gguf_file": loaded.gguf_file,
        "model_type": loaded.info.get("model_type", loaded.model.config.model_type),
        "num_layers": loaded.model.config.num_hidden_layers if num_layers is None else num_layers,
    }


def read_record(folder, *, needs=(), what: str = "") -> dict:
    """``folder``'s llmdrop.json; one clear line when it is missing (``what``: why it is needed) or lacks ``needs``
    (top-level keys, or "source.num_layers"-style paths)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise LlmdropError(f"{folder} is not an llmdrop export (no {RECORD_FILE}){': ' + what if what else ''}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        for key in needs:
            value = record
            for part in key.split("."):
                value = value[part]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmdropError(f"cannot read the provenance record {path}: missing or malformed {e}") from None
    return record


def write_record(record: dict, folder) -> None:
    from llmdrop.files import write_json

    write_json(record, Path(folder) / RECORD_FILE)
