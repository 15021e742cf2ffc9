"""The one flag table (gpulab.core.settings): it covers every SplitConfig field, and its flags are
llama.cpp's own spellings (common/arg.cpp of the vendored source, where the tests have it)."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from gpulab.core import settings
from gpulab.core.config import SplitConfig
from llama_tools import vendored_src


def test_every_config_field_has_exactly_one_row():
    attrs = [s.attr for s in settings.SETTINGS]
    assert sorted(attrs) == sorted(f.name for f in fields(SplitConfig))
    settings.check_settings_cover_config()


def test_a_field_without_a_row_is_refused(monkeypatch):
    monkeypatch.delitem(settings._BY_ATTR, "n_cpu_moe")
    with pytest.raises(RuntimeError, match=r"does not declare SplitConfig.\['n_cpu_moe'\]"):
        settings.check_settings_cover_config()


def test_flags_are_llama_servers_own():
    src = vendored_src()
    if src is None:
        pytest.skip("the vendored llama.cpp source is not at hand (make test builds llama.cpp's tools)")
    arg_cpp = (src / "common" / "arg.cpp").read_text()
    declared = set(re.findall(r'"(--?[a-zA-Z][a-zA-Z0-9-]*)"', arg_cpp))
    for s in settings.SETTINGS:
        for flag in s.flags:
            assert flag in declared, f"{s.attr}: {flag} is not a llama.cpp flag (common/arg.cpp)"
