"""Dump the API of the real TensorRT Python bindings as JSON (run in a subprocess).

    python introspect_trt.py STUB_DIR BINDINGS_DIR MAJOR OUT.json

``STUB_DIR`` holds stub ``libnvinfer.so.MAJOR``, ``libnvinfer_plugin.so.MAJOR`` and
``libnvonnxparser.so.MAJOR`` (see ``tensorrt_api.py``): loaded first with RTLD_GLOBAL, they
satisfy the bindings' DT_NEEDED entries by soname, so ``import tensorrt_bindings`` succeeds
without NVIDIA's native libraries. Nothing native is called: only names, pybind11 signatures
(the first lines of ``__doc__``), property setters and enum members are read.

A subprocess per version, because two pybind11 modules registering the same C++ types cannot
share one interpreter.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import sys


def signatures(obj) -> list[str]:
    """pybind11 signature lines of a function's ``__doc__`` (one per overload)."""
    doc = getattr(obj, "__doc__", None) or ""
    lines = [line.strip() for line in doc.splitlines()]
    name = getattr(obj, "__name__", "")
    if "Overloaded function." in doc:
        return [line.split(". ", 1)[1] for line in lines
                if line[:1].isdigit() and ". " in line and f"{name}(" in line]
    for line in lines:
        if line.startswith(f"{name}("):
            return [line]
    return []


def python_signature(fn) -> list[str]:
    """A pure-Python function's signature in pybind11's form (annotations are not types)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = [p.name + ("=..." if p.default is not p.empty else "")
              for p in sig.parameters.values()]
    return [f"{fn.__name__}({', '.join(params)})"]


def is_enum(obj) -> bool:
    return isinstance(obj, type) and hasattr(obj, "__members__")


def describe_class(cls, qual: str, module, out: dict) -> None:
    entry = {"bases": [b.__qualname__ for b in cls.__bases__
                       if getattr(b, "__module__", "").startswith("tensorrt")],
             "init": [], "methods": {}, "static": {}, "properties": {}, "attrs": {}}
    for name, value in vars(cls).items():
        kind = type(value).__name__
        if name == "__init__":
            entry["init"] = signatures(value)
        elif is_enum(value):
            out["enums"][value.__qualname__] = {k: int(v) for k, v in value.__members__.items()}
            out["aliases"][f"{qual}.{name}"] = value.__qualname__
        elif isinstance(value, property):
            entry["properties"][name] = {"settable": value.fset is not None,
                                         "get": signatures_of_accessor(value.fget),
                                         "set": signatures_of_accessor(value.fset)}
        elif kind == "instancemethod" or (callable(value) and kind == "builtin_function_or_method"):
            entry["methods"][name] = signatures(value)
        elif isinstance(value, staticmethod):
            entry["static"][name] = signatures(value.__func__)
        elif kind == "function":  # added in Python by the package's __init__
            entry["methods"][name] = python_signature(value)
        elif is_enum(type(value)):
            entry["attrs"][name] = f"{type(value).__qualname__}.{value.name}"
    out["classes"][qual] = entry


def signatures_of_accessor(fn) -> list[str]:
    if fn is None:
        return []
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    return [doc[0]] if doc and doc[0].startswith("(") else []


def main() -> None:
    stub_dir, bindings_dir, major, out_path = sys.argv[1:5]
    for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
        ctypes.CDLL(f"{stub_dir}/lib{lib}.so.{major}", mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, bindings_dir)
    import tensorrt_bindings as trt

    # enums are keyed by their __qualname__ ("ILogger.Severity"); every other name that
    # refers to one ("Logger.Severity", set by the package's __init__) is an alias
    out: dict = {"version": trt.__version__, "functions": {}, "classes": {}, "enums": {},
                 "aliases": {}}
    names = sorted(n for n in dir(trt) if not n.startswith("_"))
    for name in names:
        obj = getattr(trt, name)
        if is_enum(obj):
            out["enums"][obj.__qualname__] = {k: int(v) for k, v in obj.__members__.items()}
            if obj.__qualname__ != name:
                out["aliases"][name] = obj.__qualname__
        elif isinstance(obj, type):
            if getattr(obj, "__module__", "").startswith("tensorrt"):
                describe_class(obj, name, trt, out)
        elif type(obj).__name__ == "builtin_function_or_method":
            out["functions"][name] = signatures(obj)
        elif inspect.isfunction(obj):
            out["functions"][name] = python_signature(obj)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
