"""The 8 attention sublayers --metric gate-norm picks on SmolLM2-135M against cosine's: perplexity on the held-out
texts of docs/selection.md (first 12 blocks of 512 tokens), parts removed in memory. Output:
docs/selection-gatenorm-smollm2.json."""

import json

from llmdrop.passes.evaluation import perplexity
from llmdrop.passes.scoring import importance
from llmdrop.planning.select import removed
from llmdrop.source.calibration import load_texts, tokens_from_texts
from llmdrop.source.models import load_model

m = load_model("smollm2-135m")
g = importance(m, None, metric="gate-norm", progress=False)["attn"]
order = sorted(range(30), key=lambda i: g[i])
plans = {
    "gate-norm 8": sorted(order[:8]),
    "gate-norm 8, layer 0 kept": sorted([i for i in order if i != 0][:8]),
    "cosine 8": [5, 6, 7, 20, 25, 26, 28, 29],
}
out = {}
for path in ["/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py"]:
    ids = tokens_from_texts(load_texts(path), m.tokenizer, samples=None, seq_len=512, purpose="evaluation")[:12]
    out[path] = {"base": perplexity(m.model, ids, progress=False)["perplexity"]}
    for name, attn in plans.items():
        with removed(m.model, m.adapter, attn=attn):
            out[path][name] = perplexity(m.model, ids, progress=False)["perplexity"]
print(json.dumps({"plans": plans, "perplexity": out}, indent=1))
