"""Conformance of the TensorRT backend to the real TensorRT bindings and pycuda (see
``tensorrt_api.py``). A package, so that its conftest does not shadow ``tests/conftest.py``."""
