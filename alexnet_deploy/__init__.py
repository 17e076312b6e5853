"""alexnet-deploy: train the 2012 AlexNet, export it to ONNX, calibrate, build, validate, benchmark.

Pipeline (one module per stage)::

    train -> export -> calibrate -> build -> validate / bench / predict

Embedding an engine::

    from alexnet_deploy import load_engine

    with load_engine("engines/demo-int8") as engine:
        for p in engine.classify(["photo.jpg"], top_k=5):
            print(p.source, p.labels[0], p.probabilities[0])
"""

__version__ = "0.1.0"

from alexnet_deploy.engine import Engine, EngineSidecar, Prediction, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.preprocess import PreprocessSpec

__all__ = ["Engine", "EngineSidecar", "Prediction", "PreprocessSpec", "UserError", "__version__",
           "load_engine"]
