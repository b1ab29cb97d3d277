"""transformers-version workarounds (llmdrop.compat): the KV cache's name, and no rename notes for the user."""

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM

from llmdrop import compat
from llmdrop.analysis.attnmaps import capture
from llmdrop.serving.speed import build_random, make_prompt, run_once
from llmdrop.source.arch import adapter_for
from llmdrop.source.calibration import sample_self

VERSION = Version(transformers.__version__)
RENAMED = VERSION >= Version("5.24")  # 5.24 takes cache=, 5.17 past_key_values= (versions in between: either)


@contextmanager
def user_sees():
    """Everything transformers would print to the user: warnings (any filter) and its log records."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers")  # the library root; its module loggers propagate to it
    warning_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # else a note logged once earlier in this process is never logged again
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        log.removeHandler(handler)
    seen += [str(w.message) for w in caught]


class LegacyLlama(LlamaForCausalLM):
    """Remote code written for an older transformers: it names the cache past_key_values."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)


class WrappedLlama(LlamaForCausalLM):
    """A forward that names nothing, like our exports' remote code: the library's name applies."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_cache_kwarg_is_the_name_the_model_takes():
    model = tiny_model("llama")
    if VERSION >= Version("5.24") or VERSION <= Version("5.17"):
        installed = "cache" if RENAMED else "past_key_values"
        assert compat.cache_kwarg(model) == compat.cache_kwarg(WrappedLlama(model.config)) == installed
    assert compat.cache_kwarg(LegacyLlama(model.config)) == "past_key_values"
    cache = compat.output_cache(model(torch.tensor([[5, 6, 7]]), use_cache=True))
    assert cache.get_seq_length() == 3


def test_the_capture_sees_the_rename_notes():
    """Guards the test below: the old spelling is noticed where transformers deprecates it."""
    if not RENAMED:
        pytest.skip("this transformers has no cache rename")
    model = tiny_model("llama")
    with user_sees() as seen:
        _ = model(torch.tensor([[5, 6, 7]]), past_key_values=None, use_cache=True).past_key_values
    assert any("`past_key_values` is deprecated" in m for m in seen)  # the keyword
    assert any("`past_key_values`/`cache_params` are deprecated" in m for m in seen)  # the output field


def test_cached_paths_use_the_installed_name_and_print_nothing():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    names = []
    model.register_forward_pre_hook(
        lambda m, args, kw: names.append(sorted(set(kw) & set(compat.CACHE_NAMES))), with_kwargs=True
    )
    with user_sees() as seen:
        sample_self(model, tok, samples=2, seq_len=4, batch_size=2)  # --calib self
        capture(model, adapter_for(model.config), tok, [5, 6, 7], max_new_tokens=3, progress=False)  # attnmap
        run = run_once(build_random("tiny", "base"), make_prompt(256, 1, 8, 0, "cpu"), gen_len=2)  # bench
    assert seen == []
    assert run["cache_len"] == 8 + 2
    assert len(names) == 3 + 3 and all(n == [compat.cache_kwarg(model)] for n in names)


def test_remote_code_with_the_old_name_works_quietly():
    """A model whose own code still says past_key_values gets that name, and the notes transformers then
    prints (which the user cannot avoid) stay hidden inside our calls -- and only there."""
    model = LegacyLlama(tiny_model("llama").config).eval()
    with user_sees() as seen:
        ids = sample_self(model, tiny_tokenizer(), samples=2, seq_len=5, batch_size=2)
    assert seen == [] and ids.shape == (2, 5)
    if RENAMED:
        with user_sees() as seen:
            model(torch.tensor([[5, 6, 7]]), past_key_values=None, use_cache=True)
        assert any("`past_key_values` is deprecated" in m for m in seen)
