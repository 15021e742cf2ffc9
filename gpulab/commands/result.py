"""Result: what a command returns, rendered by each front end.

The CLI prints `text` (or `data` as JSON with --json) and `notes` on stderr, and exits with
`exit_code`; the magics show `html` (the figures first) and return the Result itself, so a
notebook can use `.to_dataframe()` and the attributes in `objects` (`.plan`, `.run`, ...).
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result"]


@dataclass
class Result:
    text: str = ""                     # what the CLI prints on stdout
    data: Any = None                   # JSON-able: what --json prints
    html: str | None = None            # what a notebook shows (default: text, preformatted)
    rows: list[dict] = field(default_factory=list)    # plain values for a DataFrame
    notes: list[str] = field(default_factory=list)    # 'gpulab: note: ...' on stderr
    stderr: str = ""                   # more for stderr, as it is (a table beside -o json)
    exit_code: int = 0
    figures: list = field(default_factory=list)       # plotly figures (notebooks only)
    widget: Any = None                 # a widget the magic returns instead (lab, monitor)
    objects: dict = field(default_factory=dict)       # plan, profile, run, ...: as attributes

    def __getattr__(self, name: str):
        objects = self.__dict__.get("objects", {})
        if name in objects:
            return objects[name]
        raise AttributeError(name)

    def _repr_html_(self) -> str:
        body = self.html if self.html is not None else f"<pre>{_html.escape(self.text)}</pre>"
        notes = "".join(f"<div style='color:#666;font-size:12px'>{_html.escape(n)}</div>" for n in self.notes)
        return body + notes

    def __repr__(self) -> str:
        return self.text or f"<Result: {len(self.rows)} rows>"

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame(self.rows)
