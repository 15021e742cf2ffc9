"""Persistence, in one place: where gpulab keeps things (paths), how it writes them (atomically,
TOML through tomli-w), and what it keeps: measured results, device speeds, learned overheads,
saved allocations. Imports core and sources only; core itself does no I/O."""
