"""Perplexity on text cut into non-overlapping token sequences (float32 accumulation whatever the model dtype)."""

import math

import torch
import torch.nn.functional as F

from llmdrop.errors import LlmdropError


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, predicted = 0.0, 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        targets = batch[:, 1:]
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        predicted += targets.numel()
    mean = nll / predicted
    if not math.isfinite(mean) or mean > 700:  # exp(>709) overflows; a real model never gets near
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise LlmdropError(
            f"perplexity is not finite (mean loss {mean}): the model's logits hold NaN or infinity. "
            f"Likely causes: corrupted weights (a damaged or truncated checkpoint file: re-download or "
            f"re-export it) or values overflowing the dtype ({dtype}; float16 overflows easily: try "
            f"--dtype float32 or bfloat16)"
        )
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": predicted,
        "samples": len(tokens),
        "seq_len": tokens.shape[1],
    }
