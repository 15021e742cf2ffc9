"""Every error gpulab raises on purpose is a GpulabError: one line that names the problem
and what to change. The CLI prints it without a traceback; the widgets show it as a message."""

from __future__ import annotations

__all__ = [
    "GpulabError",
    "ModelFormatError",
    "RemoteModelError",
    "ConfigError",
    "DeviceSpecError",
    "DeviceError",
    "DoesNotFitError",
    "RuntimeUnavailableError",
    "LoadError",
    "StoreError",
    "AllocationMismatchError",
]


class GpulabError(Exception):
    """Base class: a problem the user can act on."""


class ModelFormatError(GpulabError):
    """The file is not a GGUF gpulab can read (wrong magic, truncated, absurd counts)."""


class RemoteModelError(GpulabError):
    """A GGUF at a URL could not be read (unreachable, no range support, header too large)."""


class ConfigError(GpulabError):
    """A SplitConfig that llama.cpp would reject or misread (bad tensor_split, main_gpu...)."""


class DeviceSpecError(GpulabError):
    """A simulated-device spec such as '24GiB,12GiB@10GiB' that does not parse."""


class DeviceError(GpulabError):
    """A device source failed (NVML error, RPC endpoint unreachable)."""


class DoesNotFitError(GpulabError):
    """A configuration that the devices cannot hold; the message names the deficit per device."""


class RuntimeUnavailableError(GpulabError):
    """llama-cpp-python (or its RPC backend) is not installed or not usable."""


class LoadError(GpulabError):
    """llama.cpp refused or failed a load."""


class StoreError(GpulabError):
    """A file gpulab keeps (the results store, a cache) could not be written or read."""


class AllocationMismatchError(GpulabError):
    """A saved allocation exists for this model, but for devices that are not all present now."""


