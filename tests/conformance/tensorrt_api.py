"""Strict fake ``tensorrt`` modules generated from the real TensorRT Python bindings.

:func:`real_api` gets one version's API as data: it ``pip download``s the real
``tensorrt-cuNN-bindings`` wheel (about 1.3 MB, cached in ``~/.cache/alexnet-deploy/``),
compiles stub ``libnvinfer``/``libnvinfer_plugin``/``libnvonnxparser`` libraries with gcc that
export the nine C symbols the bindings import (``nm -D``: the ``create*_INTERNAL`` factories,
``getPluginRegistry`` ...; every one returns NULL), and runs ``introspect_trt.py`` in a
subprocess, which imports the real bindings against the stubs and dumps every class, method
signature (pybind11's ``__doc__``), property (with or without a setter), enum and member.

:func:`make_fake` turns that into a module that behaves like the bindings at their surface:

* enums are distinct types: ``TensorIOMode.INPUT == 1`` is False, a ``MemoryPoolType`` where a
  ``BuilderFlag`` is expected is a TypeError, members exist only where the version has them;
* every call is checked against the real overloads: argument count, names and types
  (pybind11's rules: ``int`` rejects ``float``, an enum parameter takes only that enum, a class
  parameter only that class or a subclass, ``Dims`` also takes a list or tuple of ints);
* properties without a setter refuse assignment; unknown attributes cannot be set (no
  ``py::dynamic_attr``); classes without a constructor cannot be instantiated;
* what a call *does* comes from a ``behaviours`` mapping (``"Class.method" -> fn(self, **args)``)
  that the tests supply; a call the tests did not simulate raises NotImplementedError, never
  passes silently.

When no package index is reachable, or gcc is missing, the callers skip with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
VERSIONS = {"10.16.1.11": "tensorrt-cu12-bindings", "11.4.0.106": "tensorrt-cu13-bindings"}
# the C symbols tensorrt_bindings/tensorrt.so imports from NVIDIA's libraries (nm -D, both
# versions); each stub returns NULL / 0
SYMBOLS = {
    "createInferBuilder_INTERNAL": "void *%s(void *a, int b) { return 0; }",
    "createInferRefitter_INTERNAL": "void *%s(void *a, void *b, int c) { return 0; }",
    "createInferRuntime_INTERNAL": "void *%s(void *a, int b) { return 0; }",
    "createNvOnnxParserRefitter_INTERNAL": "void *%s(void *a, void *b, int c) { return 0; }",
    "createNvOnnxParser_INTERNAL": "void *%s(void *a, void *b, int c) { return 0; }",
    "getBuilderPluginRegistry": "void *%s(int a) { return 0; }",
    "getNvOnnxParserVersion": "int %s(void) { return 0; }",
    "getPluginRegistry": "void *%s(void) { return 0; }",
    "initLibNvInferPlugins": "int %s(void *a, const char *b) { return 0; }",
}
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
PREFIX = "tensorrt_bindings.tensorrt."


class Unavailable(Exception):
    """The real API cannot be fetched here (no index, no gcc): the tests skip with this."""


def cache_dir() -> Path:
    base = os.environ.get("ALEXNET_DEPLOY_CACHE") or Path.home() / ".cache" / "alexnet-deploy"
    path = Path(base) / "tensorrt-conformance" / f"py{sys.version_info[0]}{sys.version_info[1]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel(version: str) -> Path:
    """The bindings wheel for ``version`` and this Python, downloaded once into the cache."""
    dest = cache_dir() / "wheels"
    package = VERSIONS[version]
    stem = package.replace("-", "_") + f"-{version}-"
    found = [p for p in dest.glob("*.whl") if p.name.startswith(stem)] if dest.exists() else []
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"pip download {package}=={version} failed ({e})") from e
    found = [p for p in dest.glob("*.whl") if p.name.startswith(stem)]
    if run.returncode != 0 or not found:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"no package index reachable for {package}=={version} "
                          f"(pip download: {tail[0]})")
    return found[0]


def _unpacked(version: str) -> Path:
    wheel = _wheel(version)
    dest = cache_dir() / f"bindings-{version}"
    if not (dest / "tensorrt_bindings" / "tensorrt.so").exists():
        tmp = dest.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def imported_symbols(bindings: Path) -> set[str]:
    """The undefined symbols of the bindings' extension that NVIDIA's libraries provide."""
    nm = shutil.which("nm")
    if nm is None:
        raise Unavailable("no nm (binutils) to list the symbols the bindings import")
    out = subprocess.run([nm, "-D", "--undefined-only", str(bindings / "tensorrt_bindings" /
                                                            "tensorrt.so")],
                         capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return {n for n in names if "@" not in n and ("INTERNAL" in n or n.startswith(
        ("getBuilder", "getNvOnnx", "getPlugin", "initLibNvInfer")))}


def _stubs(major: int) -> Path:
    """Stub ``lib{nvinfer,nvinfer_plugin,nvonnxparser}.so.MAJOR`` (soname set, so a loaded
    stub satisfies the bindings' DT_NEEDED entry), compiled once into the cache."""
    dest = cache_dir() / f"stubs-{major}"
    if all((dest / f"lib{lib}.so.{major}").exists() for lib in LIBRARIES):
        return dest
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise Unavailable("no C compiler (gcc) to build the stub TensorRT libraries")
    dest.mkdir(parents=True, exist_ok=True)
    source = dest / "stub.c"
    source.write_text("\n".join(body % name for name, body in SYMBOLS.items()) + "\n")
    for lib in LIBRARIES:
        target = dest / f"lib{lib}.so.{major}"
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(target) + ".tmp",
                        f"-Wl,-soname,lib{lib}.so.{major}", str(source)], check=True,
                       capture_output=True)
        os.replace(str(target) + ".tmp", target)
    return dest


@functools.cache
def real_api(version: str) -> dict:
    """The API of the real bindings ``version`` as data (see ``introspect_trt.py``); once per
    test session. Raises :class:`Unavailable` when it cannot be fetched here."""
    bindings = _unpacked(version)
    missing = imported_symbols(bindings) - set(SYMBOLS)
    if missing:  # a new release imports more: the stubs must export it too
        raise AssertionError(f"TensorRT {version} imports symbols the stubs lack: {missing}")
    major = int(version.split(".")[0])
    stubs = _stubs(major)
    out = cache_dir() / f"api-{version}.json.tmp"
    run = subprocess.run([sys.executable, str(HERE / "introspect_trt.py"), str(stubs),
                          str(bindings), str(major), str(out)],
                         capture_output=True, text=True, timeout=120, check=False)
    if run.returncode != 0:
        raise AssertionError(f"importing the real TensorRT {version} bindings against the "
                             f"stubs failed:\n{run.stderr[-2000:]}")
    api = json.loads(out.read_text())
    out.unlink()
    return api


def run_with_real_bindings(version: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a subprocess where ``import tensorrt`` is the real bindings over the
    stubs (nothing native works: every factory returns NULL)."""
    bindings = _unpacked(version)
    major = int(version.split(".")[0])
    stubs = _stubs(major)
    prelude = (
        "import ctypes, sys\n"
        f"for lib in {LIBRARIES!r}:\n"
        f"    ctypes.CDLL('{stubs}/lib' + lib + '.so.{major}', mode=ctypes.RTLD_GLOBAL)\n"
        f"sys.path.insert(0, {str(bindings)!r})\n"
        "import tensorrt_bindings\n"
        "sys.modules['tensorrt'] = tensorrt_bindings\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=120, check=False)


# ---- signatures ----

def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets (``[]``, ``()``, ``<>``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def parse_signature(sig: str, drop_self: bool) -> list[tuple[str, str | None, bool]]:
    """``[(name, type or None, has_default)]`` of a pybind11 (or Python) signature line."""
    inner = sig[sig.index("(") + 1:]
    depth, end = 1, 0
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    params = []
    for part in split_top(inner[:end]):
        if part == "/" or part.startswith("*"):
            continue
        default = "=" in part
        head = split_top(part, "=")[0] if default else part
        name, _, annotation = head.partition(":")
        params.append((name.strip(), annotation.strip() or None, default))
    return params[1:] if drop_self and params else params


def _short(type_name: str) -> str:
    return type_name.replace(PREFIX, "").strip()


# ---- the fake ----

class FakeEnumBase:
    """Base of generated enums: distinct types, members compare equal only to themselves."""

    __members__: dict = {}  # noqa: RUF012 - replaced per generated enum
    _qual = ""

    def __new__(cls, value: int) -> FakeEnumBase:  # noqa: PYI034 - lookup, as pybind11 enums
        for member in cls.__members__.values():
            if member.value == int(value):
                return member
        raise ValueError(f"{value} is not a valid {cls._qual}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value

    def __hash__(self) -> int:
        return hash((self._qual, self.value))

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __repr__(self) -> str:
        return f"<{self._qual.rsplit('.', 1)[-1]}.{self.name}: {self.value}>"

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"enum member {self!r} is read-only")
        object.__setattr__(self, name, value)


def _make_enum(qual: str, members: dict[str, int]) -> type:
    cls = type(qual.rsplit(".", 1)[-1], (FakeEnumBase,), {"_qual": qual})
    table = {}
    for name, value in members.items():
        member = object.__new__(cls)
        member.name, member.value = name, value
        member._frozen = True
        table[name] = member
        setattr(cls, name, member)
    cls.__members__ = table
    return cls


class FakeObject:
    """Base of generated classes: no dynamic attributes (pybind11 classes have none)."""

    _qual = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")


def make_fake(api: dict, behaviours: dict[str, Callable] | None = None) -> types.ModuleType:
    """A ``tensorrt`` module with the real ``api``'s surface and the given ``behaviours``.

    Args:
        api: what :func:`real_api` returns (possibly edited, for the self-test).
        behaviours: ``"Class.member"`` (or a module function's name) -> ``fn(self, **args)``
            for methods, ``fn(self)`` for property getters; ``"Class.__init__"`` too.
    """
    behaviours = dict(behaviours or {})
    module = types.ModuleType("tensorrt")
    module.__version__ = api["version"]
    enums = {qual: _make_enum(qual, members) for qual, members in api["enums"].items()}
    for alias, target in api.get("aliases", {}).items():
        enums.setdefault(alias, enums[target])
    classes: dict[str, type] = {}

    def resolve(type_name: str) -> Any:
        name = _short(type_name)
        return enums.get(name) or classes.get(name)

    def accepts(type_name: str | None, value: Any) -> bool:
        if type_name is None:
            return True
        t = _short(type_name)
        if t.startswith("typing.Optional["):
            return value is None or accepts(t[16:-1], value)
        if " | " in t:
            return any(accepts(part, value) for part in split_top(t, "|"))
        if t in ("typing.SupportsInt", "int"):
            return isinstance(value, (int, np.integer, FakeEnumBase))
        if t in ("typing.SupportsFloat", "float"):
            return isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, FakeEnumBase)
        if t == "bool":
            return isinstance(value, (bool, np.bool_, int)) and not isinstance(value,
                                                                                FakeEnumBase)
        if t == "str":
            return isinstance(value, str)
        if t in ("typing_extensions.Buffer", "buffer", "bytes"):
            if "IHostMemory" in classes and isinstance(value, classes["IHostMemory"]):
                return True  # the real IHostMemory is a buffer
            try:
                memoryview(value)
            except TypeError:
                return False
            return True
        m = re.fullmatch(r"(?:collections\.abc\.Sequence|list|typing\.List)\[(.*)\]", t)
        if m:
            return isinstance(value, (list, tuple)) and all(accepts(m.group(1), v)
                                                            for v in value)
        if t in ("list", "tuple", "slice"):
            return isinstance(value, {"list": list, "tuple": tuple, "slice": slice}[t])
        target = resolve(t)
        if target is None:
            return True  # a type the fake does not model (capsules, C++ types): not checked
        if isinstance(target, type) and issubclass(target, FakeEnumBase):
            return isinstance(value, target)
        if isinstance(value, target):
            return True
        if t.startswith("Dims"):  # py::implicitly_convertible<list/tuple, Dims>
            return isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, np.integer)) for v in value)
        return False

    def bind(qual: str, signatures: list[str], args: tuple, kwargs: dict, drop_self: bool,
             ) -> dict[str, Any]:
        problems = []
        for sig in signatures:
            params = parse_signature(sig, drop_self)
            bound, ok = {}, True
            if len(args) > len(params):
                problems.append(sig)
                continue
            for (name, _, _), value in zip(params, args):
                bound[name] = value
            for name, value in kwargs.items():
                if name in bound or name not in [p[0] for p in params]:
                    ok = False
                bound[name] = value
            if ok and all(p[0] in bound or p[2] for p in params) and all(
                    accepts(t, bound[n]) for n, t, _ in params if n in bound):
                return bound
            problems.append(sig)
        shown = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise TypeError(f"{qual}(): incompatible function arguments. The following argument "
                        "types are supported:\n" + "\n".join(f"    {i + 1}. {s}" for i, s in
                                                             enumerate(problems))
                        + f"\n\nInvoked with: {shown}")

    def behaviour(cls: type, member: str) -> Callable | None:
        for klass in cls.__mro__:
            fn = behaviours.get(f"{getattr(klass, '_qual', '')}.{member}")
            if fn is not None:
                return fn
        return None

    def method(qual: str, name: str, signatures: list[str], python_level: bool) -> Callable:
        def call(self, *args, **kwargs):
            bound = bind(f"{qual}.{name}", signatures, args, kwargs, drop_self=True) \
                if not python_level else dict(enumerate(args), **kwargs)
            fn = behaviour(type(self), name)
            if fn is None:
                raise NotImplementedError(f"the conformance fake does not simulate "
                                          f"{qual}.{name}")
            return fn(self, **{str(k): v for k, v in bound.items()})
        call.__name__ = name
        return call

    def init(qual: str, signatures: list[str]) -> Callable:
        def __init__(self, *args, **kwargs):
            if not signatures:
                raise TypeError(f"tensorrt.{qual}: No constructor defined!")
            bound = bind(f"{qual}.__init__", signatures, args, kwargs, drop_self=True)
            object.__setattr__(self, "_state", dict(bound))
            fn = behaviour(type(self), "__init__")
            if fn is not None:
                fn(self, **bound)
        return __init__

    def prop(qual: str, name: str, info: dict) -> property:
        def get(self):
            fn = behaviour(type(self), name)
            if fn is not None:
                return fn(self)
            state = self.__dict__.get("_state", {})
            if name in state:
                return state[name]
            raise NotImplementedError(f"the conformance fake does not simulate {qual}.{name}")

        def set_(self, value):
            params = parse_signature(info["set"][0], drop_self=True) if info["set"] else []
            if params and not accepts(params[0][1], value):
                raise TypeError(f"{qual}.{name}: incompatible value {value!r} (expects "
                                f"{_short(params[0][1] or '?')})")
            self.__dict__.setdefault("_state", {})[name] = value
        return property(get, set_ if info["settable"] else None)

    pending = dict(api["classes"])
    while pending:  # bases first
        for qual, spec in list(pending.items()):
            if any(b in pending for b in spec["bases"]):
                continue
            bases = tuple(classes[b] for b in spec["bases"] if b in classes) or (FakeObject,)
            ns: dict[str, Any] = {"_qual": qual, "__init__": init(qual, spec["init"])}
            for name, sigs in spec["methods"].items():
                if name in ("_pybind11_conduit_v1_", "__del__", "__enter__", "__exit__"):
                    continue
                python_level = bool(sigs) and ":" not in sigs[0] and "self" not in sigs[0]
                ns[name] = method(qual, name, sigs, python_level)
            for name, sigs in spec["static"].items():
                ns[name] = staticmethod(_module_function(f"{qual}.{name}", sigs, bind,
                                                         behaviours))
            for name, info in spec["properties"].items():
                ns[name] = prop(qual, name, info)
            if qual == "IHostMemory":  # a buffer in the bindings; bytes() is what callers use
                ns["__bytes__"] = lambda self: bytes(self._state["data"])
            cls = type(qual.rsplit(".", 1)[-1], bases, ns)
            for name, member in spec["attrs"].items():
                enum_qual, _, member_name = member.rpartition(".")
                setattr(cls, name, getattr(enums[enum_qual], member_name))
            classes[qual] = cls
            del pending[qual]
    for qual, cls in list(enums.items()) + list(classes.items()):
        owner, _, attr = qual.rpartition(".")
        if owner:
            if owner in classes:
                setattr(classes[owner], attr, cls)
        else:
            setattr(module, qual, cls)
    for name, sigs in api["functions"].items():
        if name in ("common_enter", "common_exit"):
            continue
        setattr(module, name, _module_function(name, sigs, bind, behaviours))
    module._fake_classes, module._fake_enums = classes, enums
    return module


def _module_function(qual: str, sigs: list[str], bind: Callable,
                     behaviours: dict[str, Callable]) -> Callable:
    typed = bool(sigs) and ":" in sigs[0]

    def call(*args, **kwargs):
        if typed:
            bound = bind(qual, sigs, args, kwargs, drop_self=False)
        else:  # a Python-level function: check the count only
            params = parse_signature(sigs[0], drop_self=False) if sigs else []
            if len(args) + len(kwargs) > len(params) or len(args) + len(kwargs) < sum(
                    1 for p in params if not p[2]):
                raise TypeError(f"{qual}() takes {len(params)} arguments")
            bound = dict(zip([p[0] for p in params], args), **kwargs)
        fn = behaviours.get(qual)
        if fn is None:
            raise NotImplementedError(f"the conformance fake does not simulate {qual}")
        return fn(**bound)
    call.__name__ = qual.rsplit(".", 1)[-1]
    return call


def new(module: types.ModuleType, qual: str, **state: Any) -> Any:
    """An instance of the fake class ``qual`` as the bindings would return it (bypassing the
    constructor, which most TensorRT classes lack), with ``state`` for the behaviours."""
    obj = object.__new__(module._fake_classes[qual])
    object.__setattr__(obj, "_state", dict(state))
    return obj
