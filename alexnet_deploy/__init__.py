"""alexnet-deploy: train the 2012 AlexNet, export it to ONNX, calibrate, build, validate, benchmark.

Pipeline (one module per stage)::

    train -> export -> calibrate -> build -> validate / bench
"""

__version__ = "0.1.0"
