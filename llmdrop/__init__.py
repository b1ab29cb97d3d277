"""llmdrop: find redundant attention / MLP sublayers and blocks in decoder LLMs, drop them, export."""

__version__ = "0.1.0"

from .api import drop, evaluate, score  # noqa: E402
from .attnmaps import attnmap  # noqa: E402
from .bench import bench  # noqa: E402
from .errors import LlmdropError  # noqa: E402
from .manipulate import Manipulation, capture_layer_inputs, manipulation  # noqa: E402
from .probing import inject, probe  # noqa: E402

__all__ = ["score", "drop", "evaluate", "bench", "attnmap", "LlmdropError", "__version__",
           "probe", "inject", "manipulation", "Manipulation", "capture_layer_inputs"]
