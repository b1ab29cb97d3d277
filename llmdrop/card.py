"""The README.md model card written into every export (Hub metadata + how to load it)."""

from .models import BUILTIN_BASE_MODELS


def _yaml_list(items) -> str:
    return "".join(f"\n- {x}" for x in items)


def model_card(record: dict, *, base_model: str | None = None) -> str:
    src = record["source"]
    plan = record["plan"]
    exported = record["exported"]
    base = base_model or BUILTIN_BASE_MODELS.get(src["model"]) or src["model"]
    remote = exported["remote_code"]
    tags = ["llmdrop", "layer-dropping", "pruning"] + (["custom_code"] if remote else [])
    trust = ", trust_remote_code=True" if remote else ""
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags:{_yaml_list(tags)}",
        "---",
        "",
        f"# {base} with layers dropped by llmdrop",
        "",
        f"This checkpoint is [{base}](https://huggingface.co/{base}) with redundant parts removed by "
        "[llmdrop](https://github.com/llmdrop/llmdrop): the parts whose output barely changes the residual "
        "stream (cosine similarity of the hidden states before and after them, on calibration text).",
        "",
        "| removed | source layers (0-based) |",
        "|---|---|",
        f"| whole blocks | {', '.join(map(str, plan['blocks'])) or '-'} |",
        f"| attention sublayers | {', '.join(map(str, plan['attn'])) or '-'} |",
        f"| MLP sublayers | {', '.join(map(str, plan['mlp'])) or '-'} |",
        "",
        f"Layers: {src['num_layers']} -> {exported['num_layers']}. Saved dtype: {exported['dtype']}.",
    ]
    calib = record.get("calibration")
    if calib:
        lines += ["", f"Calibration: `{calib.get('source')}`, {calib.get('samples')} x {calib.get('seq_len')} tokens, "
                  f"seed {calib.get('seed')}."]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO"{trust})',
        "```",
        "",
    ]
    if remote:
        lines += [
            "Attention / MLP sublayers were removed inside layers, so this checkpoint ships its own small modeling "
            "code (`modeling_llmdrop.py`, needs only torch and transformers) and a distinct `model_type`: loading "
            "it without `trust_remote_code=True` fails instead of running with missing weights. The KV cache holds "
            f"only the {exported['num_layers'] - len(exported['drop_attn_list'])} kept attention layers.",
            "",
        ]
    else:
        lines += ["Only whole blocks were removed, so this is a plain checkpoint of the base architecture: no "
                  "custom code is needed.", ""]
    lines += ["`llmdrop.json` records the source, the plan, the importance scores and the versions used.", ""]
    return "\n".join(lines)
