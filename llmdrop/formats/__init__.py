"""Writing a plan as a checkpoint: the exporter registry, the in-memory surgery, tensor-by-tensor weights, the
model card."""
