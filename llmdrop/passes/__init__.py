"""Hooked passes over calibration tokens: the runner (in memory, streamed, torchrun) and what is measured on it
(similarity scores, perplexity)."""
