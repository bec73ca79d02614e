"""Backend registry: listing, choosing by name, plugins through entry points, auto choice."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings
from importlib import metadata

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.backends import registry

BUILTIN = ["numpy", "cython", "numba_cuda", "tensorflow"]


@pytest.fixture
def clean_default(monkeypatch):
    """No process default and no LSTMENG_BACKEND, restored afterwards."""
    monkeypatch.setattr(registry, "_process_default", [None])
    monkeypatch.delenv(registry.ENVIRONMENT_VARIABLE, raising=False)


@pytest.fixture
def plugins(monkeypatch, tmp_path):
    """Install fake entry points: ``plugins({"name": "module:attribute"}, modules={"module": source})``."""

    def install(entry_points, modules=None):
        for module, source in (modules or {}).items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        fake = [metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)
                for name, value in entry_points.items()]

        def entry_points_of(group=None, **_):
            return [ep for ep in fake if group in (None, ep.group)]

        monkeypatch.setattr(registry.metadata, "entry_points", entry_points_of)
        registry.refresh()

    yield install
    monkeypatch.undo()
    registry.refresh()


# -- listing ---------------------------------------------------------------------------
def test_list_backends_rows():
    rows = le.list_backends()
    assert [row.name for row in rows][:4] == BUILTIN
    for row in rows:
        assert isinstance(row, le.BackendInfo)
        assert isinstance(row.available, bool) and isinstance(row.reason, str) and isinstance(row.device, str)
        if row.available:
            assert row.reason == "" and row.device
        else:
            assert row.reason and row.device == ""
    numpy_row = rows[0]
    assert numpy_row.available and "NumPy" in numpy_row.device


# -- choosing by name ----------------------------------------------------------------------
def test_set_get_backend(clean_default):
    assert le.get_backend() == "auto"
    le.set_backend("numpy")
    assert le.get_backend() == "numpy"
    assert registry.resolve("auto", np.zeros(1), np.dtype("float32"), "tanh", "sigmoid").name == "numpy"
    le.set_backend("auto")
    assert le.get_backend() == "auto"


def test_environment_variable(clean_default, monkeypatch):
    monkeypatch.setenv("LSTMENG_BACKEND", "numpy")
    assert le.get_backend() == "numpy"
    lstm = le.LSTM(2, seed=0)
    lstm(np.ones((1, 2, 3)), training=True)
    assert lstm._tapes.last.backend.name == "numpy"
    le.set_backend("auto")  # set_backend wins over the environment
    assert le.get_backend() == "auto"
    monkeypatch.setattr(registry, "_process_default", [None])
    monkeypatch.setenv("LSTMENG_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match=r"unknown backend 'no_such_backend'.*available backends: \[.*'numpy'"):
        le.LSTM(2)(np.ones((1, 2, 3)))


def test_use_backend_scopes_nest_and_restore(clean_default):
    le.set_backend("numpy")
    with le.use_backend("auto"):
        assert le.get_backend() == "auto"
        with le.use_backend("numpy"):
            assert le.get_backend() == "numpy"
        assert le.get_backend() == "auto"
        with pytest.raises(RuntimeError):
            with le.use_backend("numpy"):
                raise RuntimeError("leaves the scope")
        assert le.get_backend() == "auto"
    assert le.get_backend() == "numpy"


def test_use_backend_is_per_thread(clean_default):
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = le.get_backend()
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with le.use_backend("numpy"):
        inside.set()
        release.wait(10)
        seen["here"] = le.get_backend()
    thread.join()
    assert seen == {"other": "auto", "here": "numpy"}


@pytest.mark.parametrize("chooser", [le.set_backend, lambda name: le.use_backend(name).__enter__(),
                                     lambda name: le.LSTM(2, backend=name)], ids=["set", "use", "LSTM"])
def test_unknown_backend_lists_available(chooser, clean_default):
    available = [row.name for row in le.list_backends() if row.available]
    with pytest.raises(ValueError) as info:
        chooser("no_such_backend")
    message = str(info.value)
    assert "'no_such_backend'" in message
    assert f"available backends: {available}" in message
    for row in le.list_backends():
        if not row.available:
            assert f"{row.name}: {row.reason}" in message
    assert le.get_backend() == "auto"


# -- plugins ---------------------------------------------------------------------------
def test_plugin_that_fails_to_import_is_unavailable_with_reason(plugins):
    plugins({"broken": "lstmeng_test_no_such_module:backend"})
    with pytest.warns(UserWarning, match="plugin 'broken' is unavailable.*ModuleNotFoundError"):
        rows = {row.name: row for row in le.list_backends()}
    assert not rows["broken"].available
    assert "ModuleNotFoundError" in rows["broken"].reason and "lstmeng_test_no_such_module" in rows["broken"].reason
    assert rows["numpy"].available
    with pytest.raises(ValueError, match=r"backend 'broken' is unavailable \(ModuleNotFoundError.*available backends"):
        le.LSTM(2, backend="broken")
    # Still usable: the other backends work.
    assert le.LSTM(2, backend="numpy", seed=0)(np.ones((1, 2, 3))).shape == (1, 2)


def test_plugin_raising_at_import_or_probe_or_of_wrong_type(plugins):
    plugins({"raises": "lstmeng_test_raises:backend", "noprobe": "lstmeng_test_noprobe:backend",
             "wrongtype": "lstmeng_test_wrongtype:backend"},
            modules={
                "lstmeng_test_raises": "raise RuntimeError('driver exploded')\n",
                "lstmeng_test_noprobe": """
                    from lstmeng.backends.numpy import NumpyBackend
                    class NoDevice(NumpyBackend):
                        name = "noprobe"
                        def probe(self):
                            raise NotImplementedError("needs a device this machine lacks")
                    backend = NoDevice()
                """,
                "lstmeng_test_wrongtype": "backend = object()\n",
            })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = {row.name: row for row in le.list_backends()}
    assert len([w for w in caught if "plugin" in str(w.message)]) == 3
    assert rows["raises"].reason == "RuntimeError: driver exploded"
    assert rows["noprobe"].reason == "needs a device this machine lacks"
    assert "is not an lstmeng.backends.KernelBackend" in rows["wrongtype"].reason
    assert not any(rows[name].available for name in ("raises", "noprobe", "wrongtype"))


def test_working_plugin_is_listed_usable_and_conformant(plugins):
    plugins({"myplugin": "lstmeng_test_plugin:PluginBackend"},  # a class: the registry instantiates it
            modules={"lstmeng_test_plugin": """
                from lstmeng.backends.numpy import NumpyBackend
                class PluginBackend(NumpyBackend):
                    name = "myplugin"
                    dtypes = ("float64",)
                    def probe(self):
                        return "CPU: test plugin"
            """})
    rows = {row.name: row for row in le.list_backends()}
    assert rows["myplugin"].available and rows["myplugin"].device == "CPU: test plugin"
    assert [row.name for row in le.list_backends()][:4] == BUILTIN
    lstm = le.LSTM(3, dtype="float64", backend="myplugin", seed=0)
    lstm(np.ones((2, 4, 3)), training=True)
    assert lstm._tapes.last.backend.name == "myplugin"
    with pytest.raises(ValueError, match="backend 'myplugin' cannot run this layer.*float64.*not float32"):
        le.LSTM(3, backend="myplugin")(np.ones((2, 4, 3)))
    with le.use_backend("myplugin"):
        assert le.get_backend() == "myplugin"
    case = testing.conformance_cases(dtypes=("float64",), cases_per_dtype=1)[0]
    testing.check_case("myplugin", case)


def test_unreadable_entry_points_warn_and_leave_builtins(monkeypatch):
    def broken(**_):
        raise RuntimeError("corrupt METADATA")

    monkeypatch.setattr(registry.metadata, "entry_points", broken)
    registry.refresh()
    try:
        with pytest.warns(UserWarning, match="could not read entry points.*corrupt METADATA"):
            names = [row.name for row in le.list_backends()]
        assert names == BUILTIN
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_plugin_cannot_shadow_a_builtin(plugins):
    plugins({"numpy": "lstmeng_test_no_such_module:backend"})
    rows = le.list_backends()
    assert [row.name for row in rows] == BUILTIN
    assert rows[0].available


# -- automatic choice ------------------------------------------------------------------------
class _FakeTensor:
    pass


_FakeTensor.__module__ = "tensorflow.python.framework.ops"


class _FakeCudaArray:
    __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_array_kind_without_importing_libraries():
    assert registry.array_kind(np.zeros(2)) == "host"
    assert registry.array_kind([1.0]) == "host"
    assert registry.array_kind(_FakeTensor()) == "tensorflow"
    assert registry.array_kind(_FakeCudaArray()) == "cuda"


def test_auto_picks_fastest_available_host_backend(clean_default):
    rows = {row.name: row for row in le.list_backends()}
    expected = "cython" if rows["cython"].available else "numpy"
    chosen = registry.resolve("auto", np.zeros(1), np.dtype("float32"), "tanh", "sigmoid")
    assert chosen.name == expected


def test_resolve_remembers_answers_per_default_and_forgets_them_on_refresh(clean_default, monkeypatch):
    """resolve() keeps its answers keyed by the name in force, so a changed default or a
    use_backend block is seen at once; refresh() forgets them, so a backend whose support
    changed (a new plugin, a driver) is asked again; a refused configuration is refused
    every time."""
    host = np.zeros(1)
    automatic = registry.resolve("auto", host, np.dtype("float32"), "tanh", "sigmoid")
    assert registry.resolve("auto", host, np.dtype("float32"), "tanh", "sigmoid") is automatic
    with le.use_backend("numpy"):
        assert registry.resolve("auto", host, np.dtype("float32"), "tanh", "sigmoid").name == "numpy"
    assert registry.resolve("auto", host, np.dtype("float32"), "tanh", "sigmoid") is automatic
    numpy_backend = registry.get_backend_object("numpy")
    refusals = []

    def refuse(dtype, activation, recurrent_activation):
        refusals.append(activation)
        raise NotImplementedError("refused for this test")

    monkeypatch.setattr(numpy_backend, "check_support", refuse)
    assert registry.resolve("numpy", host, np.dtype("float32"), "tanh", "sigmoid") is numpy_backend   # remembered
    registry.refresh()
    for _ in range(2):
        with pytest.raises(ValueError, match="refused for this test"):
            registry.resolve("numpy", host, np.dtype("float32"), "tanh", "sigmoid")
    assert len(refusals) == 2
    monkeypatch.undo()
    registry.refresh()


@pytest.mark.slow  # a fresh interpreter; in an editable install its import also checks the build
def test_import_lstmeng_imports_neither_tensorflow_nor_numba():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import lstmeng as le
        model = le.Sequential([le.Bidirectional(le.LSTM(3, return_sequences=True, seed=0)), le.LSTM(2, seed=1)])
        y = model(np.ones((2, 4, 3), "float32"), lengths=[4, 2], training=True)
        model.backward(np.ones_like(y))
        heavy = sorted(name for name in sys.modules
                       if name.split(".")[0] in ("tensorflow", "numba", "keras", "torch"))
        print(heavy)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "LSTMENG_BACKEND": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# -- cheap probing (issue 18: list_backends took 6.8 s importing TensorFlow and numba) -------------------
@pytest.mark.slow  # a fresh interpreter, so that nothing is imported or cached yet
def test_list_backends_imports_no_heavy_library_until_asked():
    script = textwrap.dedent("""
        import json, sys, time
        import lstmeng as le
        from lstmeng.backends import registry
        start = time.perf_counter()
        rows = le.list_backends()
        seconds = time.perf_counter() - start
        heavy = sorted({name.split(".")[0] for name in sys.modules
                        if name.split(".")[0] in ("tensorflow", "numba", "keras", "torch")})
        print(json.dumps({"rows": [[r.name, r.available, r.probed, r.reason] for r in rows], "heavy": heavy,
                          "seconds": seconds, "driver_reason": registry._cuda_driver_reason()}))
        probed = le.list_backends(probe=True)
        print(json.dumps([[r.name, r.available, r.probed] for r in probed]))
    """)
    env = {key: value for key, value in __import__("os").environ.items()
           if key not in ("NUMBA_ENABLE_CUDASIM", "NUMBA_CUDA_DRIVER")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**env, "LSTMENG_BACKEND": ""})
    assert result.returncode == 0, result.stderr
    import json
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    rows = {name: (available, probed, reason) for name, available, probed, reason in first["rows"]}
    assert "tensorflow" not in first["heavy"] and "keras" not in first["heavy"]
    if first["driver_reason"] is not None:   # no NVIDIA driver here: numba is not imported to find that out
        assert "numba" not in first["heavy"]
        assert rows["numba_cuda"][:2] == (False, True) and "no NVIDIA driver" in rows["numba_cuda"][2]
    tensorflow_installed = __import__("importlib").util.find_spec("tensorflow") is not None
    assert rows["tensorflow"][:2] == ((True, False) if tensorflow_installed else (False, True))
    assert all(probed for _, _, probed in second)   # probe=True: every backend imported and checked


def test_cuda_driver_check_without_numba(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.delenv("NUMBA_CUDA_DRIVER", raising=False)
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(registry.ctypes, "CDLL", no_library)
    monkeypatch.setattr(registry.sys, "platform", "linux")
    assert registry._cuda_driver_reason() == ("no NVIDIA driver (none of libcuda.so.1, libcuda.so can be loaded; "
                                              "NUMBA_ENABLE_CUDASIM=1 runs the simulator)")
    monkeypatch.setattr(registry.sys, "platform", "darwin")
    assert "no CUDA on darwin" in registry._cuda_driver_reason()
    monkeypatch.setattr(registry.ctypes, "CDLL", lambda name: object())   # a driver library loads: probe it
    monkeypatch.setattr(registry.sys, "platform", "linux")
    assert registry._cuda_driver_reason() is None
    monkeypatch.setattr(registry.ctypes, "CDLL", no_library)
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")          # the simulator needs no driver
    assert registry._cuda_driver_reason() is None
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setenv("NUMBA_CUDA_DRIVER", "/opt/driver/libcuda.so")   # numba's own override: numba decides
    assert registry._cuda_driver_reason() is None


def test_deferred_backend_row_until_used(monkeypatch):
    """A deferred backend is listed as installed and unprobed, then from its probe once it was used."""
    monkeypatch.setattr(registry, "DEFERRED_PROBES", frozenset({"numpy"}))
    registry.refresh()
    try:
        row = next(row for row in le.list_backends() if row.name == "numpy")
        assert (row.available, row.probed, row.reason) == (True, False, "")
        assert row.device.startswith("not probed yet: numpy") and "probe=True" in row.device
        registry.get_backend_object("numpy")   # first use: imported and probed
        row = next(row for row in le.list_backends() if row.name == "numpy")
        assert row.probed and "NumPy" in row.device
        registry.refresh()
        assert next(row for row in le.list_backends(probe=True) if row.name == "numpy").probed
    finally:
        monkeypatch.undo()
        registry.refresh()
