"""Front ends: text tables for the CLI, and (with the jupyter extra) figures, widgets, magics."""
