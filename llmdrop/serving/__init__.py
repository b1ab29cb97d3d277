"""Speed on engines (transformers, vLLM), the bench verb, pushing to the Hub."""
