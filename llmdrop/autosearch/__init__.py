"""`llmdrop auto`: the fastest plan within a quality budget (or the best quality within a speed / KV-cache budget) on
the user's engine. ``costs`` measures what a sublayer costs on the engine, ``knapsack`` solves the additive problem
exactly, ``search`` measures single-part losses, verifies and refines plans on held-out tokens and reports."""
