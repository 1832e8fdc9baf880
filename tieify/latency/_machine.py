"""Which machine a measurement was taken on.

Every on-disk measurement (latency table entries, model remainders, ``tieify.optimize`` path
choices) is keyed by :func:`machine_key`, so a cache directory shared between machines (a
home directory on NFS, a cluster whose nodes differ, a disk image booted on new hardware)
never serves one machine's timings on another. Two hosts of the same CPU model, instruction
set and CPU count share entries; that is the intent (their timings agree as far as this
host's noise can tell).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from ..nn._kernel import cpuinfo_fields

__all__ = ["machine_key", "software_key", "describe_machine"]


def _cpu_model() -> str:
    """The CPU's model: its name, and on Linux the family/model/stepping numbers and cache
    size from ``/proc/cpuinfo`` (a virtual machine often reports only a generic name, and the
    numbers still tell its hosts apart); elsewhere what ``platform`` knows."""
    fields = {field.lower(): value for field, value in cpuinfo_fields().items()}
    name = fields.get("model name") or fields.get("hardware") or fields.get("cpu model")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    details = [
        f"{label} {fields[field]}"
        for label, field in (
            ("family", "cpu family"),
            ("model", "model"),
            ("stepping", "stepping"),
            ("cache", "cache size"),
        )
        if field in fields
    ]
    return f"{name} ({', '.join(details)})" if details else name


def _usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _cpu_key() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{_cpu_model()} | {platform.machine()} | {capability} | {_usable_cpus()} CPUs"


@functools.lru_cache(maxsize=None)
def _cuda_key(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} | sm_{major}{minor} | host {_cpu_key()}"


def _cuda_index(device: torch.device) -> int:
    """The index of a CUDA device (``cuda`` alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def machine_key(device: torch.device | str = "cpu") -> str:
    """A short description of the hardware that runs work on ``device``: CPU model,
    architecture, the instruction set torch's CPU kernels use (e.g. ``AVX2``, ``AVX512``)
    and the usable CPU count; for a CUDA device, the GPU's name and compute capability as
    well (its host CPU still launches the kernels).

    Example:
        >>> from tieify.latency._machine import machine_key
        >>> "CPUs" in machine_key("cpu")
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_key(_cuda_index(device))
    if device.type == "cpu":
        return _cpu_key()
    return f"{device.type} | host {_cpu_key()}"


def software_key(*, kernel: bool) -> dict[str, str | None]:
    """The code a cached measurement was taken with, beside the machine: the torch and tieify
    versions and, where the measurement ran (or chose between) tieify's compiled kernel,
    the kernel's build (:func:`tieify.nn._kernel.kernel_build`: its source, compiler and
    flags). A new version or a rebuilt kernel gets measured again rather than judged by the
    old code's times (a path chosen against an older kernel stays chosen otherwise)."""
    from .._version import __version__
    from ..nn import _kernel

    key: dict[str, str | None] = {"torch": torch.__version__, "tieify": __version__}
    if kernel:
        key["kernel"] = _kernel.kernel_build()
        key["stream_min_bytes"] = str(_kernel.STREAM_MIN_BYTES)  # the kernel's stores
    return key


def describe_machine(device: torch.device | str = "cpu") -> str:
    """The hardware that runs work on ``device``, for reports: the CPU's model, architecture,
    instruction set and usable/all logical CPUs; for a CUDA device the GPU's name first."""
    cpu = (
        f"{_cpu_model()}, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{_usable_cpus()} of {os.cpu_count()} logical CPUs usable"
    )
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(_cuda_index(device))} (host: {cpu})"
    if device.type != "cpu":
        return f"{device.type} (host: {cpu})"
    return cpu
