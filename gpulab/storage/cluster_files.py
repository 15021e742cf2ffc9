"""Cluster files: the hosts-and-links description (TOML, gpulab.core.cluster) read and written."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.cluster import Cluster, cluster_from_dict, cluster_to_dict
from ..core.errors import ConfigError
from .files import TOMLDecodeError, atomic_write_text, read_toml, to_toml

__all__ = ["read_cluster", "write_cluster", "cluster_text"]


def read_cluster(path: str | os.PathLike) -> Cluster:
    """The Cluster in a TOML file; ConfigError naming the file for anything wrong with it."""
    try:
        doc = read_toml(path)
    except OSError as e:
        raise ConfigError(f"cannot read the cluster {path}: {e.strerror or e}") from None
    except TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    try:
        return cluster_from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def cluster_text(cluster: Cluster) -> str:
    return to_toml(cluster_to_dict(cluster))


def write_cluster(path: str | os.PathLike, cluster: Cluster) -> Path:
    return atomic_write_text(path, cluster_text(cluster))
