"""Every workaround for a difference between transformers versions lives here (the pin: ``>=5.0,<6``).

CI runs the tests on the newest transformers the pin allows and on the 5.17 that llm-compressor pins.

KV cache name: newer 5.x releases (5.24, not 5.17) call the cache ``cache`` (forward keyword and output field)
where earlier ones say ``past_key_values``. The old name still works there but warns on every forward and goes in
5.40 (``deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``). So we ask the model which name it
takes rather than go by the version number: remote code may lag behind the library it runs on.

``modeling/`` (remote code shipped in checkpoints) cannot import llmdrop; any switch it needs is inline there.
"""

import inspect
import logging
import warnings
from contextlib import contextmanager

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAMES = ("cache", "past_key_values")  # the new name first
# What this transformers' own outputs call it: the answer for a forward(**kwargs) that names neither.
_LIBRARY_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``"cache"`` or ``"past_key_values"``."""
    params = inspect.signature(model.forward).parameters  # follows the decorators' __wrapped__
    return next((name for name in CACHE_NAMES if name in params), _LIBRARY_NAME)


def output_cache(out):
    """The KV cache a forward returned, read under the field name this output has (no deprecation warning)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values


def call_cache(module: torch.nn.Module, args: tuple, kwargs: dict):
    """The KV cache a forward of ``module`` was called with (a forward pre-hook's view), whatever its name
    and also when passed positionally; None without one."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    if args:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None
        return next((bound[name] for name in CACHE_NAMES if bound.get(name) is not None), None)
    return None


# The rename's two notes (5.24): a FutureWarning from each forward given the old keyword, and a
# log line (from the module that defines ModelOutput) when an output is read as ``.past_key_values``.
_RENAME_WARNING = r"`past_key_values` is deprecated"
_RENAME_LOGGER = "transformers.utils.generic"


class _DropRenameNote(logging.Filter):
    def filter(self, record):
        return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


@contextmanager
def quiet_cache_rename():
    """Hide transformers' notes about the cache rename inside the block. Our own calls never cause them
    (cache_kwarg, output_cache); this is for remote code that still says past_key_values, which the user
    cannot change either."""
    note, log = _DropRenameNote(), logging.getLogger(_RENAME_LOGGER)
    log.addFilter(note)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_RENAME_WARNING, category=FutureWarning)
            yield
    finally:
        log.removeFilter(note)


# transformers 5.25 requires the `kernels` package and kernelizes every from_pretrained by default (use_kernels None
# -> True), which refuses the meta device ("Unsupported device type 'meta'"). A skeleton or a reload check on meta
# has nothing to kernelize: ask for none (the keyword exists, default False, in every 5.x).
META_LOAD = {"device_map": "meta", "use_kernels": False}
