"""Where llama.cpp puts each tensor, and what each device holds: the planner and its Plan."""
