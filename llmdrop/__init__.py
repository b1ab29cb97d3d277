"""llmdrop: find redundant attention / MLP sublayers and blocks in decoder LLMs, drop them, export.

The public functions are imported on first use (PEP 562), so that ``llmdrop --help`` and ``import llmdrop``
do not pay for torch and transformers.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module it is found in: every CLI verb is a function of the api module (tests/test_cli.py)
_PUBLIC = {
    "score": "api",
    "drop": "api",
    "auto": "api",
    "evaluate": "api",
    "bench": "api",
    "attnmap": "api",
    "probe": "api",
    "inject": "api",
    "quantize": "api",
    "heal": "api",
    "push": "api",
    "act_search": "api",
    "act_eval": "api",
    "act_apply": "api",
    "LoadSpec": "api",
    "CalibSpec": "api",
    "LlmdropError": "errors",
    "manipulation": "analysis.manipulate",
    "Manipulation": "analysis.manipulate",
    "capture_layer_inputs": "analysis.manipulate",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'llmdrop' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
