"""tieify's compiled CPU kernel for tied layers (the ``"kernel"`` path).

A pointwise tied conv on a channels-last input is one ``(N·S·B, C_in/B) @ (C_in/B,
C_out/B)`` matrix product with a huge first and two small other dimensions, a shape on which
BLAS libraries run at a fraction of their speed (``benchmarks/pointwise_paths.py``). The
kernel in ``_kernel.cpp`` is written for that shape (register tiles along the rows, the
thin bank in L1, non-temporal stores for large outputs). A k×k (2-D) tied conv is the same
product with one stretch of rows per filter tap, read from a zero-padded copy of the input
rows under the filter (:func:`conv2d`). Both take an optional epilogue that applies a
following batch norm's per-channel affine, a residual add and a ReLU before the store
(:func:`tieify.fuse`).

It is built on first use with the machine's C++ compiler (``$CXX``, else ``c++``, ``g++``,
``clang++``) for the machine's own instruction set (``-march=native``, OpenMP where the
compiler has it; its two translation units side by side, then linked), once (about 15 s
on the 2-core machine measured), and kept under the
tieify cache directory (``kernels/``), keyed by the source, the compiler and the CPU's
flags, so a home directory shared by different machines never loads one machine's build on
another. Where no compiler
works, or ``TIEIFY_KERNEL=0`` is set, the path is simply not offered: the other paths run,
and :func:`kernel_status` (and one warning, the first time a layer could have used it) says
why.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from subprocess import PIPE
from typing import Any

import torch

__all__ = [
    "Prepared",
    "conv2d",
    "conv_size",
    "kernel_available",
    "kernel_build",
    "kernel_status",
    "pack",
    "pointwise",
    "prepare_conv2d",
    "prepare_pointwise",
    "winograd_applies",
    "winograd_bank",
]

SOURCE = Path(__file__).with_name("_kernel.cpp")
ABI = 7


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of the CPU's largest data (or unified) cache as Linux reports it (its last
    level, shared by the cores: ``/sys/devices/system/cpu/cpu0/cache/index*/``), or None
    where it cannot be read."""
    sizes = []
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in Path(root).glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not text:
            continue
        scale = units.get(text[-1].upper(), 1)
        digits = text[:-1] if text[-1].upper() in units else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def stream_min_bytes(llc: int | None) -> int:
    """The output size from which the kernel writes with non-temporal stores: half the
    last-level cache (``llc`` bytes) where it holds at least 64 MiB, else (or where the cache
    is not known) 1 MiB.

    A non-temporal store skips the cache: worth it for an output the next layer would read
    from memory anyway, harmful for one the cache would have kept. On the AVX-512 Xeon
    (480 MB of L3), fused models, channels-last, outputs streamed from 1 MiB against regular
    stores (``python benchmarks/streaming.py``, 2026-12-02 13:05 UTC,
    ``benchmarks/results/streaming.md``): the all-B = 4 ResNet-50 1.068x / 1.035x the time
    at batch 1 / 8 (0.329 / 0.373 of the dense model against 0.307 / 0.356), ResNet-50 with
    3×3 convs at B = 2 1.001x / 1.025x, MobileNetV3-Large at B = 2 0.984x / 0.971x. The
    ResNets' outputs (6-26 MB at batch 8) fit that L3 many times over: regular stores leave
    them there for the next layer, which a stream makes read them from memory. A cache of
    32 MB does not keep them: on the AVX-512 EPYC (32 MB of L3, 1 MB of L2 a core) the same
    run, streamed from 1 MiB against from 16 MiB (half its L3; 2026-12-03 04:20 UTC,
    ``benchmarks/results/epyc_avx512/streaming.md``), took 0.918x / 0.899x, 0.997x /
    1.007x and 1.015x / 0.985x the time (at 03:36: 0.999x / 0.886x, 0.991x / 0.994x,
    0.966x / 0.990x). On the AVX2 EPYC (512 KB of L2 a core) streamed
    outputs of ResNet-50's pointwise layers ran at 0.94-1.05 of the regular stores' time
    alone."""
    return llc // 2 if llc is not None and llc >= 64 << 20 else 1 << 20


#: Outputs of at least this many bytes are written with non-temporal stores
#: (:func:`stream_min_bytes` of this machine's last-level cache).
STREAM_MIN_BYTES = stream_min_bytes(last_level_cache_bytes())
#: Whether outputs of up to 32 MiB (ResNet-50's largest at batch 8: 25.7 MB) are written with
#: regular stores, so that the next layer finds them in the cache (a last-level cache of at
#: least 64 MiB): the rule's and :func:`tieify.fuse`'s choices measured that way depend on it.
KEEPS_OUTPUTS_CACHED = STREAM_MIN_BYTES >= 32 << 20
#: Flag sets tried in order; the first that compiles is kept.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_COMMON = ("-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas")
#: The source's translation units (``TIEIFY_PART`` = 0, 1), compiled side by side, then linked.
_PARTS = 2

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": ctypes.CDLL | None, "status": str, "build": str | None


def _disabled() -> bool:
    return os.environ.get("TIEIFY_KERNEL", "1").strip().lower() in ("0", "off", "false", "no")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def cpuinfo_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields Linux lists for the first processor in ``path`` (``/proc/cpuinfo``), name to
    value, both stripped (the first processor's block describes them all), or {} where the
    file cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                field, _, value = line.partition(":")
                fields[field.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_flags() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                if field.strip() in ("flags", "Features"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def _build_key(compiler: str) -> str:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [SOURCE.read_text(), shutil.which(compiler) or compiler, version, _cpu_flags()]
    parts += [platform.machine(), platform.system(), repr(_FLAG_SETS), repr(_COMMON)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _compile(compiler: str, target: Path) -> tuple[tuple[str, ...] | None, str]:
    """Compile into ``target`` with the first flag set that works: (flags, "") or (None,
    the last compiler error)."""
    error = ""
    for flags in _FLAG_SETS:
        error = _compile_with(compiler, flags, target)
        if not error:
            return flags, ""
    return None, error


def _compile_with(compiler: str, flags: tuple[str, ...], target: Path) -> str:
    """The source's :data:`_PARTS` translation units compiled side by side into objects
    beside ``target`` (removed after), then linked into it: "" or the first error."""
    objects = [target.with_name(f"{target.name}.{part}.o") for part in range(_PARTS)]
    compiles = [
        [compiler, *flags, *_COMMON, f"-DTIEIFY_PART={part}", "-c", str(SOURCE), "-o", str(obj)]
        for part, obj in enumerate(objects)
    ]
    link = [compiler, *flags, "-shared", *map(str, objects), "-o", str(target)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for cmd in compiles:  # appended one by one: a failed start still kills the others
            procs.append(subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True))
        outputs = [proc.communicate(timeout=300) for proc in procs]
        for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
            if proc.returncode != 0:
                return _first_error(stderr or stdout, proc.returncode)
        done = subprocess.run(link, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            return _first_error(done.stderr or done.stdout, done.returncode)
        return ""
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for obj in objects:
            obj.unlink(missing_ok=True)


def _first_error(output: str, returncode: int) -> str:
    """The compiler's first line that names an error (else its first line, else the status)."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    return (errors or lines or [f"exit status {returncode}"])[0]


def _cache_dir() -> Path:
    from ..latency._cache import cache_dir

    return cache_dir() / "kernels"


def _load() -> tuple[ctypes.CDLL | None, str, str | None]:
    """Build (or find) and load the library: (library, status, its build key) or (None, why
    not, None). A cached build that cannot be loaded is rebuilt, with a warning; one that
    loads but fails its checks is reported, not rebuilt (see below)."""
    if _disabled():
        return None, "disabled by TIEIFY_KERNEL=0", None
    compiler = _compiler()
    if compiler is None:
        why = (
            "no C++ compiler found ($CXX, c++, g++, clang++); install one (e.g. "
            "`apt install g++`) to let tied layers use tieify's kernel"
        )
        return None, why, None
    path = build_path(compiler)
    for attempt in range(2):
        note = "cached build"
        if not path.exists():
            path, note = _build(compiler, path)
            if note.startswith("error: "):
                return None, f"{compiler} could not build {SOURCE.name}: {note[7:]}", None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            if attempt == 0 and note == "cached build":  # e.g. a truncated file: rebuild it
                warnings.warn(
                    f"tieify: the cached kernel {path} cannot be loaded ({err}); rebuilding it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                path.unlink(missing_ok=True)
                continue
            return None, f"cannot load {path} ({err})", None
        # Loaded: a rebuild under the same name would get this library back from the loader,
        # so a build that fails here is reported (delete it to rebuild), not rebuilt.
        error = _check(lib)
        if error:
            return None, f"{path} is unusable: {error}; delete it to rebuild", None
        threads = "OpenMP" if lib.tieify_kernel_features() & 1 else "no OpenMP: one thread"
        return lib, f"available: {path} ({note}; {threads})", path.stem.removeprefix("kernel-")
    raise AssertionError("unreachable")


def build_path(compiler: str) -> Path:
    """Where the build for ``compiler`` on this machine is cached."""
    return _cache_dir() / f"kernel-{_build_key(compiler)}.so"


def _build(compiler: str, path: Path) -> tuple[Path, str]:
    """Compile into ``path`` (atomically: a temporary file, then a rename), or into a
    directory of this process's own where the cache is read-only: (path, how it was built)
    or (path, "error: " + the compiler's error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernel-", suffix=".so")
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="tieify-kernel-")) / path.name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernel-", suffix=".so")
    os.close(fd)
    flags, error = _compile(compiler, Path(tmp))
    if flags is None:
        Path(tmp).unlink(missing_ok=True)
        return path, f"error: {error}"
    os.replace(tmp, path)
    return path, f"built with {compiler} {' '.join(flags)}"


def _check(lib: ctypes.CDLL) -> str:
    """Check a loaded build's ABI and a small product: "" or what is wrong."""
    try:
        abi = lib.tieify_kernel_abi()
        fn = lib.tieify_pointwise
    except AttributeError as err:
        return str(err)
    if abi != ABI:
        return f"ABI {abi}, expected {ABI}"
    for conv in (lib.tieify_conv, lib.tieify_winograd):
        conv.restype = None
        conv.argtypes = [*[ctypes.c_void_p] * 4, ctypes.c_int64, *_EPILOGUE_TYPES]
    fn.restype = None
    fn.argtypes = [
        *[ctypes.c_void_p] * 3,
        *[ctypes.c_int64] * 3,
        *_EPILOGUE_TYPES,
    ]
    planar = lib.tieify_pointwise_planar
    planar.restype = None
    planar.argtypes = [*[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 5, *_EPILOGUE_TYPES]
    lib.tieify_transpose.restype = None
    lib.tieify_transpose.argtypes = [*[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 3, ctypes.c_int]
    if not _self_test(lib):
        return "it computed a wrong result in its self-test"
    return ""


def _self_test(lib: ctypes.CDLL) -> bool:
    """Small products against ``torch.addmm`` (:func:`_product_self_test`), the convolutions,
    the channels-first product and the layout copy."""
    gen = torch.Generator().manual_seed(0)
    return bool(
        _product_self_test(lib, gen, n=27)  # both tile widths and a column tail
        and _product_self_test(lib, gen, n=64)  # the 32-column tiles (without AVX-512)
        and _conv_self_test(lib, gen, stride=1, n_out=5)  # the pixel tiles (N <= 8, 3 wide)
        and _conv_self_test(lib, gen, stride=2, n_out=9)  # the row tiles, phases, a padded bank
        and _conv_self_test(lib, gen, stride=1, n_out=9, winograd=True)
        and _planar_self_test(lib, gen)
        and _transpose_self_test(lib, gen)
    )


def _product_self_test(lib: ctypes.CDLL, gen: torch.Generator, n: int) -> bool:
    """A 29×7 by 7×n product (29 rows: a row tail after every tile height), without and with
    the epilogue (scale and shift of 3 blocks, residual, ReLU)."""
    a, bt = torch.randn(29, 7, generator=gen), torch.randn(7, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    scale, shift = torch.randn(3, n, generator=gen), torch.randn(3, n, generator=gen)
    residual = torch.randn(29, n, generator=gen)
    plain, fused = torch.empty(29, n), torch.empty(29, n)
    ptr = lambda t: t.data_ptr()  # noqa: E731
    packed = pack(bt)
    lib.tieify_pointwise(ptr(a), ptr(packed), ptr(plain), 29, 7, n, ptr(bias), 1, 0, *_NO_EPILOGUE)
    lib.tieify_pointwise(
        ptr(a), ptr(packed), ptr(fused), 29, 7, n, ptr(bias), 1, 0,
        ptr(scale), ptr(shift), 3, ptr(residual), 1,
    )  # fmt: skip
    expected = torch.addmm(bias, a, bt)
    rows = torch.arange(29) % 3
    expected_fused = torch.relu(expected * scale[rows] + shift[rows] + residual)
    return torch.allclose(plain, expected, rtol=1e-4, atol=1e-4) and torch.allclose(
        fused, expected_fused, rtol=1e-4, atol=1e-4
    )


def _transpose_self_test(lib: ctypes.CDLL, gen: torch.Generator) -> bool:
    """A 2×19×3×7 tensor (a strip of 16 channels and one of 3; 21 pixels: 8-column steps and
    a tail) to channels-last and back."""
    x = torch.randn(2, 19, 3, 7, generator=gen)
    cl = torch.empty_like(x, memory_format=torch.channels_last)
    back = torch.empty_like(x)
    lib.tieify_transpose(x.data_ptr(), cl.data_ptr(), 2, 19, 21, 1)
    lib.tieify_transpose(cl.data_ptr(), back.data_ptr(), 2, 21, 19, 1)
    return torch.equal(cl, x) and torch.equal(back, x)


def _planar_self_test(lib: ctypes.CDLL, gen: torch.Generator) -> bool:
    """A channels-first product of 2 blocks of 5 channels into 2 of 9 (a padded tile of
    output channels) on 21 pixels (an overlapping last strip), with a bias, against the
    reference fold."""
    x = torch.randn(2, 10, 3, 7, generator=gen)
    weight, bias = torch.randn(9, 5, generator=gen), torch.randn(9, generator=gen)
    expected = torch.einsum("ok,nbkp->nbop", weight, x.view(2, 2, 5, 21)) + bias[:, None]
    got = torch.empty(2, 18, 3, 7)
    wp = pack_planar(weight)
    lib.tieify_pointwise_planar(
        x.data_ptr(), wp.data_ptr(), got.data_ptr(), 2, 2, 5, 9, 21, bias.data_ptr(), 1, 0,
        *_NO_EPILOGUE,
    )  # fmt: skip
    return torch.allclose(got.view(2, 2, 9, 21), expected, rtol=1e-4, atol=1e-4)


def _conv_self_test(
    lib: ctypes.CDLL, gen: torch.Generator, *, stride: int, n_out: int, winograd: bool = False
) -> bool:
    """A 3×3 tied conv of 2 blocks of 3 channels (padding 1) on a 5×11 input (odd sizes: the
    last Winograd tiles are partly outside), with a bias and the whole epilogue, against the
    reference fold."""
    B, k, (n, h, w) = 2, 3, (2, 5, 11)
    x = torch.randn(n, B * k, h, w, generator=gen)
    weight = torch.randn(n_out, k, 3, 3, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    scale, shift = torch.randn(B, n_out, generator=gen), torch.randn(B, n_out, generator=gen)
    y = torch.nn.functional.conv2d(x.reshape(n * B, k, h, w), weight, bias, stride, 1)
    ho, wo = y.shape[2:]
    y = y.reshape(n, B, n_out, ho, wo) * scale[:, :, None, None] + shift[:, :, None, None]
    residual = torch.randn(n, ho, wo, B * n_out, generator=gen)
    expected = torch.relu(y.reshape(n, B * n_out, ho, wo).permute(0, 2, 3, 1) + residual)
    geometry = torch.tensor([n, h, w, B, k, 3, 3, stride, stride, 1, 1, 1, 1, ho, wo])
    taps = weight.permute(2, 3, 1, 0).reshape(9 * k, n_out)
    bt = winograd_bank(weight) if winograd else pack(taps)
    got = torch.empty(n, ho, wo, B * n_out)
    x = x.permute(0, 2, 3, 1).contiguous()
    ptr = lambda t: t.data_ptr()  # noqa: E731
    (lib.tieify_winograd if winograd else lib.tieify_conv)(
        ptr(x), ptr(geometry), ptr(bt), ptr(got), n_out,
        ptr(bias), 2, 0, ptr(scale), ptr(shift), B, ptr(residual), 1,
    )  # fmt: skip
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


#: The arguments both entry points end with: bias, threads, stream, scale, shift, blocks,
#: residual, relu.
_EPILOGUE_TYPES: tuple[Any, ...] = (
    ctypes.c_void_p,
    *[ctypes.c_int] * 2,
    *[ctypes.c_void_p] * 2,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_int,
)

#: The epilogue arguments that ask for none.
_NO_EPILOGUE = (None, None, 0, None, 0)


def _library() -> ctypes.CDLL | None:
    if "status" not in _state:
        with _lock:
            if "status" not in _state:
                _state["lib"], _state["status"], _state["build"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def kernel_available() -> bool:
    """Whether the ``"kernel"`` path can run in this process (builds it on first call)."""
    return _library() is not None


def kernel_build() -> str | None:
    """The loaded kernel's build key (a hash of its source, the compiler and its version, the
    CPU's flags and the compile flags: :func:`build_path`), or None where it is not
    available (builds it on first call). Timings of the ``kernel`` path cached on disk are
    keyed by it, so a changed kernel is timed again, never judged by an older one's times."""
    _library()
    return _state.get("build")  # type: ignore[return-value]


def kernel_status() -> str:
    """Where the kernel's library is and how it was built, or why it is not available."""
    _library()
    return str(_state["status"])


def warn_unavailable() -> None:
    """Warn once per process that the kernel is missing (not when disabled on purpose)."""
    if _state.get("warned") or _library() is not None or _disabled():
        return
    _state["warned"] = True
    warnings.warn(
        f"tieify: tied layers run without tieify's CPU kernel: "
        f"{_state['status']}. Set TIEIFY_KERNEL=0 to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def reset() -> None:
    """Forget the loaded library and its status (tests; after installing a compiler)."""
    with _lock:
        _state.clear()


#: Fewest elements a tensor :func:`relayout` copies with the kernel's transposing copy; below,
#: PyTorch's copy (less per-call cost). 1×C×H×W tensors, best of 7 rounds of 20,000 copies
#: (AVX-512 EPYC, 2026-12-03 12:30 UTC, 1 and 2 threads), kernel / PyTorch µs to
#: channels-last and back: 4,096 elements 6.5-9.5 / 3.5-5.4 and 5.5-9.7 / 3.2-5.0; 8,192
#: 6.0-12.3 / 4.5-8.2 and 6.6-15.5 / 4.1-7.2; 16,384 6.9-13.2 / 17.3-27.9 and 7.4-15.6 /
#: 12.1-14.3; 32,768 12.8 / 75-83 and 15 / 22-25.
RELAYOUT_MIN_NUMEL = 16384


def relayout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A copy of the dense 4-D float32 CPU ``x`` in channels-last memory from NCHW
    (``channels_last``), or in NCHW from channels-last, by the kernel's transposing copy:
    PyTorch's copy between the two layouts took 7-9x the time of a plain copy of the tensor
    (8×64×56×56: 0.67 ms to channels-last and 0.91 back, against 0.10; AVX-512 EPYC, 2
    threads, 2026-12-03); by PyTorch's below :data:`RELAYOUT_MIN_NUMEL` elements. The
    caller checks :func:`kernel_available` and the layout (the kernel reads raw memory); not
    differentiable."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)
    if x.numel() < RELAYOUT_MIN_NUMEL:
        return out.copy_(x)
    lib = _library()
    assert lib is not None
    n, c, h, w = x.shape
    rows, cols = (c, h * w) if channels_last else (h * w, c)
    lib.tieify_transpose(x.data_ptr(), out.data_ptr(), n, rows, cols, torch.get_num_threads())
    return out


def pointwise(
    a: torch.Tensor, bt: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, **epilogue: Any
) -> torch.Tensor:
    """:func:`prepare_pointwise`'s product, once: ``out``."""
    return prepare_pointwise(a, bt, bias, out, **epilogue).run(a, out, epilogue.get("residual"))


def prepare_pointwise(
    a: torch.Tensor,
    bt: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> Prepared:
    """``out = a @ bt + bias`` for dense row-major float32 CPU ``a`` (R, K), ``bt`` (K, N)
    (or ``pack(bt)`` (:func:`pack`), kept by a caller that runs the bank more than once),
    ``out`` (R, N); the caller checks :func:`kernel_available` and the layouts.

    The epilogue, where given: ``out = out * scale[b] + shift[b]`` with ``b = row % blocks``
    for ``scale`` and ``shift`` of shape (blocks, N) (both or neither), then ``out +=
    residual`` (R, N), then ``out = relu(out)``: a batch norm, a residual add and a ReLU
    applied while the product is in registers.

    Returns the call checked on these operands and made ready (the bank packed), for any
    rows and output laid out like ``a`` and ``out`` (and a residual like ``residual``): see
    :class:`Prepared`."""
    lib = _library()
    assert lib is not None
    bias = None if bias is None else bias.contiguous()  # held by the call while it may run
    bt = _packed("pointwise", bt, 1, a, out.shape[-1])
    epilogue = _operands("pointwise", a, bt, bias, out, scale, shift, residual, relu)
    sizes = (a.shape[0], a.shape[1], out.shape[1])
    keep = (bt, bias, scale, shift)
    return Prepared(lib.tieify_pointwise, (bt.data_ptr(),), sizes, epilogue, keep)


def conv2d(
    x: torch.Tensor, bt: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, **options: Any
) -> torch.Tensor:
    """:func:`prepare_conv2d`'s convolution, once: ``out``."""
    return prepare_conv2d(x, bt, bias, out, **options).run(x, out, options.get("residual"))


def prepare_conv2d(
    x: torch.Tensor,
    bt: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    blocks: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    winograd: bool = False,
) -> Prepared:
    """The k×k tied convolution with zero padding: ``x`` (n, h, w, blocks·K) and ``out``
    (n, ho, wo, blocks·N) dense float32 CPU (the channels-inner views of channels-last
    tensors), ``bt`` (kh·kw·K, N) the bank with its taps outermost
    (``weight.permute(2, 3, 1, 0).reshape(-1, N)``) or ``pack(bt)``, ``bias`` (N,). Block
    ``b`` of every output pixel is the bank applied to block ``b`` of the input pixels under
    the filter. The epilogue as in :func:`prepare_pointwise`, ``residual`` laid out like ``out``,
    ``scale`` and ``shift`` of rows that divide ``blocks`` (output block b takes their row
    b % rows).
    ``winograd``: by Winograd's F(2×2, 3×3) (see ``_kernel.cpp``), where
    :func:`winograd_applies`; ``bt`` is then :func:`winograd_bank`'s.

    Returns the call checked on these operands and made ready, for any input, output (and
    residual) laid out like these: see :class:`Prepared`."""
    lib = _library()
    assert lib is not None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, h, w, channels = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    k = channels // blocks if blocks > 0 else 0
    ho = conv_size(h, kh, sh, ph, dh) if sh > 0 else 0
    wo = conv_size(w, kw, sw, pw, dw) if sw > 0 else 0
    n_out = out.shape[-1] // blocks if out.dim() == 4 and blocks > 0 else 0
    sizes = (kh, kw, sh, sw, dh, dw)
    if (
        x.dim() != 4
        or min((blocks, k, ho, wo, *sizes)) < 1
        or min(ph, pw) < 0
        or channels != blocks * k
        or out.shape != (n, ho, wo, blocks * n_out)
        or (residual is not None and residual.shape != out.shape)
        or not all(t.is_contiguous() for t in (x, out, *([] if residual is None else [residual])))
    ):
        raise ValueError(
            "tieify's convolution kernel takes dense x (n, h, w, blocks·K) "
            "and dense out (n, ho, wo, blocks·N) for the given kernel size, stride, padding and "
            f"dilation, but got x {tuple(x.shape)}, bt {tuple(bt.shape)}, out "
            f"{tuple(out.shape)} with blocks={blocks}, kernel_size={kernel_size}, "
            f"stride={stride}, padding={padding}, dilation={dilation} (output {ho}×{wo}), "
            f"dense: {x.is_contiguous()}, {out.is_contiguous()}."
        )
    if scale is not None and (scale.dim() == 0 or scale.shape[0] < 1 or blocks % scale.shape[0]):
        raise ValueError(
            "tieify's convolution kernel applies an epilogue of blocks that divide the conv's "
            "(block b takes row b % rows of scale and shift), but got scale "
            f"{tuple(scale.shape)} for blocks={blocks}; give one row per block of the conv."
        )
    rows = (x.view(-1, k), out.view(-1, n_out))
    res = None if residual is None else residual.view(-1, n_out)  # the kernel reads it
    bias = None if bias is None else bias.contiguous()  # held by the call while it may run
    if winograd:
        epilogue_blocks = 0 if scale is None else scale.shape[0]
        if not winograd_applies(k, n_out, blocks, kernel_size, stride, dilation, epilogue_blocks):
            raise ValueError(
                "tieify's Winograd convolution takes a 3×3 filter with stride 1 and dilation "
                f"1, at least {WINOGRAD_MIN_CHANNELS} input and output channels a block and "
                "an epilogue of 0 blocks or a divisor of the conv's, but got kernel_size="
                f"{kernel_size}, stride={stride}, dilation={dilation}, {k} and {n_out} "
                f"channels a block, blocks={blocks}, epilogue blocks {epilogue_blocks}; "
                "run it with winograd=False."
            )
        bt = _winograd_packed(bt, k, n_out)
    else:
        bt = _packed("convolution", bt, kh * kw, rows[0], n_out)
    epilogue = _operands("convolution", rows[0], bt, bias, rows[1], scale, shift, res, relu)
    geometry = torch.tensor([n, h, w, blocks, k, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo])
    head = (geometry.data_ptr(), bt.data_ptr())
    keep = (geometry, bt, bias, scale, shift)
    fn = lib.tieify_winograd if winograd else lib.tieify_conv
    return Prepared(fn, head, (n_out,), epilogue, keep)


#: The fewest input and output channels a block (K and N) the convolution kernel runs by
#: Winograd's F(2×2, 3×3) (:func:`winograd_applies`): with 16 the transforms and the thin
#: products cost more than the 2.25 times fewer multiply-adds save (see ``_kernel.cpp``).
WINOGRAD_MIN_CHANNELS = 32

#: F(2×2, 3×3)'s filter transform G (4×3): U = G g G^T for each 3×3 filter g.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_applies(
    k: int,
    n_out: int,
    blocks: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    epilogue_blocks: int = 0,
) -> bool:
    """Whether the convolution kernel runs a tied conv of ``k`` input and ``n_out`` output
    channels a block by Winograd's F(2×2, 3×3): a 3×3 filter with stride and dilation 1, at
    least :data:`WINOGRAD_MIN_CHANNELS` channels a block on both sides, and an epilogue
    (a fused batch norm's ``blocks``) of none or a divisor of the conv's blocks."""
    return (
        tuple(kernel_size) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and min(k, n_out) >= WINOGRAD_MIN_CHANNELS
        and (epilogue_blocks == 0 or blocks % epilogue_blocks == 0)
    )


def winograd_bank(weight: torch.Tensor) -> torch.Tensor:
    """The 3×3 bank ``weight`` (N, K, 3, 3) as the Winograd convolution reads it: the 16
    (K, N) matrices of U = G g G^T (computed in float64), point (i, j) the 4·i + j-th, each
    packed (:func:`pack`), one after the other: a dense 1-D float32 tensor of 16·K·ldb
    entries (ldb: N rounded up to 8)."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
    u = torch.einsum("ai,nkij,bj->abkn", g, weight.detach().double(), g).float()
    return torch.cat([pack(u[i, j]) for i in range(4) for j in range(4)])


def _winograd_packed(bt: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """``bt`` where it is :func:`winograd_bank`'s (1-D, 16·K·ldb entries); else refused."""
    size = 16 * k * -(-n // 8) * 8
    if bt.dim() != 1 or bt.shape[0] != size:
        raise ValueError(
            f"tieify's Winograd convolution takes the bank as tieify.nn._kernel.winograd_bank "
            f"makes it (1-D, {size} entries for K = {k}, N = {n}), but got {tuple(bt.shape)}."
        )
    return bt


#: The output channels of one tile of the channels-first product (PLANAR_ROWS in the kernel).
PLANAR_ROWS = 6

#: The fewest pixels (H·W) the channels-first product takes: one strip of 16.
PLANAR_MIN_PIXELS = 16


def pack_planar(weight: torch.Tensor) -> torch.Tensor:
    """The (N, K) bank (a pointwise layer's weight, any trailing 1s) as the channels-first
    product reads it: tiles of :data:`PLANAR_ROWS` output channels, each a (K, 6) block
    (k-major), the last padded with zeros: a dense tensor of ceil(N / 6)·6·K entries."""
    w = weight.reshape(weight.shape[0], -1)
    n, k = w.shape
    tiles = -(-n // PLANAR_ROWS)
    w = torch.nn.functional.pad(w, (0, 0, 0, tiles * PLANAR_ROWS - n))
    return w.reshape(tiles, PLANAR_ROWS, k).transpose(1, 2).contiguous()


def prepare_pointwise_planar(
    x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, blocks: int
) -> Prepared:
    """The channels-first (NCHW) tied pointwise product, ``out[:, b·N + o] = Σ_k W[o, k] ·
    x[:, b·K + k] + bias[o]`` for each of the ``blocks`` blocks: ``x`` (n, blocks·K, *S) and
    ``out`` (n, blocks·N, *S) dense float32 CPU with S (the pixels) at least
    :data:`PLANAR_MIN_PIXELS`, ``wp`` the bank packed by :func:`pack_planar`, ``bias`` (N,).
    Returns the call checked on these operands and made ready (:class:`Prepared`)."""
    lib = _library()
    assert lib is not None
    n, S = x.shape[0], math.prod(x.shape[2:])
    k = x.shape[1] // blocks if x.dim() > 2 and blocks > 0 else 0
    n_out = out.shape[1] // blocks if out.dim() > 2 and blocks > 0 else 0
    tensors = (x, wp, out, *(() if bias is None else (bias,)))
    if (
        x.dim() < 3
        or min(blocks, k, n_out) < 1
        or x.shape[1] != blocks * k
        or out.shape != (n, blocks * n_out, *x.shape[2:])
        or S < PLANAR_MIN_PIXELS
        or wp.shape != (-(-n_out // PLANAR_ROWS), k, PLANAR_ROWS)
        or (bias is not None and bias.shape != (n_out,))
        or _overlaps(x, out)
        or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
        or not all(t.is_contiguous() for t in tensors)
    ):
        raise ValueError(
            "tieify's channels-first pointwise kernel takes dense float32 CPU tensors x "
            f"(n, blocks·K, *S) with at least {PLANAR_MIN_PIXELS} pixels, out (n, blocks·N, *S) "
            "apart from x, wp = pack_planar(weight) and bias (N,), but got x "
            f"{tuple(x.shape)}, wp {tuple(wp.shape)}, out {tuple(out.shape)}, bias "
            f"{None if bias is None else tuple(bias.shape)}, blocks={blocks}, dtypes "
            f"{[str(t.dtype) for t in tensors]}, contiguous "
            f"{[t.is_contiguous() for t in tensors]}; make them so (.contiguous().float())."
        )
    stream = int(out.numel() * out.element_size() >= STREAM_MIN_BYTES)
    threads = torch.get_num_threads()
    bias_ptr = None if bias is None else bias.data_ptr()
    epilogue = (bias_ptr, threads, stream, *_NO_EPILOGUE)
    sizes = (n, blocks, k, n_out, S)
    return Prepared(lib.tieify_pointwise_planar, (wp.data_ptr(),), sizes, epilogue, (wp, bias))


class Prepared:
    """One entry point of the kernel with every operand but the data checked and fixed:
    ``call(a, out, residual)`` runs it on the data pointers of rows (or a convolution's
    input), an output and a residual laid out exactly like those it was prepared with, with
    the threads PyTorch has at that moment. The caller guarantees the layout (same shapes
    and strides, dense, float32, CPU; a residual where one was given, apart from ``out``):
    the kernel reads raw memory. Made by :func:`prepare_pointwise` and
    :func:`prepare_conv2d`; an eager layer keeps one per input layout
    (:func:`tieify.nn._paths.kernel_call`), saving the checks that cost more than a small
    layer's arithmetic."""

    __slots__ = ("_fn", "_head", "_sizes", "_bias", "_tail", "_relu", "_keep")

    def __init__(
        self,
        fn: Any,
        head: tuple[int, ...],
        sizes: tuple[int, ...],
        epilogue: tuple[Any, ...],
        keep: tuple[torch.Tensor | None, ...],
    ) -> None:
        bias, _threads, stream, scale, shift, blocks, _residual, relu = epilogue
        self._fn, self._head, self._sizes = fn, head, sizes
        self._bias, self._tail, self._relu = bias, (stream, scale, shift, blocks), relu
        self._keep = keep  # the tensors whose memory the fixed pointers name

    def run(
        self, a: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The call on tensors (their data pointers): ``out``."""
        self(a.data_ptr(), out.data_ptr(), None if residual is None else residual.data_ptr())
        return out

    def __call__(self, a: int, out: int, residual: int | None = None) -> None:
        threads = torch.get_num_threads()
        self._fn(a, *self._head, out, *self._sizes, self._bias, threads, *self._tail, residual,
                 self._relu)  # fmt: skip


def pack(bt: torch.Tensor) -> torch.Tensor:
    """The (K, N) bank ``bt`` (a pointwise bank, or a convolution's taps·K rows) as the kernel
    reads it: its columns in panels of 16 while 16 remain, then of 8, the last zero-padded
    to 8, each panel's (K, width) block row-major, one after the other: a dense 1-D tensor
    of K·ldb entries (ldb: N rounded up to 8; a view of ``bt`` where that is its layout
    already, one panel of a dense bank). Each register tile reads one panel in order (see
    ``_kernel.cpp``). Any strides; differentiable."""
    k, n = bt.shape
    wide = n // 16 * 16
    narrow = torch.nn.functional.pad(bt[:, wide:], (0, -(-(n - wide) // 8) * 8 - (n - wide)))
    parts = [
        part.reshape(k, -1, width).transpose(0, 1).reshape(-1)
        for part, width in ((bt[:, :wide], 16), (narrow, 8))
        if part.shape[1]
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def _packed(kind: str, bt: torch.Tensor, taps: int, a: torch.Tensor, n: int) -> torch.Tensor:
    """``bt`` packed (:func:`pack`) where it is a (taps·K, N) bank, as is where it is packed
    already (1-D, taps·K·ldb entries); anything else is refused."""
    if bt.dim() == 2 and bt.shape == (taps * a.shape[-1], n):
        return pack(bt)
    if bt.dim() == 1 and bt.shape[0] == taps * a.shape[-1] * -(-n // 8) * 8:
        return bt
    raise ValueError(
        f"tieify's {kind} kernel takes the bank bt as ({taps}·K, N) = "
        f"({taps * a.shape[-1]}, {n}) for rows of K = {a.shape[-1]} and outputs of N = {n} "
        f"columns, or packed by tieify.nn._kernel.pack (1-D, "
        f"{taps * a.shape[-1] * -(-n // 8) * 8} entries), but got {tuple(bt.shape)}."
    )


def conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output size along one dimension (padding on both sides)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _operands(
    kind: str,
    a: torch.Tensor,
    bt: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[Any, ...]:
    """Check the operands as rows ``a`` (R, K) (any number of rows, for a convolution),
    ``bt`` packed (taps·K·ldb entries, :func:`_packed` checked its size), ``out`` (R, N) and the
    epilogue's, and return the arguments both entry points end with (bias, threads, stream,
    scale, shift, blocks, residual, relu). The kernel reads raw memory: a wrong layout would
    read past the tensors, so anything else is refused."""
    rows, n = out.shape[0], out.shape[1]
    blocks = 0 if scale is None else scale.shape[0]
    given = {"bias": bias, "scale": scale, "shift": shift, "residual": residual}
    tensors = (a, bt, out, *(t for t in given.values() if t is not None))
    if (
        out.dim() != 2
        or (kind == "pointwise" and a.shape[0] != rows)
        or (bias is not None and bias.shape != (n,))
        or (scale is None) != (shift is None)
        or any(t is not None and t.shape != (blocks, n) for t in (scale, shift))
        or (blocks > 0 and rows % blocks != 0)
        or (residual is not None and (residual.shape != (rows, n) or _overlaps(residual, out)))
        or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
        or not all(t.is_contiguous() for t in tensors)
    ):
        shapes = {name: None if t is None else tuple(t.shape) for name, t in given.items()}
        raise ValueError(
            f"tieify's {kind} kernel takes dense float32 CPU tensors a (R, K), bt packed, "
            "out (R, N), bias (N,), scale and shift (blocks, N) with R a multiple of blocks, "
            f"and residual (R, N) apart from out, but got a {tuple(a.shape)}, bt "
            f"{tuple(bt.shape)}, out {tuple(out.shape)}, {shapes}, dtypes "
            f"{[str(t.dtype) for t in tensors]}, contiguous "
            f"{[t.is_contiguous() for t in tensors]}; make them so (.contiguous().float())."
        )
    stream = int(out.numel() * out.element_size() >= STREAM_MIN_BYTES)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    threads = torch.get_num_threads()
    return (ptr(bias), threads, stream, ptr(scale), ptr(shift), blocks, ptr(residual), int(relu))


def _overlaps(t: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether two dense tensors share memory."""
    a0, b0 = t.data_ptr(), u.data_ptr()
    return a0 < b0 + u.numel() * u.element_size() and b0 < a0 + t.numel() * t.element_size()
