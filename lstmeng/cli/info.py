"""`lstmeng info`: what this machine offers lstmeng. It only reports: thread counts are read and set
in ``lstmeng._runtime.threads``.

Everything here is read without side effects: optional libraries are found by
their distribution metadata (importing TensorFlow to read its version would
take seconds and print warnings), and CUDA is probed only when numba is
installed.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from importlib import metadata

import lstmeng
from lstmeng._runtime import threads

#: Distributions reported under "optional libraries", in this order.
OPTIONAL_LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "torch", "numba", "numba-cuda", "matplotlib",
                      "tqdm", "numpy", "scipy", "cython")

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LSTMENG_BACKEND")


# -- BLAS -----------------------------------------------------------------------------------------------------
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
        "cpu": {"model": threads.cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": threads.usable_cores(),
                "cpu_quota": threads.cpu_quota(), "kernel_threads": threads.thread_count()},
        "gpu": {"devices": devices, "note": gpu_note, "gemm": cuda_gemm_path(devices)},
        "backends": [{"name": row.name, "available": row.available, "reason": row.reason, "device": row.device}
                     for row in lstmeng.list_backends(probe=True)],
        "default_backend": lstmeng.get_backend(),
        "blas": {
            "numpy": _blas_build("numpy"),
            "scipy": _blas_build("scipy"),
            # Every BLAS and OpenMP runtime loaded, as threadpoolctl sees (and would set) them.
            "runtime": [{"library": os.path.basename(entry["filepath"]), "api": entry["internal_api"],
                         "version": entry.get("version"), "threads": entry["num_threads"],
                         "threading_layer": entry.get("threading_layer")} for entry in threads.blas_report()],
        },
        "threads": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "libraries": library_versions(),
    }


def render(info: dict) -> str:
    """The text ``lstmeng info`` prints."""
    lines = [f"lstmeng {info['lstmeng']}  (Python {info['python']}, {info['platform']})", ""]
    cpu = info["cpu"]
    quota = f", CPU quota {cpu['cpu_quota']:g}" if cpu["cpu_quota"] is not None else ""
    lines.append(f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores ({cpu['usable_cores']} usable{quota}); "
                 f"lstmeng's kernels use {cpu['kernel_threads']} threads")
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
    lines += ["", "BLAS and OpenMP:", f"  numpy built with {blas['numpy']}", f"  scipy built with {blas['scipy']}"]
    if not blas["runtime"]:
        lines.append("  threadpoolctl finds no BLAS or OpenMP runtime it can control: "
                     "the cython kernels run one thread")
    for library in blas["runtime"]:
        layer = f", {library['threading_layer']}" if library["threading_layer"] else ""
        version = f" {library['version']}" if library["version"] else ""
        lines.append(f"  {library['library']}: {library['api']}{version}, {library['threads']} threads{layer}")
    lines += ["", "Thread settings:"]
    lines += [f"  {name}={value if value is not None else '(unset)'}" for name, value in info["threads"].items()]
    lines += ["", "Libraries:"]
    lines += [f"  {name:<15} {version if version else 'not installed'}"
              for name, version in info["libraries"].items()]
    return "\n".join(lines)
