"""The hardware-free core: profiles, devices, configs, the planner. Standard library + numpy only."""
