"""Shared offline fixtures: a tiny word-level tokenizer and a tiny random Llama built in memory."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Fixed ids, so tests can assert exact token ids: <unk>=0, <s>=1, </s>=2, then these words in order.
TINY_WORDS = (
    "the a river city old new ran through valley people built bridge over water in of and to was is "
    "it on at by for with from that this as . , ! ? ' \""
).split()
TINY_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}


@pytest.fixture
def tiny_tokenizer():
    """Word-level tokenizer (whitespace/punctuation split) whose special-token template adds BOS."""
    tok = Tokenizer(models.WordLevel(vocab=TINY_VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # With special tokens on, "<s>" is prepended: lets tests check that calibration text turns them off.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """A 2-layer random Llama (hidden 32, GQA 4/2 heads) over the tiny tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny matrices: a second thread only adds synchronisation (~100x slower on a busy 2-core machine).
    The SmolLM2 tests (marked slow) keep all threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_model_work(monkeypatch):
    """Record any model load or scoring pass: a refusal that must come before any model work asserts it stays []."""
    import llmdrop.passes.scoring
    import llmdrop.source.models

    calls = []
    monkeypatch.setattr(llmdrop.source.models, "load_model", lambda *a, **k: calls.append("load"))
    monkeypatch.setattr(llmdrop.passes.scoring, "importance", lambda *a, **k: calls.append("score"))
    return calls
