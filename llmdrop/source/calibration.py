"""Calibration and evaluation text, turned into token sequences ``[samples, seq_len]``.

Sources: ``"self"`` (text sampled from the model itself, the offline default), a file (``.jsonl`` / ``.json`` /
``.parquet``, anything else is read as UTF-8 text) or a directory of ``.txt`` / ``.jsonl`` / ``.json`` /
``.parquet`` files, or ``"hf:NAME[:CONFIG][:SPLIT]"`` (a Hugging Face dataset, through the optional ``datasets``
package). Every random choice is seeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmdrop.compat import cache_kwarg, output_cache, quiet_cache_rename
from llmdrop.errors import LlmdropError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_INSTALL_DATA = "pip install 'llmdrop[data]'"
# `self` text is sampled token by token, so it gets a smaller default than real text (paper: 128 x 2048).
DEFAULT_CALIBRATION = {"self": (32, 256), "text": (128, 2048)}


def check_sizes(*, samples=None, seq_len=None, batch_size=None) -> None:
    """One clear line for an impossible size, before any model work (None: the default). A sequence of one token
    predicts nothing, hence seq_len >= 2."""
    for name, value, least in (("--samples", samples, 1), ("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise LlmdropError(f"{name} must be a whole number >= {least}, got {value!r}")


def max_positions(config) -> int | None:
    """``max_position_embeddings`` of a loaded config or a config.json dict (None: unknown, e.g. before a GGUF load)."""
    if not config:
        return None
    limit = (
        config.get("max_position_embeddings")
        if isinstance(config, dict)
        else getattr(config, "max_position_embeddings", None)
    )
    return limit if isinstance(limit, int) else None


def check_seq_len(seq_len: int, config) -> None:
    """Refuse blocks longer than the positions the model was trained for."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise LlmdropError(
            f"--seq-len {seq_len} is longer than the model's {limit} positions (max_position_embeddings)"
        )


@dataclass(frozen=True)
class CalibSpec:
    """Which calibration text and how much of it: what score, drop and quantize take as ``calib`` (a plain
    source string means its defaults). ``samples`` / ``seq_len`` None: 32 x 256 for ``self``, 128 x 2048 else."""

    source: str = "self"
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    seq_len_given: bool = field(default=True, compare=False, repr=False)  # False: the default, cut to the model

    @classmethod
    def of(cls, calib: "str | CalibSpec | None") -> "CalibSpec":
        spec = calib if isinstance(calib, CalibSpec) else cls(str(calib) if calib is not None else "self")
        check_sizes(samples=spec.samples, seq_len=spec.seq_len)
        d_samples, d_len = DEFAULT_CALIBRATION["self" if spec.source == "self" else "text"]
        return cls(
            spec.source,
            d_samples if spec.samples is None else spec.samples,
            d_len if spec.seq_len is None else spec.seq_len,
            spec.seed,
            seq_len_given=spec.seq_len is not None and spec.seq_len_given,
        )

    def fitted(self, config) -> "CalibSpec":
        """This calibration for a model with ``config``: an explicit --seq-len beyond its positions is refused, the
        default length is cut to them."""
        limit = max_positions(config)
        if limit is None or self.seq_len is None or self.seq_len <= limit:
            return self
        if not self.seq_len_given:
            return replace(self, seq_len=limit)
        check_seq_len(self.seq_len, config)

    @property
    def input(self) -> str | None:
        """The file or folder this calibration reads (None: sampled from the model, or a Hub dataset)."""
        return None if self.source == "self" or self.source.startswith("hf:") else self.source

    def tokens(self, tokenizer, model=None) -> torch.LongTensor:
        seq_len = self.fitted(model.config).seq_len if model is not None else self.seq_len
        return calibration_tokens(
            self.source, tokenizer, samples=self.samples, seq_len=seq_len, seed=self.seed, model=model
        )

    def record(self, tokens: torch.Tensor) -> dict:
        """What llmdrop.json and the scores file keep about the calibration."""
        return {
            "source": self.source,
            "samples": self.samples,
            "seq_len": tokens.shape[-1],
            "seed": self.seed,
            "tokens": tokens.numel(),
        }


def calibration_tokens(
    source: str, tokenizer, *, samples: int, seq_len: int, seed: int = 0, model=None
) -> torch.LongTensor:
    """[samples, seq_len] token ids. source: "self" | a path | "hf:NAME[:CONFIG][:SPLIT]"."""
    check_sizes(samples=samples, seq_len=seq_len)
    source = str(source)
    if source == "self":
        if model is None:
            raise LlmdropError("calibration source 'self' samples text from the model, but no model was given")
        return sample_self(model, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    texts = hf_texts(source) if source.startswith("hf:") else load_texts(source)
    return tokens_from_texts(texts, tokenizer, samples=samples, seq_len=seq_len, seed=seed)


# --------------------------------------------------------------------------- files


def load_texts(path) -> list[str]:
    """The texts in a file (.jsonl/.json/.parquet by their format, any other file as plain UTF-8 text, e.g.
    LICENSE), or in all .txt/.jsonl/.json/.parquet files under a directory. A directory's other files are skipped:
    folders hold READMEs, licences and binaries that are not meant as text; name such a file to use it."""
    path = Path(path)
    if not path.exists():
        raise LlmdropError(f"text source {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise LlmdropError(
                f"directory {str(path)!r} holds no {'/'.join(SUFFIXES)} files (other files in a "
                "directory are skipped; give one as the source to read it as text)"
            )
        texts = [t for f in files for t in _load_file(f)]
    else:
        texts = _load_file(path)
    if not any(t.strip() for t in texts):
        raise LlmdropError(f"{str(path)!r} contains no text")
    return texts


def _load_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if line.strip():
                texts.append(_text_of(_parse_json(line, f"{path}:{n}"), f"{path}:{n}"))
        return texts
    if suffix == ".json":
        data = _parse_json(_read_utf8(path), str(path))
        if isinstance(data, dict) and isinstance(data.get("text"), list):
            data = data["text"]
        if not isinstance(data, list):
            raise LlmdropError(
                f'{path} must hold a list of texts, a list of {{"text": ...}} objects or {{"text": [...]}}'
            )
        return [_text_of(item, f"{path} item {i}") for i, item in enumerate(data)]
    if suffix == ".parquet":
        return _load_parquet(path)
    return [_read_utf8(path)]  # .txt, and any other file: plain text


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmdropError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}); convert it, "
            f"e.g. iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8.txt, if it is Latin-1"
        ) from None


def _parse_json(raw: str, where: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise LlmdropError(f"{where}: invalid JSON ({e.msg})") from None


def _text_of(item, where: str) -> str:
    """A record is either a string or an object with a string field "text"."""
    if isinstance(item, dict):
        if "text" not in item:
            raise LlmdropError(f'{where}: record has no "text" field')
        item = item["text"]
    if not isinstance(item, str):
        raise LlmdropError(f'{where}: "text" must be a string, got {type(item).__name__}')
    return item


def _load_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmdropError(f"reading {path} needs pyarrow: pip install pyarrow (or {_INSTALL_DATA})") from None
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise LlmdropError(f'{path}: no "text" column (columns: {", ".join(schema.names)})')
    # Nulls are rows without text; skipping them is kinder than failing on a sparse column.
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t is not None]


# --------------------------------------------------------------------------- hf:


def hf_texts(spec: str) -> list[str]:
    """The "text" column of "hf:NAME[:CONFIG][:SPLIT]" (split defaults to "train").

    At most two colons split the spec, so a slice stays in the split: "hf:wikitext:wikitext-2-raw-v1:test[:10%]".
    Leave CONFIG empty to give only a split: "hf:NAME::validation".
    """
    parts = spec.removeprefix("hf:").split(":", 2)
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise LlmdropError(f"{spec!r} names no dataset; use hf:NAME[:CONFIG][:SPLIT]")
    try:
        import datasets
    except ImportError:
        raise LlmdropError(f"hf: datasets need the datasets package: {_INSTALL_DATA}") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad config: all one line for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        what = f"{name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
        raise LlmdropError(f"could not load dataset {what}: {reason}") from None
    if "text" not in ds.column_names:
        raise LlmdropError(f'dataset {name!r} has no "text" column (columns: {", ".join(ds.column_names)})')
    texts = [t for t in ds["text"] if t is not None]
    if not any(t.strip() for t in texts):
        raise LlmdropError(f"dataset {name!r} split {split!r} contains no text")
    return texts


# --------------------------------------------------------------------------- token sequences


def tokens_from_texts(
    texts: list[str], tokenizer, *, samples: int | None, seq_len: int, seed: int = 0, purpose: str = "calibration"
) -> torch.LongTensor:
    """Tokenize, join with EOS, cut into non-overlapping seq_len sequences; keep `samples` of them (None: all).
    ``purpose`` ("calibration", "evaluation") names the text in errors."""
    # verbose=False: a whole book is "longer than the model's max length", which is fine here.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for toks in encoded:
        if not toks:  # empty lines (common in datasets) would otherwise give runs of EOS
            continue
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(toks)

    n_seqs = len(ids) // seq_len
    wanted = 1 if samples is None else samples
    if n_seqs < wanted:
        raise LlmdropError(
            f"{purpose} text has {len(ids):,} tokens; {wanted} x {seq_len} = {wanted * seq_len:,} are needed "
            "(lower --samples or --seq-len, or give more text)"
        )
    seqs = torch.tensor(ids[: n_seqs * seq_len], dtype=torch.long).view(n_seqs, seq_len)
    if samples is None or samples == n_seqs:
        return seqs
    # A seeded choice spread over the whole text (not just its start), kept in reading order.
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n_seqs, generator=gen)[:samples].sort().values
    return seqs[keep]


# --------------------------------------------------------------------------- self


@quiet_cache_rename()
def sample_self(
    model, tokenizer, *, samples: int, seq_len: int, seed: int = 0, batch_size: int = 16
) -> torch.LongTensor:
    """[samples, seq_len] token ids sampled from the model itself (temperature 1, no top-k/top-p), seeded.

    Each row starts with BOS (else EOS, else token 0). A hand-written loop rather than ``generate``:
    a sampled EOS does not end a row (the text simply goes on, like a new document), and no
    ``generation_config`` setting (repetition penalty, suppressed tokens, ...) can bend the distribution.
    The draws use a private CPU generator, so the caller's RNG state is untouched and the result
    does not depend on the device. Same seed and batch_size → the same tensor.
    """
    from rich.console import Console
    from rich.progress import Progress

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise LlmdropError(f"need samples >= 1, seq_len >= 2, batch_size >= 1; got {samples}, {seq_len}, {batch_size}")
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
    # Models often pad their embedding past the tokenizer; those ids are not text, so never sample them.
    n_vocab = len(tokenizer)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    cache_name = cache_kwarg(model)
    rows = []
    # Belt and braces: forward passes should not draw random numbers in eval mode, but if one does,
    # the caller's CPU RNG is left as it was (the draws themselves use the private generator).
    try:
        with (
            torch.random.fork_rng(devices=[]),
            torch.no_grad(),
            Progress(console=Console(stderr=True), transient=True) as progress,
        ):
            task = progress.add_task("sampling calibration text from the model", total=samples * (seq_len - 1))
            for first in range(0, samples, batch_size):
                n = min(batch_size, samples - first)
                out = torch.full((n, seq_len), start, dtype=torch.long)
                step_ids, cache = out[:, :1].to(device), None
                for pos in range(1, seq_len):
                    res = model(input_ids=step_ids, use_cache=True, **{cache_name: cache})
                    cache = output_cache(res)
                    logits = res.logits[:, -1, :n_vocab].float().cpu()
                    out[:, pos] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
                    step_ids = out[:, pos : pos + 1].to(device)
                    progress.advance(task, n)
                rows.append(out)
    finally:
        model.train(was_training)
    return torch.cat(rows)
