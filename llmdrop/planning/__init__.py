"""What to drop and how to make up for it: the selector registry and algorithms, the plan, the plan applied in
memory (surgery), compensation."""
