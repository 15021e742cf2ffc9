"""Cluster files: the hosts-and-links description (TOML, gpulab.core.cluster) read and written."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.cluster import Cluster, cluster_from_dict, cluster_to_dict
from .files import atomic_write_text, read_toml_as, to_toml

__all__ = ["read_cluster", "write_cluster", "cluster_text"]


def read_cluster(path: str | os.PathLike) -> Cluster:
    """The Cluster in a TOML file; ConfigError naming the file for anything wrong with it."""
    return read_toml_as(path, "cluster", cluster_from_dict)


def cluster_text(cluster: Cluster) -> str:
    return to_toml(cluster_to_dict(cluster))


def write_cluster(path: str | os.PathLike, cluster: Cluster) -> Path:
    return atomic_write_text(path, cluster_text(cluster))
