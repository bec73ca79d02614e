"""`lstmeng info`: what this machine offers lstmeng, and the BLAS thread controls the other commands use.

Everything here is read without side effects: optional libraries are found by
their distribution metadata (importing TensorFlow to read its version would
take seconds and print warnings), and CUDA is probed only when numba is
installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import platform
import threading
from importlib import metadata

import lstmeng

#: Distributions reported under "optional libraries", in this order.
OPTIONAL_LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "torch", "numba", "numba-cuda", "matplotlib",
                      "tqdm", "numpy", "scipy", "cython")

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LSTMENG_BACKEND")


# -- CPU ------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which containers often cut below cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count() -> int:
    """The thread count the benchmark gives every library: OMP_NUM_THREADS if set, else the usable cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return usable_cores()


# -- BLAS -----------------------------------------------------------------------------------------------------
class OpenBLAS:
    """One OpenBLAS library loaded in this process (NumPy and SciPy each ship their own).

    The symbol names differ between builds: plain ``openblas_*``, the 64-bit
    integer ``*64_`` builds, and the ``scipy_openblas_*`` builds in NumPy's and
    SciPy's wheels. Found through /proc/self/maps, so only on Linux.
    """

    PREFIXES = ("scipy_openblas_", "openblas_")
    SUFFIXES = ("64_", "")

    def __init__(self, path: str):
        self.path = path
        self._library = ctypes.CDLL(path)
        self._get_threads = self._function("get_num_threads", ctypes.c_int, [])
        self._set_threads = self._function("set_num_threads", None, [ctypes.c_int])
        self._get_config = self._function("get_config", ctypes.c_char_p, [])

    def _function(self, name, restype, argtypes):
        for prefix in self.PREFIXES:
            for suffix in self.SUFFIXES:
                function = getattr(self._library, f"{prefix}{name}{suffix}", None)
                if function is not None:
                    function.restype, function.argtypes = restype, argtypes
                    return function
        return None

    @property
    def usable(self) -> bool:
        return self._get_threads is not None and self._set_threads is not None

    @property
    def threads(self) -> int:
        return int(self._get_threads())

    @threads.setter
    def threads(self, count: int) -> None:
        self._set_threads(int(count))

    @property
    def config(self) -> str:
        return self._get_config().decode(errors="replace").strip() if self._get_config else ""


def loaded_openblas() -> list[OpenBLAS]:
    """Every OpenBLAS loaded in this process that exposes its thread controls."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = []
            for line in maps:
                fields = line.split()
                path = fields[-1] if len(fields) >= 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    libraries = []
    for path in paths:
        try:
            library = OpenBLAS(path)
        except OSError:
            continue
        if library.usable:
            libraries.append(library)
    return libraries


#: Held by a ``blas_threads`` block: the counts are process-wide, so two threads saving and
#: restoring them at once could leave one thread's limit in place (reentrant: blocks nest).
_BLAS_THREADS_LOCK = threading.RLock()


def is_numpy_openblas(library: OpenBLAS) -> bool:
    """Whether ``library`` is the OpenBLAS bundled in NumPy's wheel (``numpy.libs/``)."""
    return os.path.basename(os.path.dirname(library.path)).startswith("numpy")


@contextlib.contextmanager
def blas_threads(count: int | None, numpy_only: bool = False):
    """Run the block with every loaded OpenBLAS limited to ``count`` threads (None: leave as is).

    Loads SciPy's BLAS first so that it is limited too. Restores the previous
    counts afterwards. Blocks in other Python threads wait for this one.
    ``numpy_only`` limits only the OpenBLAS of NumPy's wheel: the cython
    kernels lower SciPy's count from any thread while they run (their own
    reference count), and a block restoring it around them could undo theirs.
    """
    if count is None:
        yield
        return
    import scipy.linalg.blas  # noqa: F401  (loads SciPy's OpenBLAS so that it can be limited too)
    with _BLAS_THREADS_LOCK:
        libraries = [library for library in loaded_openblas()
                     if not numpy_only or is_numpy_openblas(library)]
        previous = [library.threads for library in libraries]
        for library in libraries:
            library.threads = count
        try:
            yield
        finally:
            for library, threads in zip(libraries, previous):
                library.threads = threads


def _blas_build(module_name: str) -> str:
    """``name version`` of the BLAS a module (numpy or scipy) was built against."""
    try:
        module = importlib.import_module(module_name)
        config = module.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception as error:  # older releases have no mode="dicts"
        return f"unknown ({type(error).__name__})"


# -- GPU ------------------------------------------------------------------------------------------------------
def gpu_devices() -> tuple[list[dict], str]:
    """(devices, note): CUDA GPUs as numba sees them, each ``{"name", "memory_gib"}``.

    Without numba nothing is probed (and CUDA is never initialised); under the
    CUDA simulator there is no real device to report.
    """
    if importlib.util.find_spec("numba") is None:
        return [], "not probed: numba is not installed (pip install 'lstmeng[cuda]')"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return [], "not probed: NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator is on)"
    try:
        from numba import cuda
        if not cuda.is_available():
            return [], "none: numba finds no usable CUDA driver or device"
        devices = []
        for device in cuda.list_devices():
            with device:
                free, total = cuda.current_context().get_memory_info()
            name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
            devices.append({"name": name, "memory_gib": round(total / 2**30, 1)})
        return devices, ""
    except Exception as error:
        return [], f"probe failed: {type(error).__name__}: {error}"


def cuda_gemm_path(devices: list[dict]) -> str:
    """Which GEMM the numba_cuda backend uses here (cuBLAS via CuPy or its Numba kernel), and why.

    Asked only where numba_cuda could run (a device, or the simulator): probing
    CuPy creates a cuBLAS handle.
    """
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if importlib.util.find_spec("numba") is None or not (devices or simulator):
        return "not probed: no CUDA device for numba_cuda"
    try:
        from lstmeng.backends import _cuda_gemm
        return _cuda_gemm.gemm_path()
    except Exception as error:
        return f"probe failed: {type(error).__name__}: {error}"


# -- everything -----------------------------------------------------------------------------------------------
def library_versions() -> dict[str, str | None]:
    """Installed version of each optional library (None when absent), from package metadata."""
    versions = {}
    for name in OPTIONAL_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gather() -> dict:
    """Everything ``lstmeng info`` prints, as a JSON-friendly dict."""
    import scipy.linalg.blas  # noqa: F401  (so that SciPy's OpenBLAS shows up below)

    devices, gpu_note = gpu_devices()
    return {
        "lstmeng": lstmeng.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores()},
        "gpu": {"devices": devices, "note": gpu_note, "gemm": cuda_gemm_path(devices)},
        "backends": [{"name": row.name, "available": row.available, "reason": row.reason, "device": row.device}
                     for row in lstmeng.list_backends()],
        "default_backend": lstmeng.get_backend(),
        "blas": {
            "numpy": _blas_build("numpy"),
            "scipy": _blas_build("scipy"),
            "openblas_runtime": [{"library": os.path.basename(library.path), "threads": library.threads,
                                  "config": library.config} for library in loaded_openblas()],
        },
        "threads": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "libraries": library_versions(),
    }


def render(info: dict) -> str:
    """The text ``lstmeng info`` prints."""
    lines = [f"lstmeng {info['lstmeng']}  (Python {info['python']}, {info['platform']})", ""]
    cpu = info["cpu"]
    lines.append(f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores ({cpu['usable_cores']} usable)")
    gpu = info["gpu"]
    if gpu["devices"]:
        for index, device in enumerate(gpu["devices"]):
            lines.append(f"GPU {index}: {device['name']}, {device['memory_gib']} GiB")
    else:
        lines.append(f"GPU: {gpu['note']}")
    lines.append(f"CUDA GEMM: {gpu['gemm']}")
    lines += ["", f"Backends (default: {info['default_backend']}):"]
    width = max(len(row["name"]) for row in info["backends"])
    for row in info["backends"]:
        state = f"available    {row['device']}" if row["available"] else f"unavailable  {row['reason']}"
        lines.append(f"  {row['name']:<{width}}  {state}")
    blas = info["blas"]
    lines += ["", "BLAS:", f"  numpy built with {blas['numpy']}", f"  scipy built with {blas['scipy']}"]
    for library in blas["openblas_runtime"]:
        lines.append(f"  {library['library']}: {library['threads']} threads  {library['config']}")
    lines += ["", "Thread settings:"]
    lines += [f"  {name}={value if value is not None else '(unset)'}" for name, value in info["threads"].items()]
    lines += ["", "Libraries:"]
    lines += [f"  {name:<15} {version if version else 'not installed'}"
              for name, version in info["libraries"].items()]
    return "\n".join(lines)
