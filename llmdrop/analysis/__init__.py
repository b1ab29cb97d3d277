"""The analysis behind the redundancy: attention manipulations, probing, ACT, attention maps."""
