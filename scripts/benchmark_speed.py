#!/usr/bin/env python
"""Speed / memory benchmark of dropped models: the same as `llmdrop bench`, with the same options.

python scripts/benchmark_speed.py smollm2-135m ./smollm2-drop8attn --prompt-lens 128,512 --json bench.json
python scripts/benchmark_speed.py --random-weights llama-3-8b base attn:16 blocks:8 --plot bench.png
"""

import sys

from llmdrop.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]], prog_name="benchmark_speed.py"))
