"""Shared fixtures. Models are written by the tests themselves; nothing is downloaded."""

from __future__ import annotations

import pytest

from builders import make_profile


@pytest.fixture
def profile_factory():
    return make_profile
