"""llmdrop.source.calibration: text files, hf: datasets (faked), token blocks and text sampled from the model."""

import json
import sys
import types

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from llmdrop.errors import LlmdropError
from llmdrop.source.calibration import calibration_tokens, hf_texts, load_texts, sample_self, tokens_from_texts

EOS = 2
# With the tiny tokenizer: "the river ran ." -> [3, 5, 9, 33]; "a city" -> [4, 6].
THE_RIVER_RAN = [3, 5, 9, 33]
A_CITY = [4, 6]


# --------------------------------------------------------------------------- load_texts


def test_txt_is_one_text(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    assert load_texts(tmp_path / "a.txt") == ["line one\n\nline two\n"]


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    assert load_texts(f) == ["one", "two"]


@pytest.mark.parametrize(
    "payload",
    [[{"text": "one"}, {"text": "two"}], ["one", "two"], {"text": ["one", "two"]}],
    ids=["objects", "strings", "dict-of-list"],
)
def test_json_layouts(tmp_path, payload):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(payload), encoding="utf-8")
    assert load_texts(f) == ["one", "two"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"], "n": [1, 2, 3]}), f)
    assert load_texts(f) == ["one", "two"]


def test_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["one"]}), f)
    with pytest.raises(LlmdropError, match=r"a\.parquet: no \"text\" column \(columns: content\)"):
        load_texts(f)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    f = tmp_path / "a.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LlmdropError, match=r"pip install pyarrow.*llmdrop\[data\]"):
        load_texts(f)


def test_directory_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n', encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('["see"]', encoding="utf-8")
    (tmp_path / "README.md").write_text("not calibration text", encoding="utf-8")
    (tmp_path / "LICENSE").write_text("no suffix: skipped in a directory", encoding="utf-8")
    assert load_texts(tmp_path) == ["ay", "bee", "see"]


def test_empty_directory(tmp_path):
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(LlmdropError) as e:
        load_texts(tmp_path)
    assert str(e.value) == (
        f"directory {str(tmp_path)!r} holds no .txt/.jsonl/.json/.parquet files (other files in a "
        "directory are skipped; give one as the source to read it as text)"
    )


def test_missing_path(tmp_path):
    with pytest.raises(LlmdropError, match="nope.txt.*does not exist"):
        load_texts(tmp_path / "nope.txt")


@pytest.mark.parametrize("name", ["LICENSE", "a.csv", "notes.md"])
def test_any_other_file_is_plain_text(tmp_path, name):
    f = tmp_path / name
    f.write_text("text\nhéllo\n", encoding="utf-8")
    assert load_texts(f) == ["text\nhéllo\n"]


@pytest.mark.parametrize("name", ["LICENSE", "a.txt", "a.jsonl", "a.json"])
def test_non_utf8_file_names_file_and_byte(tmp_path, name):
    f = tmp_path / name
    f.write_bytes('{"text": "caf'.encode() + "é".encode("latin-1") + b'"}\n')
    with pytest.raises(LlmdropError) as e:
        load_texts(f)
    assert str(e.value) == (
        f"{f} is not UTF-8 text (byte 0xe9 at offset 13); convert it, e.g. iconv -f LATIN1 -t "
        f"UTF-8 {f} > {f}.utf8.txt, if it is Latin-1"
    )


def test_record_without_text_names_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no"}\n', encoding="utf-8")
    with pytest.raises(LlmdropError, match=r"a\.jsonl:2: record has no \"text\" field"):
        load_texts(f)


def test_bad_json_names_file(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("[{", encoding="utf-8")
    with pytest.raises(LlmdropError, match=r"a\.json: invalid JSON"):
        load_texts(f)


def test_empty_result_names_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("  \n", encoding="utf-8")
    with pytest.raises(LlmdropError, match=r"a\.txt.*contains no text"):
        load_texts(f)


# --------------------------------------------------------------------------- hf:


def fake_datasets(monkeypatch, *, rows=None, error=None, columns=("text", "id")):
    """Install a fake `datasets` module; returns the list of load_dataset calls it received."""
    calls = []

    class FakeDataset:
        column_names = list(columns)

        def __getitem__(self, column):
            return list(rows)

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if error is not None:
            raise error
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(LlmdropError, match=r"pip install 'llmdrop\[data\]'"):
        hf_texts("hf:wikitext")


@pytest.mark.parametrize(
    "spec, call",
    [
        ("hf:org/corpus", ("org/corpus", None, "train")),
        ("hf:wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
        ("hf:wikitext:wikitext-2-raw-v1:test[:10%]", ("wikitext", "wikitext-2-raw-v1", "test[:10%]")),
        ("hf:org/corpus::validation", ("org/corpus", None, "validation")),
    ],
)
def test_hf_spec_parsing(monkeypatch, spec, call):
    calls = fake_datasets(monkeypatch, rows=["one", None, "two"])
    assert hf_texts(spec) == ["one", "two"]
    assert calls == [call]


def test_hf_load_failure_is_one_line_with_name_and_reason(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'org/corpus' on the Hub (offline)\nmore detail"))
    with pytest.raises(LlmdropError) as info:
        hf_texts("hf:org/corpus")
    assert str(info.value) == (
        "could not load dataset 'org/corpus' split 'train': Couldn't reach 'org/corpus' on the Hub (offline)"
    )


def test_hf_without_text_column(monkeypatch):
    fake_datasets(monkeypatch, rows=[], columns=("question", "answer"))
    with pytest.raises(LlmdropError, match=r"'org/qa' has no \"text\" column \(columns: question, answer\)"):
        hf_texts("hf:org/qa:default:test")


def test_calibration_tokens_from_hf(monkeypatch, tiny_tokenizer):
    fake_datasets(monkeypatch, rows=["the river ran .", "a city"])
    blocks = calibration_tokens("hf:x", tiny_tokenizer, samples=1, seq_len=7)
    assert blocks.tolist() == [THE_RIVER_RAN + [EOS] + A_CITY]


# --------------------------------------------------------------------------- tokens_from_texts


def test_blocks_join_with_eos_without_special_tokens(tiny_tokenizer):
    # The tokenizer's template would prepend <s>=1; calibration text must not contain it.
    assert tiny_tokenizer("a city")["input_ids"][0] == 1
    blocks = tokens_from_texts(["the river ran .", "", "a city"], tiny_tokenizer, samples=None, seq_len=3)
    assert blocks.dtype == torch.long
    # 4 + EOS + 2 = 7 tokens -> two blocks of 3, the tail token dropped; the empty text adds no extra EOS.
    assert blocks.tolist() == [[3, 5, 9], [33, EOS, 4]]


def test_blocks_without_eos_join_directly(tiny_tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, unk_token="<unk>")
    assert no_eos.eos_token_id is None
    blocks = tokens_from_texts(["the river ran .", "a city"], no_eos, samples=None, seq_len=6)
    assert blocks.tolist() == [THE_RIVER_RAN + A_CITY]


def test_seeded_selection_keeps_order_and_is_deterministic(tiny_tokenizer):
    # 12 texts of 2 tokens + 11 EOS = 35 tokens -> 17 blocks of 2.
    texts = ["a city"] * 12
    all_blocks = tokens_from_texts(texts, tiny_tokenizer, samples=None, seq_len=2)
    assert all_blocks.shape == (17, 2)

    picked = tokens_from_texts(texts, tiny_tokenizer, samples=5, seq_len=2, seed=3)
    again = tokens_from_texts(texts, tiny_tokenizer, samples=5, seq_len=2, seed=3)
    other = tokens_from_texts(texts, tiny_tokenizer, samples=5, seq_len=2, seed=4)
    assert picked.shape == (5, 2) and torch.equal(picked, again) and not torch.equal(picked, other)

    expected_rows = torch.randperm(17, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(picked, all_blocks[expected_rows])


def test_distinct_blocks_are_picked_in_text_order(tiny_tokenizer):
    # Every block is unique ([k, k+1] pairs of ids), so order and distinctness are visible.
    vocab = tiny_tokenizer.get_vocab()
    words = " ".join(sorted(vocab, key=vocab.get)[3:])  # all 36 ordinary words, ids 3..38
    blocks = tokens_from_texts([words], tiny_tokenizer, samples=6, seq_len=2, seed=0)
    firsts = blocks[:, 0].tolist()
    assert firsts == sorted(set(firsts)) and len(firsts) == 6
    assert all(b[1] == b[0] + 1 for b in blocks.tolist())


def test_exact_number_of_blocks_returns_all(tiny_tokenizer):
    blocks = tokens_from_texts(["the river ran ."], tiny_tokenizer, samples=2, seq_len=2, seed=9)
    assert blocks.tolist() == [[3, 5], [9, 33]]


def test_too_little_text(tiny_tokenizer):
    with pytest.raises(LlmdropError) as info:
        tokens_from_texts(["the river ran ."] * 300, tiny_tokenizer, samples=16, seq_len=128)
    assert str(info.value) == (
        "calibration text has 1,499 tokens; 16 x 128 = 2,048 are needed "
        "(lower --samples or --seq-len, or give more text)"
    )


def test_too_little_text_names_its_purpose(tiny_tokenizer):
    with pytest.raises(LlmdropError) as e:
        tokens_from_texts(["the river ran ."], tiny_tokenizer, samples=None, seq_len=8, purpose="evaluation")
    assert str(e.value) == (
        "evaluation text has 4 tokens; 1 x 8 = 8 are needed (lower --samples or --seq-len, or give more text)"
    )


def test_too_little_text_for_one_block(tiny_tokenizer):
    with pytest.raises(LlmdropError, match="has 2 tokens; 1 x 3 = 3 are needed"):
        tokens_from_texts(["a city"], tiny_tokenizer, samples=None, seq_len=3)


# --------------------------------------------------------------------------- calibration_tokens


def test_calibration_tokens_from_file(tmp_path, tiny_tokenizer):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "the river ran ."}\n{"text": "a city"}\n', encoding="utf-8")
    assert calibration_tokens(str(f), tiny_tokenizer, samples=2, seq_len=3).tolist() == [[3, 5, 9], [33, EOS, 4]]


@pytest.mark.parametrize("samples, seq_len, match", [(0, 8, "--samples"), (2, 1, "--seq-len")])
def test_calibration_tokens_validates_sizes(tiny_tokenizer, samples, seq_len, match):
    with pytest.raises(LlmdropError, match=match):
        calibration_tokens("self", tiny_tokenizer, samples=samples, seq_len=seq_len)


def test_self_needs_a_model(tiny_tokenizer):
    with pytest.raises(LlmdropError, match="no model was given"):
        calibration_tokens("self", tiny_tokenizer, samples=2, seq_len=8)


# --------------------------------------------------------------------------- sample_self


def test_sample_self_shape_bos_determinism(tiny_llama, tiny_tokenizer):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a = sample_self(tiny_llama, tiny_tokenizer, samples=5, seq_len=12, seed=0, batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG state must not change"

    torch.manual_seed(456)  # a different global state must not matter
    b = calibration_tokens("self", tiny_tokenizer, samples=5, seq_len=12, seed=0, model=tiny_llama)
    c = sample_self(tiny_llama, tiny_tokenizer, samples=5, seq_len=12, seed=1, batch_size=2)

    assert a.shape == (5, 12) and a.dtype == torch.long and a.device.type == "cpu"
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert a.min() >= 0 and a.max() < len(tiny_tokenizer)
    assert len(set(a[:, 1:].flatten().tolist())) > 10, "temperature-1 sampling from a random model is diverse"
    # Only "same seed and same batch_size" is promised, so compare like with like.
    assert torch.equal(a, sample_self(tiny_llama, tiny_tokenizer, samples=5, seq_len=12, seed=0, batch_size=2))
    assert b.shape == (5, 12) and torch.equal(b, sample_self(tiny_llama, tiny_tokenizer, samples=5, seq_len=12))
    assert not torch.equal(a, c)


def test_sample_self_matches_plain_sampling_without_cache(tiny_llama, tiny_tokenizer):
    """The KV-cache loop draws exactly what full-sequence forwards at temperature 1 would draw."""
    got = sample_self(tiny_llama, tiny_tokenizer, samples=3, seq_len=10, seed=7, batch_size=3)
    gen = torch.Generator().manual_seed(7)
    ref = torch.full((3, 10), tiny_tokenizer.bos_token_id)
    with torch.no_grad():
        for pos in range(1, 10):
            probs = torch.softmax(tiny_llama(ref[:, :pos]).logits[:, -1].float(), dim=-1)
            ref[:, pos] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    assert torch.equal(got, ref)


class _OnlyToken(nn.Module):
    """An lm_head that makes one token (practically) certain."""

    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, hidden):
        logits = torch.full((*hidden.shape[:-1], self.vocab), -1e4)
        logits[..., self.token] = 0.0
        return logits


def test_sampled_eos_does_not_stop_a_row(tiny_llama, tiny_tokenizer):
    tiny_llama.lm_head = _OnlyToken(len(tiny_tokenizer), EOS)
    tiny_llama.train()
    out = sample_self(tiny_llama, tiny_tokenizer, samples=3, seq_len=6, batch_size=2)
    assert out.tolist() == [[1, EOS, EOS, EOS, EOS, EOS]] * 3
    assert tiny_llama.training, "the model's train/eval mode is restored"


def test_never_samples_ids_past_the_tokenizer(tiny_llama, tiny_tokenizer):
    # Models often pad the embedding past the tokenizer; make a padded id the favourite.
    vocab = len(tiny_tokenizer)
    tiny_llama.lm_head = _OnlyToken(vocab + 8, vocab + 3)
    out = sample_self(tiny_llama, tiny_tokenizer, samples=2, seq_len=20)
    assert out.max() < vocab


def test_start_token_falls_back_to_eos(tiny_llama, tiny_tokenizer):
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="</s>")
    out = sample_self(tiny_llama, no_bos, samples=2, seq_len=4)
    assert out[:, 0].tolist() == [EOS, EOS]
