"""Runs and what they are compared with: llama-bench records, reconcile, the speed model, tune, sweep grids."""
