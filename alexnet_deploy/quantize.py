"""Precision as graph rewrites: INT8 (Q/DQ) and FP16 ONNX graphs, and mixed precision by budget.

TensorRT 10.1+ deprecated implicit INT8 calibration and TensorRT 11 removed it (and the FP16/INT8
builder flags): networks are strongly typed, so the precision each layer runs in is written into
the ONNX graph itself. The same graphs run on ONNX Runtime and OpenVINO, which is how their
accuracy is proven on a machine without a GPU. Everything here is ``onnx`` + ``numpy``; only
:func:`layer_sensitivity` / :func:`choose_fp32_layers` run a model (on ONNX Runtime).

INT8 (:func:`to_int8`)
----------------------
Symmetric, zero point 0. Weights per output channel (axis 0 of Conv and of ``Gemm(transB=1)``),
``scale = max|w| / 127``, stored as int8 initializers read through a ``DequantizeLinear``.
Activations per tensor, ``scale = amax / 127`` with ``amax`` from the calibration file. One
canonical Q/DQ placement per target:

``target="tensorrt"``
    Q/DQ on the inputs of every Conv and Gemm (activation and weight) and nowhere else, int8
    activations, float biases: TensorRT's explicit-quantization guide ("Q/DQ layer placement
    recommendations": quantize all inputs of weighted operations, do not quantize their outputs
    by default) -- TensorRT fuses the DQ into the layer, folds the bias, fuses the ReLU, and moves
    Q/DQ across MaxPool / Flatten by itself.

``target="cpu"``
    Where ONNX Runtime (and OpenVINO) turn Q/DQ into integer kernels. ONNX Runtime rewrites
    ``DQ -> Conv -> Q`` into ``QLinearConv`` only when the Conv's *output* is quantized too; a
    ``Relu`` between Conv and Q blocks that unless the Q's zero point is the low end of its type
    (then ``ReluQuantFusion`` removes the Relu); ``DQ -> MaxPool / Flatten -> Q`` with one scale
    runs the op on the 8-bit tensor; ``QGemm`` may produce float. Hence:

    * **uint8, zero point 0, scale amax/255 for tensors that are >= 0 by construction** (after
      Relu; MaxPool, Flatten, LRN ... of such a tensor). Symmetric int8 spends half its codes on
      negative values these tensors never take; uint8 with zero point 0 keeps the same grid
      family (0 exact, no zero-point arithmetic) and spends all 256 codes on ``[0, amax]``, a
      step half as wide. Measured on a CIFAR-recipe model (docs/notes.md): top-1 agreement
      with FP32 0.978 -> 0.985 (entropy), 0.975 -> 0.988 (minmax). The calibration file keeps
      TensorRT's ``scale = amax/127``; only this placement's uint8 tensors divide by 255.
      It also lets ONNX Runtime drop the Relu and run its u8s8 VNNI / AMX kernels. (On AVX2
      CPUs *without* VNNI, MLAS's u8s8 path can saturate int16 pair sums for inputs above 127, as
      ONNX Runtime's quantization docs warn; this module targets VNNI-class CPUs.)
    * the Q that feeds a layer moves *up* through MaxPool / Flatten to the Relu of the Conv that
      produced it, with a Q/DQ pair of that same scale around each op on the way. Rounding
      commutes with max and with reshapes, so the layer sees exactly the values of the TensorRT
      placement, while the producing Conv + Relu now ends in a Q and fuses, and the pooling runs
      on 8-bit data. From a float producer (an LRN) the Q stays below the MaxPool: ONNX Runtime
      runs an NCHW uint8 MaxPool several times slower than its blocked float one.
    * a quantized Conv whose output still feeds float ops (conv1 / conv2 into LRN) gets a Q/DQ on
      its Relu output at that tensor's own calibrated scale: the one extra rounding this placement
      adds over TensorRT's, and the price of an integer conv1 / conv2.
    * biases become int32 at ``scale = activation scale x weight scale`` (what ``QLinearConv`` /
      ``QGemm`` take; a float bias keeps ONNX Runtime from fusing fc8, whose output is float).
    * LRN stays float in any form (native ``LRN``, or element-wise with a window-sum Conv, which
      :func:`weighted_layers` leaves out).

FP16 (:func:`to_fp16`)
----------------------
Every float tensor and weight becomes float16, with a Cast after each graph input and before each
graph output so callers still feed and read float32 (``keep_io_types``). LRN blocks and Softmax
stay float32 between casts. The LRN squares its input: ``x * x`` overflows float16 (max 65504)
once ``|x| > 256``, and a trained AlexNet's conv1 ReLU outputs reach a few hundred, so a float16
LRN returns 0 or NaN exactly on the strongest activations (``tests/test_quantize.py`` scales
conv1 past that point and checks that the FP16 graph stays finite and close to FP32).
Pre-scaling ``x`` by ``sqrt(alpha/size)`` before squaring (``rewrite.lrn_for_onnxruntime(...,
prescale=True)``) keeps the square finite, but costs a pass and still rounds
``k + alpha * sum(x^2)`` to float16 spacing (2**-9 near k = 2). The blocks are a handful of
element-wise ops on the two largest feature maps, so running them in float32 costs two casts
each and is exact; TensorRT runs a float32 LRN layer between FP16 layers as readily.

Mixed precision (:func:`choose_fp32_layers`)
---------------------------------------------
Measures on held-out images, on ONNX Runtime, what each layer's INT8 costs (alone, every other
layer FP32, and as the gain of keeping it FP32 while the rest is INT8); when the all-INT8 graph
misses the budget, layers go to INT8 cheapest first (alone), each kept only if the mix still
meets the budget. ``keep_fp32`` in :func:`to_int8` is the mechanism.

A :class:`Budget` states the fidelity asked for (``min_agreement`` with FP32 and/or
``max_top1_drop``) and, with ``confidence``, asks it of the *bound* of a one-sided confidence
interval rather than of the point estimate: a mix measured at 99.1% agreement on 2,000 held-out
images is, at 95% confidence, only known to be above 98.7%, and images the search never saw land
anywhere in that range (the CIFAR model's all-INT8 engine: 99.15% on ``cifar10_test_2k``, 98.30%
on 2,000 other test images). Agreement uses the Wilson score bound; the accuracy drop, a paired
difference, the normal bound on the discordant pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from alexnet_deploy import metadata as meta
from alexnet_deploy.calibrators import INT8_MAX
from alexnet_deploy.errors import UserError
from alexnet_deploy.graph import (
    LRNBlock,
    consumers_of,
    inferred_value_info,
    initializers_of,
    is_square,
    lrn_blocks,
    lrn_regions,
    node_label,
    producers_of,
)
from alexnet_deploy.metadata import get_meta, set_meta
from alexnet_deploy.onnxrt import ort_logits

if TYPE_CHECKING:
    import onnx

Target = Literal["tensorrt", "cpu"]
TARGETS = ("tensorrt", "cpu")

# Ops whose weight (input 1) is quantized. Only Conv and Gemm: the export writes every FC layer as
# Gemm, and a MatMul there is the adaptive average pool's constant bin-averaging map.
WEIGHTED_OPS = ("Conv", "Gemm")
# Ops that only select or move values: rounding commutes with them, and ONNX Runtime runs them on
# the 8-bit tensor when a DQ / Q pair of one scale surrounds them (its DropQDQNodes rules).
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape")
# Output >= 0 whatever the input.
_NONNEG_SOURCES = ("Relu", "Sqrt", "Exp", "Sigmoid", "Softmax", "Abs")
# Output >= 0 when the first input is.
_NONNEG_PRESERVING = ("MaxPool", "Flatten", "Reshape", "LRN", "AveragePool", "GlobalAveragePool",
                      "GlobalMaxPool", "Split", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                      "Reciprocal", "Cast")
# Output >= 0 when every input is (weights and biases included).
_NONNEG_ALL_INPUTS = ("Mul", "Div", "Add", "Concat", "Max", "Min", "Sum", "Conv", "Gemm",
                      "MatMul", "Pow")
FP32_ISLAND_OPS = ("LRN", "Softmax", "LogSoftmax")
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (the axis attribute)
UINT8_MAX = 255
_LRN_GEMM_MAX_CHANNELS = 64  # channels-last LRN: banded Gemm window up to this tower width


# ---------------------------------------------------------------------------------------------
# graph helpers


def opset_version(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UserError("the model imports no default ONNX opset: re-export it")


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically in place (new nodes were appended at the end)."""
    import onnx

    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        pending.append(copy)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})
            raise UserError(f"graph rewrite left inputs without producers: {missing[:5]}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _lrn_nodes(model: onnx.ModelProto) -> set[str]:
    return {label for region in lrn_regions(model) for label in region}


@dataclass(frozen=True)
class WeightedLayer:
    """A Conv or Gemm with a constant weight: a layer INT8 can quantize."""

    name: str
    op_type: str
    activation: str  # the input tensor that carries activations
    weight: str  # the weight initializer
    bias: str | None  # the bias initializer, if any
    channel_axis: int  # axis of the weight that indexes output channels


def weighted_layers(model: onnx.ModelProto) -> list[WeightedLayer]:
    """The layers INT8 can quantize (``conv1`` .. ``fc8``), in graph order.

    A Conv or Gemm whose weight is an initializer, except the window-sum Conv of an element-wise
    LRN (it stays float).
    """
    graph = model.graph
    inits = initializers_of(graph)
    skip = _lrn_nodes(model)
    layers = []
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        if node.input[1] not in inits or node_label(node) in skip:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue  # activations transposed: not an FC layer
        axis = 1 if node.op_type == "Gemm" and not attrs.get("transB", 0) else 0
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        layers.append(WeightedLayer(node_label(node), node.op_type, node.input[0], node.input[1],
                                    bias, axis))
    return layers


def layer_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per image of each :func:`weighted_layers` layer: a Conv's weight
    elements times its output's spatial size, a Gemm's weight elements."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred_value_info(model)}
    inits = initializers_of(model.graph)
    outputs = {node_label(n): n.output[0] for n in model.graph.node}
    macs = {}
    for layer in weighted_layers(model):
        n = int(np.prod(inits[layer.weight].dims))
        if layer.op_type == "Conv":
            n *= int(np.prod(shapes.get(outputs[layer.name], [1, 1, 1, 1])[2:]))
        macs[layer.name] = n
    return macs


def nonnegative_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that are >= 0 for every input, proved from the graph's structure (never data)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = initializers_of(graph)
    nonneg = {name for name, t in inits.items()
              if t.data_type in (1, 10, 11) and bool(np.all(numpy_helper.to_array(t) >= 0))}
    for node in graph.node:  # graph order is topological
        op, ins = node.op_type, [i for i in node.input if i]
        if op in _NONNEG_SOURCES or is_square(node, inits):
            ok = True
        elif op in ("Reshape", "Pow"):
            ok = bool(ins) and ins[0] in nonneg  # shape / exponent inputs do not matter
        elif op in _NONNEG_PRESERVING:
            ok = bool(ins) and ins[0] in nonneg
        elif op in _NONNEG_ALL_INPUTS:
            ok = bool(ins) and all(i in nonneg for i in ins)
        else:
            ok = False
        if ok:
            nonneg.update(o for o in node.output if o)
    return nonneg


# ---------------------------------------------------------------------------------------------
# INT8


def _amax_table(calibration: Any) -> Mapping[str, float]:
    """``calibration.amax`` of a :class:`~alexnet_deploy.calibrate.Calibration`, or a mapping."""
    table = getattr(calibration, "amax", calibration)
    if not isinstance(table, Mapping):
        raise UserError("calibration must be a Calibration (from load_calibration) or a "
                        "{tensor name: amax} mapping")
    return table


def activation_scale(amax: float, unsigned: bool = False) -> float:
    """Per-tensor activation scale, rounded to float32 as it is stored: ``amax / 127`` for int8
    (symmetric), ``amax / 255`` for uint8 (zero point 0, tensors >= 0 by construction), so both
    map ``amax`` to the top code of their type."""
    amax = float(amax)
    if not (np.isfinite(amax) and amax > 0):
        raise UserError(f"activation amax must be finite and > 0, got {amax}: re-run calibrate")
    return float(np.float32(amax / (UINT8_MAX if unsigned else INT8_MAX)))


def quantize_weight(weight: np.ndarray, channel_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: ``(q, scale)``, ``scale = max|w| / 127`` per channel.

    ``q`` is int8 in -127..127 with ``weight``'s shape; ``scale`` is float32, one per channel. A
    channel of zeros gets scale 1 (any scale represents it exactly).
    """
    w = np.asarray(weight, np.float32)
    axes = tuple(i for i in range(w.ndim) if i != channel_axis)
    amax = np.abs(w).max(axis=axes)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[channel_axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """``bias`` as int32 at ``scale`` (activation scale x per-channel weight scale); None when it
    is not 1-D per channel or would overflow int32 (then it stays float)."""
    scale = np.asarray(scale, np.float32)
    if bias.ndim != 1 or bias.shape != scale.shape:
        return None
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(q) > np.iinfo(np.int32).max):
        return None
    return q.astype(np.int32)


@dataclass
class TensorQuant:
    """How one activation tensor is quantized, and which nodes read its dequantized form."""

    tensor: str
    scale: float
    unsigned: bool
    readers: set[str] = field(default_factory=set)
    reason: str = ""

    @property
    def dtype(self) -> str:
        return "uint8" if self.unsigned else "int8"


@dataclass
class Int8Plan:
    """Where :func:`to_int8` puts Q/DQ pairs."""

    target: str
    quantized_layers: list[str]
    fp32_layers: list[str]
    activations: dict[str, TensorQuant]
    calibrated: list[str]  # tensors whose amax the plan reads, in order

    def layer_precision(self) -> dict[str, str]:
        """``{layer: "int8" | "fp32"}`` in graph order."""
        order = self.quantized_layers + self.fp32_layers
        return {name: ("int8" if name in self.quantized_layers else "fp32") for name in order}



class _EveryAmax(dict):
    """An amax table holding every tensor (lets :func:`required_activations` plan without one)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> float:
        return 1.0


def required_activations(model: onnx.ModelProto, target: Target = "cpu",
                         keep_fp32: Iterable[str] = ()) -> list[str]:
    """The tensors whose ``amax`` :func:`to_int8` reads for this model, target and mix.

    The inputs of every quantized Conv / Gemm, plus for ``target="cpu"`` the output (after its
    Relu) of each quantized Conv that feeds float ops (``relu1`` and ``relu2``, into the LRNs).
    """
    return _plan_int8(model, _EveryAmax(), target, keep_fp32).calibrated


def _ends_quantized_conv(tensor: str, producers: Mapping[str, Any],
                         consumers: Mapping[str, list], convs: set[str]) -> bool:
    """``tensor`` is the output of a quantized Conv, directly or through its own Relu."""
    node = producers.get(tensor)
    if node is not None and node.op_type == "Relu" and len(consumers.get(node.input[0], [])) == 1:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Conv" and node_label(node) in convs


def _plan_int8(model: onnx.ModelProto, amax: Mapping[str, float], target: str,
               keep_fp32: Iterable[str]) -> Int8Plan:
    if target not in TARGETS:
        raise UserError(f"unknown INT8 target {target!r}: choose one of {', '.join(TARGETS)}")
    graph = model.graph
    layers = weighted_layers(model)
    if not layers:
        raise UserError("the model has no float Conv / Gemm layers to quantize (is it already "
                        "quantized?): pass the FP32 export")
    names = [layer.name for layer in layers]
    keep = set(keep_fp32)
    unknown = sorted(keep - set(names))
    if unknown:
        raise UserError(f"cannot keep {unknown} in FP32: the model's layers are "
                        f"{', '.join(names)}")
    quantized = [layer for layer in layers if layer.name not in keep]
    producers, consumers = producers_of(graph), consumers_of(graph)
    cpu = target == "cpu"
    nonneg = nonnegative_tensors(model) if cpu else set()
    convs = {layer.name for layer in quantized if layer.op_type == "Conv"}
    graph_outputs = {o.name for o in graph.output}
    plan: dict[str, TensorQuant] = {}
    calibrated: list[str] = []

    def amax_of(tensor: str, why: str) -> float:
        if tensor not in calibrated:
            calibrated.append(tensor)
        if tensor not in amax:
            needed = required_activations(model, target, keep)
            missing = [t for t in needed if t not in amax]
            raise UserError(f"the calibration has no amax for tensor {tensor!r} ({why}); INT8 "
                            f"for target {target} also lacks {missing}: re-run "
                            "'alexnet-deploy calibrate' on this model")
        return float(amax[tensor])

    def add(tensor: str, tensor_amax: float, reader: str, reason: str) -> None:
        if tensor not in plan:
            unsigned = tensor in nonneg
            plan[tensor] = TensorQuant(tensor, activation_scale(tensor_amax, unsigned), unsigned,
                                       set(), reason)
        plan[tensor].readers.add(reader)

    for layer in quantized:
        tensor_amax = amax_of(layer.activation, f"input of {layer.name}")
        add(layer.activation, tensor_amax, layer.name, "layer input")
        if not cpu:
            continue
        # Walk up through MaxPool / Flatten while each tensor has this chain as its only reader.
        chain, tensor = [], layer.activation
        while True:
            node = producers.get(tensor)
            if (node is None or node.op_type not in PASSTHROUGH_OPS
                    or len(consumers.get(tensor, [])) != 1 or tensor in graph_outputs):
                break
            source = node.input[0]
            if len(consumers.get(source, [])) != 1 or source in graph_outputs:
                break
            chain.append((source, node))
            tensor = source
        if chain and _ends_quantized_conv(tensor, producers, consumers, convs):
            for source, node in chain:
                add(source, tensor_amax, node_label(node),
                    f"{layer.name}'s input scale, moved up through {node.op_type}")

    if cpu:  # a Conv fuses into QLinearConv only when its output (after Relu) is quantized
        for layer in quantized:
            if layer.op_type != "Conv":
                continue  # QGemm may emit float
            node = next(n for n in graph.node if node_label(n) == layer.name)
            out = node.output[0]
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type == "Relu":
                out = after[0].output[0]
            if out in plan or out in graph_outputs or not consumers.get(out):
                continue
            tensor_amax = amax_of(out, f"output of {layer.name}, read by float ops")
            for reader in consumers[out]:
                add(out, tensor_amax, node_label(reader),
                    f"output of {layer.name}, so that it runs as an integer kernel")
    return Int8Plan(target, [layer.name for layer in quantized],
                    [layer.name for layer in layers if layer.name in keep], plan, calibrated)


def to_int8(model: onnx.ModelProto, calibration: Any, target: Target = "tensorrt",
            keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """An INT8 copy of ``model``: Q/DQ pairs placed for ``target``, weights stored as int8.

    Args:
        model: a float32 model: the canonical export, or a backend rewrite of it (the tensor names
            the calibration keys on must be kept). Not modified.
        calibration: a :class:`~alexnet_deploy.calibrate.Calibration` (its ``amax`` table), or a
            ``{tensor name: amax}`` mapping. Activation scale = amax / 127.
        target: ``"tensorrt"`` (Q/DQ on the inputs of every Conv / Gemm) or ``"cpu"`` (the
            placement ONNX Runtime and OpenVINO fuse into integer kernels). See the module
            docstring. Defaults to ``"tensorrt"``.
        keep_fp32: layers (``conv1`` .. ``fc8``) left in float32. Defaults to none.

    Returns:
        A new model with the same inputs, outputs and opset. Its ``metadata_props`` gain
        ``alexnet_deploy.precision`` (``"int8"``), ``alexnet_deploy.int8_target`` and
        ``alexnet_deploy.layer_precision`` (JSON ``{layer: "int8" | "fp32"}``).

    Raises:
        UserError: an opset below 13, an unknown target or layer name, no layer to quantize, or
            a tensor the calibration does not cover.
    """
    from onnx import helper, numpy_helper

    if opset_version(model) < MIN_QDQ_OPSET:
        raise UserError(f"INT8 needs opset >= {MIN_QDQ_OPSET} (per-channel DequantizeLinear); "
                        f"the model has opset {opset_version(model)}: re-export with --opset {MIN_QDQ_OPSET} "
                        "or newer")
    plan = _plan_int8(model, _amax_table(calibration), target, keep_fp32)
    out = _copy(model)
    graph = out.graph
    inits = initializers_of(graph)
    by_label = {node_label(n): n for n in graph.node}
    new_nodes, new_inits, replaced = [], [], set()

    def dequantized(name: str, q: np.ndarray, scale: np.ndarray, axis: int | None,
                    node_name: str) -> str:
        zero = np.zeros(scale.shape, q.dtype)
        new_inits.extend([numpy_helper.from_array(q, f"{name}_quantized"),
                          numpy_helper.from_array(scale, f"{name}_scale"),
                          numpy_helper.from_array(zero, f"{name}_zero_point")])
        attrs = {} if axis is None else {"axis": axis}
        new_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
            [f"{name}_dequantized"], name=node_name, **attrs))
        replaced.add(name)
        return f"{name}_dequantized"

    for layer in weighted_layers(model):
        if layer.name not in plan.quantized_layers:
            continue
        node = by_label[layer.name]
        q, w_scale = quantize_weight(numpy_helper.to_array(inits[layer.weight]),
                                     layer.channel_axis)
        node.input[1] = dequantized(layer.weight, q, w_scale, layer.channel_axis,
                                    f"{layer.name}/weight_dequantize")
        if target == "cpu" and layer.bias is not None:
            b_scale = (np.float32(plan.activations[layer.activation].scale) * w_scale)
            b_scale = b_scale.astype(np.float32)
            qb = quantize_bias(numpy_helper.to_array(inits[layer.bias]), b_scale)
            if qb is not None:
                node.input[2] = dequantized(layer.bias, qb, b_scale, 0,
                                            f"{layer.name}/bias_dequantize")

    for tensor, quant in plan.activations.items():
        stem = tensor.replace("/", "_")
        zp_type = np.uint8 if quant.unsigned else np.int8
        scale_name, zp_name = f"{stem}_act_scale", f"{stem}_act_zero_point"
        q_name, dq_name = f"{stem}_quantized", f"{stem}_dequantized"
        new_inits.extend([numpy_helper.from_array(np.array(quant.scale, np.float32), scale_name),
                          numpy_helper.from_array(np.array(0, zp_type), zp_name)])
        new_nodes.extend([
            helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_name],
                             name=f"{stem}/quantize"),
            helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [dq_name],
                             name=f"{stem}/dequantize"),
        ])
        for reader in quant.readers:
            node = by_label[reader]
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = dq_name

    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in replaced or t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    graph.node.extend(new_nodes)
    _toposort(graph)
    del graph.value_info[:]  # stale element types; shape inference recomputes them
    set_meta(out, meta.PRECISION, "int8")
    set_meta(out, meta.INT8_TARGET, target)
    set_meta(out, meta.LAYER_PRECISION, plan.layer_precision())
    return out


FP16_QDQ_OPSET = 19  # QuantizeLinear / DequantizeLinear with float16 input and scales


def to_int8_fp16(model: onnx.ModelProto, calibration: Any, target: Target = "tensorrt",
                 keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """INT8 where :func:`to_int8` quantizes, FP16 everywhere else: TensorRT's usual production
    setting, written into the graph for strongly typed networks.

    :func:`to_int8`'s graph, raised to opset 19 when older (float16 Q/DQ scales need
    QuantizeLinear-19), then :func:`to_fp16`: the Q/DQ scales become float16, so under strong
    typing every dequantized tensor, bias, pooling and un-quantized layer runs in FP16. LRN and
    Softmax blocks stay FP32 between casts, as in :func:`to_fp16` (an FP16 LRN overflows on a
    trained model's strongest activations). Layers in ``keep_fp32`` are not quantized and so run
    in FP16, not FP32.

    Args:
        model: a float32 model, as for :func:`to_int8`. Not modified.
        calibration: as for :func:`to_int8`.
        target: the Q/DQ placement. Defaults to ``"tensorrt"``.
        keep_fp32: layers left unquantized (in FP16 here). Defaults to none.

    Returns:
        A new model; ``metadata_props`` as :func:`to_int8` writes them, with
        ``layer_precision`` ``"int8"`` or ``"fp16"`` and ``alexnet_deploy.int8_fallback``
        ``"fp16"``.

    Raises:
        UserError: as :func:`to_int8`, or the graph cannot be raised to opset 19.
    """
    q = to_int8(model, calibration, target, keep_fp32)
    recorded = list(q.metadata_props)  # what to_int8 wrote; to_fp16 overwrites some of it
    if opset_version(q) < FP16_QDQ_OPSET:
        from onnx import version_converter

        try:
            q = version_converter.convert_version(q, FP16_QDQ_OPSET)
        except Exception as e:  # the converter raises bare RuntimeErrors
            raise UserError(f"INT8 with FP16 needs opset >= {FP16_QDQ_OPSET} and this graph "
                            f"(opset {opset_version(q)}) cannot be converted ({e}): re-export "
                            f"with --opset {FP16_QDQ_OPSET}") from e
    out = to_fp16(q)
    del out.metadata_props[:]
    out.metadata_props.extend(recorded)
    layers = get_meta(out, meta.LAYER_PRECISION)
    set_meta(out, meta.LAYER_PRECISION, {k: "int8" if v == "int8" else "fp16"
                                         for k, v in layers.items()})
    set_meta(out, meta.INT8_FALLBACK, "fp16")
    return out


# ---------------------------------------------------------------------------------------------
# LRN laid out for ONNX Runtime's integer kernels


def lrn_channels_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every native LRN block of ``model`` rewritten into an exact channels-last form for ONNX
    Runtime's integer kernels (apply it to :func:`to_int8`'s ``target="cpu"`` graph).

    ONNX Runtime runs ``QLinearConv`` and uint8 ``MaxPool`` in NHWC. Between conv1 / conv2 and
    their pools sits the float LRN; written in NCHW (as :func:`alexnet_deploy.rewrite.
    lrn_for_onnxruntime` writes it for FP32) it costs float NCHW <-> NHWC transposes, a float NCHW
    MaxPool and three copies of the ``DequantizeLinear`` (ONNX Runtime gives every input edge its
    own). Written channels-last, the transposes cancel against the integer convs' own and the pools
    run as uint8 ``NhwcMaxPool``::

        r  = Reshape(Transpose(q, NHWC), [-1, 1, C/groups])   one row per tower and pixel
        x  = Cast(r, float)                                     the uint8 codes, 0..255
        d  = Window(x * x) * alpha/size * s^2 + k               the in-tower window sum, in x = v/s
        z  = Div(x, Sqrt(d) * Sqrt(Sqrt(d)))                    = LRN(v) / s   (beta = 0.75)
        zq = QuantizeLinear(z, scale s_pool / s)                = the codes of LRN(v) at s_pool
        pool = MaxPool(Transpose(Reshape(zq, NHWC), NCHW)) -> DequantizeLinear(s_pool) -> conv2

    where ``q`` is the uint8 output of the conv's Q (scale ``s``), ``s_pool`` the scale of the
    Q/DQ pair after the pool, and ``Window`` a banded ``Gemm`` for towers up to 64 channels wide
    (lrn1: 48) or a 1-D ``Conv`` with ``size`` taps for wider ones (lrn2: 128); ONNX Runtime runs
    the Gemm on both threads and the small convolution on one, so each wins on its side. Dequantizing by ``s`` is folded into the window taps and the output
    scale, so the block reads the 8-bit tensor through one ``Cast``; rounding commutes with max,
    so quantizing before the pool gives the pool's codes. The values are those of the Q/DQ graph
    up to float rounding inside the LRN. A block whose input is not such a uint8 Q (its conv kept
    in FP32) gets the same layout on its float input, and the pool keeps its Q/DQ.

    Measured on the full-size model, batch 16, 2 threads (``docs/notes.md``): the INT8
    engine runs 1.2x its FP32 engine with the NCHW form and 2.0x with this one at ONNX Runtime's
    default settings, 1.5x and 2.7x with thread spinning off. The FP32 graph is as fast in either
    layout. OpenVINO, whose native LRN is fast, should keep the native block.

    Args:
        model: a graph with native LRN blocks (:func:`alexnet_deploy.graph.lrn_blocks`) whose input shapes are
            known after shape inference. Not modified.

    Raises:
        UserError: an LRN input's shape is unknown or its channels do not split into groups.
    """
    import onnx
    from onnx import helper, numpy_helper

    blocks = lrn_blocks(model)
    out = _copy(model)
    if not blocks:
        return out
    shapes = _static_shapes(model, [b.x for b in blocks])
    graph = out.graph
    integer = {b.output: _integer_lrn_io(out, b) for b in blocks}
    first = {b.nodes[0]: b for b in blocks}
    remove = {label for b in blocks for label in b.nodes}
    for io in integer.values():
        if io is not None:
            remove.update(io["remove"])
    nodes, inits = [], []

    def const(name: str, array: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    for node in graph.node:
        label = node_label(node)
        block = first.get(label)
        if block is None:
            if label not in remove:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                nodes.append(copy)
            continue
        _, c, h, w = shapes[block.x]
        if c % block.groups:
            raise UserError(f"LRN input {block.x!r} has {c} channels, not divisible into "
                            f"{block.groups} groups")
        io = integer[block.output]
        stem = block.output

        def add(op: str, inputs: list[str], suffix: str, stem: str = stem, **attrs: Any) -> str:
            name = f"{stem}.{suffix}" if suffix else stem
            nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
            return name

        lo, per = (block.size - 1) // 2, c // block.groups
        # window sum over each row: a banded Gemm for narrow towers (multithreaded, vectorized;
        # per^2 MACs a row), a 1-D convolution for wide ones (size MACs, but single-threaded)
        banded = per <= _LRN_GEMM_MAX_CHANNELS
        t = add("Transpose", [io["codes"] if io else block.x], "nhwc", perm=[0, 2, 3, 1])
        r = add("Reshape", [t, const(f"{stem}.rows_shape", np.array(
            [-1, per] if banded else [-1, 1, per], np.int64))], "rows")
        if io:
            x = add("Cast", [r], "float", to=onnx.TensorProto.FLOAT)
            sq = add("Mul", [x, x], "sq")
            unit = io["scale"] ** 2
        else:  # a float input read through a DQ: Pow has one input edge, so one DQ copy
            x = r
            sq = add("Pow", [r, const(f"{stem}.two", np.float32(2.0))], "sq")
            unit = 1.0
        tap = block.alpha / block.size * unit
        if banded:  # column j sums rows j - lo .. j + size - 1 - lo
            i, j = np.arange(per)[:, None], np.arange(per)[None, :]
            band = ((i >= j - lo) & (i <= j + block.size - 1 - lo)).astype(np.float32) * tap
            d = add("Gemm", [sq, const(f"{stem}.window.weight", band),
                             const(f"{stem}.window.bias", np.full(per, block.bias, np.float32))],
                    "window")
        else:
            d = add("Conv", [sq, const(f"{stem}.window.weight",
                                       np.full((1, 1, block.size), tap, np.float32)),
                             const(f"{stem}.window.bias", np.array([block.bias], np.float32))],
                    "window", kernel_shape=[block.size], pads=[lo, block.size - 1 - lo])
        if block.beta == 0.75:
            root = add("Sqrt", [d], "sqrt")
            p = add("Mul", [root, add("Sqrt", [root], "qrt")], "pow")
        elif block.beta == 0.5:
            p = add("Sqrt", [d], "pow")
        else:
            p = add("Pow", [d, const(f"{stem}.beta", np.float32(block.beta))], "pow")
        y = add("Div", [x, p], "div")
        if io:
            y = add("QuantizeLinear", [y, const(f"{stem}.codes_scale",
                                                np.float32(io["pool_scale"] / io["scale"])),
                                       const(f"{stem}.codes_zero_point", np.uint8(0))], "quantize")
        y = add("Reshape", [y, const(f"{stem}.nhwc_shape", np.array([-1, h, w, c], np.int64))],
                "out_nhwc")
        add("Transpose", [y], "", perm=[0, 3, 1, 2])
        if io:  # the pool now reads codes and feeds the DequantizeLinear after its old Q
            pool = onnx.NodeProto()
            pool.CopyFrom(io["pool"])
            pool.output[0] = io["pool_codes"]
            nodes.append(pool)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    _toposort(graph)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    set_meta(out, meta.LRN_FORM, "channels_last")
    return out


def _integer_lrn_io(model: onnx.ModelProto, block: LRNBlock) -> dict | None:
    """For ``Q(s, uint8, 0) -> DQ -> [LRN block] -> MaxPool -> Q(s_pool, uint8, 0) -> DQ``, each
    link the only reader of the one before: the codes tensor, ``s``, the pool, ``s_pool`` and the
    nodes the integer form replaces. None for any other surrounding."""
    from onnx import numpy_helper

    graph = model.graph
    producers, consumers = producers_of(graph), consumers_of(graph)
    values = initializers_of(graph)

    def per_tensor_u8(node) -> float | None:
        if len(node.input) < 3 or node.input[1] not in values or node.input[2] not in values:
            return None
        scale = numpy_helper.to_array(values[node.input[1]])
        zero = numpy_helper.to_array(values[node.input[2]])
        if scale.size != 1 or zero.dtype != np.uint8 or zero.size != 1 or int(zero) != 0:
            return None
        return float(scale.reshape(()))

    dq = producers.get(block.x)
    if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(block.x, [])) != 1:
        return None
    q = producers.get(dq.input[0])
    after = consumers.get(block.output, [])
    if q is None or q.op_type != "QuantizeLinear" or len(after) != 1:
        return None
    pool = after[0]
    pool_readers = consumers.get(pool.output[0], [])
    if pool.op_type != "MaxPool" or len(pool_readers) != 1 or pool_readers[0].op_type != \
            "QuantizeLinear":
        return None
    q_pool = pool_readers[0]
    q_readers = consumers.get(q_pool.output[0], [])
    if len(q_readers) != 1 or q_readers[0].op_type != "DequantizeLinear":
        return None
    scale, pool_scale = per_tensor_u8(dq), per_tensor_u8(q_pool)
    if scale is None or pool_scale is None or per_tensor_u8(q) != scale or \
            per_tensor_u8(q_readers[0]) != pool_scale:
        return None
    return {"codes": dq.input[0], "scale": scale, "pool": pool, "pool_scale": pool_scale,
            "pool_codes": q_pool.output[0],
            "remove": {node_label(dq), node_label(pool), node_label(q_pool)}}


def _static_shapes(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, list[int]]:
    """Static 4-D shapes of ``names`` (batch may be symbolic: -1), by shape inference on a copy
    whose large initializers are replaced by their dims (fast on the 244 MB model)."""

    known = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    if any(n not in known for n in names):
        inferred = inferred_value_info(model)
        known.update({v.name: v for v in inferred})
    shapes = {}
    for name in names:
        dims = known[name].type.tensor_type.shape.dim if name in known else []
        found = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
        if len(found) != 4 or min(found[1:]) < 1:
            raise UserError(f"LRN input {name!r} has no static [N, C, H, W] shape after shape "
                            "inference: re-export the model")
        shapes[name] = found
    return shapes


# ---------------------------------------------------------------------------------------------
# FP16


def to_fp16(model: onnx.ModelProto, keep_fp32_ops: Sequence[str] = FP32_ISLAND_OPS
            ) -> onnx.ModelProto:
    """An FP16 copy of ``model`` whose inputs and outputs stay float32 (``keep_io_types``).

    Every float32 initializer, ``Constant`` and activation becomes float16; a Cast follows each
    float32 graph input and precedes each float32 graph output. LRN blocks (native ``LRN`` and
    the element-wise form, see :func:`lrn_regions`) and ops in ``keep_fp32_ops`` run in float32
    between casts, with their constants in float32.

    Args:
        model: a float32 model. Not modified.
        keep_fp32_ops: op types kept in float32. Defaults to LRN, Softmax, LogSoftmax.

    Raises:
        UserError: a weight does not fit float16 (``|w| > 65504``).
    """
    from onnx import TensorProto, helper, numpy_helper

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    out = _copy(model)
    graph = out.graph
    island = _lrn_nodes(out) | {node_label(n) for n in graph.node if n.op_type in keep_fp32_ops}
    in_island = lambda node: node_label(node) in island
    island_nodes = [n for n in graph.node if in_island(n)]
    half_nodes = [n for n in graph.node if not in_island(n)]
    island_reads = {i for n in island_nodes for i in n.input}
    half_reads = {i for n in half_nodes for i in n.input}

    # constants: float16 where half-precision nodes read them; float32 copies for islands
    extra = []
    for tensor in graph.initializer:
        if tensor.data_type != f32:
            continue
        arr = numpy_helper.to_array(tensor)
        if tensor.name in island_reads and tensor.name in half_reads:
            extra.append(numpy_helper.from_array(arr, f"{tensor.name}_fp32"))
            for node in island_nodes:
                for i, name in enumerate(node.input):
                    if name == tensor.name:
                        node.input[i] = f"{tensor.name}_fp32"
        elif tensor.name not in half_reads:
            continue
        finite = arr[np.isfinite(arr)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float16).max:
            raise UserError(f"weight {tensor.name} does not fit float16 (|w| > 65504): build "
                            "this model in FP32 or INT8")
        tensor.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), tensor.name))
    graph.initializer.extend(extra)
    for node in half_nodes:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
            elif node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == f32:
                attr.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))

    casts = []

    def rewire(nodes: Iterable, old: str, new: str) -> None:
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    float_inputs = [v.name for v in graph.input if v.type.tensor_type.elem_type == f32]
    initializer_names = {t.name for t in graph.initializer}
    for name in float_inputs:
        if name in initializer_names:
            continue
        casts.append(helper.make_node("Cast", [name], [f"{name}_fp16"], name=f"{name}/to_fp16",
                                      to=f16))
        rewire(half_nodes, name, f"{name}_fp16")
    graph_inputs = set(float_inputs)
    island_outputs = {o for n in island_nodes for o in n.output}
    for name in sorted(island_reads - island_outputs - initializer_names - {""}):
        # activations entering an island: float16 tensors (or graph inputs, already float32)
        if name in graph_inputs:
            continue
        casts.append(helper.make_node("Cast", [name], [f"{name}_fp32"], name=f"{name}/to_fp32",
                                      to=f32))
        rewire(island_nodes, name, f"{name}_fp32")
    graph_outputs = {v.name for v in graph.output if v.type.tensor_type.elem_type == f32}
    for name in sorted(island_outputs & half_reads):
        casts.append(helper.make_node("Cast", [name], [f"{name}_fp16"], name=f"{name}/to_fp16",
                                      to=f16))
        rewire(half_nodes, name, f"{name}_fp16")
    for name in sorted(graph_outputs - island_outputs):
        inner = f"{name}_fp16"
        for node in half_nodes:
            for j, produced in enumerate(node.output):
                if produced == name:
                    node.output[j] = inner
        rewire(graph.node, name, inner)
        casts.append(helper.make_node("Cast", [inner], [name], name=f"{name}/to_fp32", to=f32))
    graph.node.extend(casts)
    _toposort(graph)
    del graph.value_info[:]
    set_meta(out, meta.PRECISION, "fp16")
    set_meta(out, meta.LAYER_PRECISION, {layer.name: "fp16" for layer in weighted_layers(model)})
    return out


# ---------------------------------------------------------------------------------------------
# mixed precision by accuracy budget


@dataclass
class LayerReport:
    """One layer's line in the mixed-precision report. Drops are top-1 percentage points."""

    name: str
    precision: str  # "int8" or "fp32"
    drop_alone: float  # top-1 drop when only this layer is INT8
    gain_if_fp32: float  # how much the all-INT8 drop shrinks when only this layer is FP32


@dataclass(frozen=True)
class Measure:
    """One candidate graph against FP32 on labelled or unlabelled images.

    ``agreement``: fraction of images whose top-1 class equals FP32's, and ``agreement_low`` its
    one-sided lower confidence bound (Wilson). ``drop``: top-1 percentage points lost (accuracy
    with labels, else disagreement, as :func:`top1_drop`), and ``drop_high`` its upper bound.
    Without a confidence level the bounds are the point estimates.
    """

    agreement: float
    agreement_low: float
    drop: float
    drop_high: float
    num_images: int

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


# one-sided normal quantiles for the confidence levels a Budget accepts
_Z = {0.5: 0.0, 0.8: 0.8416, 0.9: 1.2816, 0.95: 1.6449, 0.975: 1.96, 0.99: 2.3263}


@dataclass(frozen=True)
class Budget:
    """The fidelity an INT8 build must keep, on images the calibration did not see.

    Args:
        min_agreement: top-1 agreement with FP32 the engine must reach (0..1), or None.
        max_top1_drop: top-1 percentage points it may lose (accuracy with labels, else
            disagreement with FP32), or None.
        confidence: one of 0.5 (point estimates), 0.8, 0.9, 0.95, 0.975, 0.99: the budget must
            hold at the pessimistic end of that one-sided interval. Defaults to 0.95.
        views: the images :meth:`measure` receives are this many equal parts (the same images
            seen differently, e.g. clean and with noise); the budget must hold on each, and the
            worst part is what is reported. Defaults to 1.
    """

    min_agreement: float | None = None
    max_top1_drop: float | None = None
    confidence: float = 0.95
    views: int = 1

    def __post_init__(self) -> None:
        if self.min_agreement is None and self.max_top1_drop is None:
            raise UserError("an accuracy budget needs --min-agreement and/or --max-top1-drop")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise UserError(f"--min-agreement must be in 0..1 (0.99 = 99%), got "
                            f"{self.min_agreement}")
        if self.max_top1_drop is not None and not self.max_top1_drop >= 0:
            raise UserError(f"--max-top1-drop must be a number >= 0, got {self.max_top1_drop}")
        if self.confidence not in _Z:
            raise UserError(f"confidence must be one of {sorted(_Z)}, got {self.confidence}")

    def measure(self, reference: np.ndarray, logits: np.ndarray,
                labels: np.ndarray | None = None) -> Measure:
        """``logits`` against the FP32 ``reference`` on the same images (with ``views`` > 1:
        the worst of the equal parts, by :meth:`shortfall`, then by agreement)."""
        if self.views > 1:
            n = len(reference) // self.views
            parts = [self._measure_one(reference[k * n:(k + 1) * n], logits[k * n:(k + 1) * n],
                                       None if labels is None else labels[k * n:(k + 1) * n])
                     for k in range(self.views)]
            return max(parts, key=lambda m: (self.shortfall(m), -m.agreement_low, m.drop_high))
        return self._measure_one(reference, logits, labels)

    def _measure_one(self, reference: np.ndarray, logits: np.ndarray,
                     labels: np.ndarray | None) -> Measure:
        z = _Z[self.confidence]
        ref, got = reference.argmax(1), logits.argmax(1)
        n = len(ref)
        agree = float(np.mean(ref == got))
        # Wilson score lower bound of a binomial proportion
        centre = agree + z * z / (2 * n)
        half = z * np.sqrt(agree * (1 - agree) / n + z * z / (4 * n * n))
        low = max(0.0, (centre - half) / (1 + z * z / n)) if agree < 1 or z == 0 else \
            n / (n + z * z)
        drop = top1_drop(reference, logits, labels)
        if labels is None:  # disagreement = 1 - agreement: its upper bound mirrors the lower
            high = 100.0 * (1.0 - low)
        else:  # paired difference of two accuracies: spread from the discordant pairs
            labels = np.asarray(labels)
            lost = (ref == labels) & (got != labels)
            won = (ref != labels) & (got == labels)
            var = (lost.sum() + won.sum() - (lost.sum() - won.sum()) ** 2 / n) / n ** 2
            high = drop + 100.0 * z * float(np.sqrt(max(var, 0.0)))
        if z == 0:
            low, high = agree, drop
        return Measure(agree, float(low), drop, float(high), n)

    def fits(self, m: Measure) -> bool:
        """The budget holds for ``m`` at this confidence."""
        return ((self.min_agreement is None or m.agreement_low >= self.min_agreement - 1e-12)
                and (self.max_top1_drop is None or m.drop_high <= self.max_top1_drop + 1e-12))

    def shortfall(self, m: Measure) -> float:
        """How far ``m`` is from fitting, in percentage points (0 when it fits): what "came
        closest" ranks by."""
        gap = 0.0
        if self.min_agreement is not None:
            gap = max(gap, 100.0 * (self.min_agreement - m.agreement_low))
        if self.max_top1_drop is not None:
            gap = max(gap, m.drop_high - self.max_top1_drop)
        return gap

    def describe(self) -> str:
        parts = []
        if self.min_agreement is not None:
            parts.append(f"agreement >= {100 * self.min_agreement:g}%")
        if self.max_top1_drop is not None:
            parts.append(f"top-1 drop <= {self.max_top1_drop:g} pt")
        how = ("measured" if self.confidence == 0.5 else
               f"at {100 * self.confidence:g}% confidence")
        return " and ".join(parts) + f" ({how})"


@dataclass
class MixedPrecisionResult:
    """What :func:`choose_fp32_layers` chose, and the measurements behind the choice."""

    fp32_layers: list[str]
    layers: list[LayerReport]
    budget: float  # the allowed top-1 drop, percentage points (inf with only min_agreement)
    final_drop: float  # measured top-1 drop of the chosen mix
    all_int8_drop: float  # measured top-1 drop with every layer INT8
    measure: str  # "accuracy drop" (labels given) or "disagreement" (an upper bound on it)
    num_images: int
    target: str
    seconds: float
    final: Measure | None = None  # the chosen mix, with confidence bounds
    all_int8: Measure | None = None
    budget_fits: bool | None = None  # Budget.fits of ``final`` (None: a plain drop budget)
    closest: list[str] | None = None  # when nothing with an INT8 layer fits: the best such mix
    closest_measure: Measure | None = None

    @property
    def fits(self) -> bool:
        if self.budget_fits is not None:
            return self.budget_fits
        return self.final_drop <= self.budget

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """A human-readable table, one line per layer plus a summary."""
        rows = [f"{'layer':8s} {'precision':9s} {'drop alone':>10s} {'gain if fp32':>12s}"]
        rows += [f"{r.name:8s} {r.precision:9s} {r.drop_alone:10.2f} {r.gain_if_fp32:12.2f}"
                 for r in self.layers]
        rows.append(f"top-1 {self.measure}: all INT8 {self.all_int8_drop:.2f} points, chosen mix "
                    f"{self.final_drop:.2f} (budget {self.budget:.2f}) on {self.num_images} "
                    f"images")
        return rows


def top1_drop(reference_logits: np.ndarray, logits: np.ndarray,
              labels: np.ndarray | None = None) -> float:
    """Top-1 drop in percentage points: reference accuracy minus this accuracy when ``labels``
    are given; otherwise the disagreement rate, which bounds any accuracy drop from above (every
    prediction lost is a disagreement)."""
    ref, got = reference_logits.argmax(1), logits.argmax(1)
    if labels is None:
        return 100.0 * float(np.mean(ref != got))
    labels = np.asarray(labels)
    return 100.0 * float(np.mean(ref == labels) - np.mean(got == labels))


# run(graph, images) -> logits: how the sensitivity search evaluates a candidate graph
LogitsFn = Callable[["onnx.ModelProto", np.ndarray], np.ndarray]


def layer_sensitivity(model: onnx.ModelProto, calibration: Any, images: np.ndarray,
                      target: Target = "cpu", labels: np.ndarray | None = None,
                      run: LogitsFn | None = None, reference: np.ndarray | None = None,
                      quantizer: Callable[..., onnx.ModelProto] | None = None) -> dict[str, Any]:
    """Per-layer INT8 cost on ``images``.

    Returns a dict: ``reference`` (FP32 logits), ``all_int8`` (top-1 drop with every layer
    INT8), ``alone`` (per layer: the drop when only it is INT8) and ``gain`` (per layer: how much
    the all-INT8 drop shrinks when only it stays FP32), and the logits behind them
    (``all_int8_logits``, ``alone_logits`` per layer). Drops as in :func:`top1_drop`.
    ``run(model, images) -> logits`` defaults to ONNX Runtime on the CPU; ``reference``, the FP32
    logits when already computed; ``quantizer``, :func:`to_int8` or :func:`to_int8_fp16` (what
    the engine will run: FP16 where TensorRT's default leaves layers unquantized).
    """
    quantizer = quantizer or to_int8
    run = run or ort_logits
    names = [layer.name for layer in weighted_layers(model)]
    reference = run(model, images) if reference is None else reference
    all_int8_logits = run(quantizer(model, calibration, target), images)
    all_int8 = top1_drop(reference, all_int8_logits, labels)
    alone, gain, alone_logits = {}, {}, {}
    for name in names:
        others = [n for n in names if n != name]
        alone_logits[name] = run(quantizer(model, calibration, target, others), images)
        alone[name] = top1_drop(reference, alone_logits[name], labels)
        gain[name] = all_int8 - top1_drop(
            reference, run(quantizer(model, calibration, target, [name]), images), labels)
    return {"reference": reference, "all_int8": all_int8, "alone": alone, "gain": gain,
            "all_int8_logits": all_int8_logits, "alone_logits": alone_logits}


def choose_fp32_layers(model: onnx.ModelProto, calibration: Any, images: np.ndarray,
                       max_top1_drop: float | Budget, target: Target = "cpu",
                       labels: np.ndarray | None = None, run: LogitsFn | None = None,
                       reference: np.ndarray | None = None,
                       quantizer: Callable[..., onnx.ModelProto] | None = None
                       ) -> MixedPrecisionResult:
    """The layers to keep in FP32 so that the rest, in INT8, meet the budget.

    If the all-INT8 graph meets the budget, nothing is kept. Otherwise, from :func:`layer_sensitivity`'s
    one-layer-INT8 graphs, judged by the budget's own measure (agreement and/or drop, at its
    confidence), layers go to INT8 cheapest first; each is measured together with those already
    accepted and stays INT8 only if the mix still meets the budget (a layer that breaks it is
    skipped, and later, cheaper-in-combination layers are still tried). If no layer can be INT8,
    every layer ends in FP32 (drop 0 by construction); with a :class:`Budget` that is a failure,
    and the closest mix (the same pass, accepting what does not worsen the shortfall) is
    reported.

    Cheapest-first addition rather than costliest-first removal: the cost of one layer measured
    against an all-INT8 graph is buried in the other layers' noise, while one layer measured
    alone against FP32 is not (on a CIFAR model, removal kept fc7 and fc8 in FP32, whose INT8
    alone changed 0 and 1 of 2,000 held-out answers, and no mix it tried met 99%).

    Args:
        model: the float32 model to quantize (as for :func:`to_int8`).
        calibration: the activation amax table.
        images: preprocessed float32 NCHW calibration images.
        max_top1_drop: the budget in top-1 percentage points (``0.5`` = half a point), like
            ``validate --max-top1-drop``, compared with the point estimate; or a
            :class:`Budget` (agreement and/or drop, at a confidence level). With a Budget, a
            search that must keep every layer in FP32 also reports the closest mix that keeps
            one INT8 layer (``closest``, ``closest_measure``).
        target: the Q/DQ placement to measure. Defaults to ``"cpu"``.
        labels: true classes of ``images``. Without them the drop is the top-1 disagreement with
            FP32, an upper bound on any accuracy drop. Defaults to None.
        run: ``run(model, images) -> logits``. Defaults to ONNX Runtime on the CPU.
        reference: the FP32 logits of ``images``, when already computed. Defaults to None.
        quantizer: builds each candidate graph: :func:`to_int8` (kept layers FP32, the default)
            or :func:`to_int8_fp16` (kept layers FP16, as TensorRT runs them by default).
    """
    quantizer = quantizer or to_int8
    budget = max_top1_drop if isinstance(max_top1_drop, Budget) else None
    if budget is None and not max_top1_drop >= 0:
        raise UserError(f"--max-top1-drop must be a number >= 0, got {max_top1_drop}")
    if len(images) == 0:
        raise UserError("the mixed-precision search needs calibration images, got none")
    run = run or ort_logits
    start = time.perf_counter()
    sens = layer_sensitivity(model, calibration, images, target, labels, run, reference, quantizer)
    alone, gain, reference = sens["alone"], sens["gain"], sens["reference"]
    names = list(alone)
    # all FP32: the reference itself
    exact = Measure(1.0, 1.0, 0.0, 0.0, len(images) // (budget.views if budget else 1))

    def judge(logits: np.ndarray) -> Measure:
        if budget is not None:
            return budget.measure(reference, logits, labels)
        drop = top1_drop(reference, logits, labels)
        agree = float(np.mean(reference.argmax(1) == logits.argmax(1)))
        return Measure(agree, agree, drop, drop, len(images))

    def ok(m: Measure) -> bool:
        return budget.fits(m) if budget is not None else m.drop <= max_top1_drop

    def shortfall(m: Measure) -> float:
        return budget.shortfall(m) if budget is not None else max(0.0, m.drop - max_top1_drop)

    def measure_int8(int8: list[str]) -> Measure:
        if len(int8) == 1:
            return single[int8[0]]
        return judge(run(quantizer(model, calibration, target,
                                 [n for n in names if n not in int8]), images))

    all_int8 = judge(sens["all_int8_logits"])
    single = {n: judge(sens["alone_logits"][n]) for n in names}
    # cheapest first: smallest shortfall alone, then highest agreement, smallest drop, graph order
    order = sorted(names, key=lambda n: (shortfall(single[n]), -single[n].agreement_low,
                                         single[n].drop_high, names.index(n)))

    def add_while(accept: Callable[[Measure, Measure], bool], int8: list[str],
                  current: Measure) -> tuple[list[str], Measure]:
        for name in order:
            if name in int8:
                continue
            m = measure_int8(int8 + [name])
            tried.append(([n for n in names if n not in int8 + [name]], m))
            if accept(m, current):
                int8, current = int8 + [name], m
        return int8, current

    tried: list[tuple[list[str], Measure]] = [([], all_int8)]
    if ok(all_int8):
        int8, current = list(names), all_int8
    else:
        int8, current = add_while(lambda m, _: ok(m), [], exact)
    kept = [n for n in names if n not in int8]
    closest = closest_measure = None
    # with a Budget, an "INT8" engine with no INT8 layer left has not met it
    none_int8 = budget is not None and not int8
    if none_int8:
        first = order[0]
        add_while(lambda m, cur: shortfall(m) <= shortfall(cur), [first], single[first])
        closest, closest_measure = min([t for t in tried if len(t[0]) < len(names)],
                                       key=lambda t: (budget.shortfall(t[1]), len(t[0])))
    layers = [LayerReport(n, "fp32" if n in kept else "int8", alone[n], gain[n]) for n in alone]
    return MixedPrecisionResult(
        fp32_layers=[n for n in alone if n in kept], layers=layers,
        budget=(max_top1_drop if budget is None else
                budget.max_top1_drop if budget.max_top1_drop is not None else float("inf")),
        final_drop=current.drop, all_int8_drop=sens["all_int8"],
        measure="accuracy drop" if labels is not None else "disagreement",
        num_images=len(images) // (budget.views if budget else 1), target=target,
        seconds=time.perf_counter() - start, final=current, all_int8=all_int8,
        budget_fits=None if budget is None else budget.fits(current) and not none_int8,
        closest=closest, closest_measure=closest_measure)
