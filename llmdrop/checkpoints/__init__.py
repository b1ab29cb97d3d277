"""What is done to an export afterwards: lm-eval tasks, healing, quantization."""
