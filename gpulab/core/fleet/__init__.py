"""Several models on one box: the fleet file, its planner and advice, and reading other tools' configs."""
