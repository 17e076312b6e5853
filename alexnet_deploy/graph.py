"""ONNX graph structure the rewrites share: the LRN blocks, and fast shape inference.

:func:`lrn_blocks` is the one place that recognises the canonical export's LRN (per tower:
``Split(axis=1) -> LRN per group -> Concat(axis=1)``, or a lone ``LRN``); the quantizer and the
ONNX Runtime rewrites both read it. :func:`lrn_regions` extends it to the element-wise forms the
rewrites leave behind (for the mixed-precision and FP16 islands). :func:`inferred_value_info` runs ONNX shape inference on a
copy of a model whose large weights are stripped to their dims.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

#: initializers with more elements than this are stripped to their dims before shape inference
#: (the full-size model's weights are 244 MB); smaller ones keep their values, which
#: Split/Reshape shape arguments need
SHAPE_INFERENCE_MAX_ELEMENTS = 4096
_MAX_LRN_REGION = 32  # nodes; a larger "region" is not an LRN block


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's name when it has none."""
    return node.name or node.output[0]


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (each once), in graph order."""
    found: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                found[name].append(node)
    return found


def initializers_of(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializer name -> tensor."""
    return {t.name: t for t in graph.initializer}


@dataclass(frozen=True)
class LRNBlock:
    """Native LRN applied per channel group: ``x`` -> ``output``, made of ``nodes`` (labels,
    first to last), ``groups`` groups (towers) of equal size."""

    x: str
    output: str
    nodes: tuple[str, ...]
    groups: int
    size: int
    alpha: float  # as ONNX's LRN attribute (divided by size in the formula)
    beta: float
    bias: float


def lrn_blocks(model: onnx.ModelProto) -> list[LRNBlock]:
    """The native LRN blocks of ``model``, grouped ones first, each in graph order: ``Split
    (axis=1) -> LRN each -> Concat(axis=1)`` over equal channel groups with one set of LRN
    parameters and no other reader in between, or a lone ``LRN`` (one group)."""
    from onnx import helper, numpy_helper

    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output if out}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in dict.fromkeys(n.input):
            readers[i] = readers.get(i, 0) + 1
    inits = {t.name: t for t in model.graph.initializer}

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def params(node) -> tuple[int, float, float, float]:
        a = attrs(node)
        return (int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                float(a.get("bias", 1.0)))

    blocks, grouped = [], set()
    for concat in nodes:
        if concat.op_type != "Concat" or attrs(concat).get("axis") != 1:
            continue
        lrns = [producer.get(i) for i in concat.input]
        if len(lrns) < 2 or any(n is None or n.op_type != "LRN" for n in lrns):
            continue
        split = producer.get(lrns[0].input[0])
        if (split is None or split.op_type != "Split" or attrs(split).get("axis", 0) != 1
                or [n.input[0] for n in lrns] != list(split.output)):
            continue
        if len(split.input) > 1 and split.input[1]:  # explicit sizes: only equal ones are groups
            sizes = (numpy_helper.to_array(inits[split.input[1]])
                     if split.input[1] in inits else None)
            if sizes is None or len(set(sizes.tolist())) != 1:
                continue
        if len({params(n) for n in lrns}) != 1 or any(
                readers.get(o, 0) != 1 for n in [split, *lrns] for o in n.output):
            continue
        blocks.append(LRNBlock(split.input[0], concat.output[0],
                               tuple(node_label(n) for n in [split, *lrns, concat]), len(lrns),
                               *params(lrns[0])))
        grouped.update(node_label(n) for n in lrns)
    for n in nodes:
        if n.op_type == "LRN" and node_label(n) not in grouped:
            blocks.append(LRNBlock(n.input[0], n.output[0], (node_label(n),), 1, *params(n)))
    return blocks


def is_square(node: onnx.NodeProto, inits: Mapping[str, Any]) -> bool:
    """``Mul(x, x)`` or ``Pow(x, 2)``: how an element-wise LRN starts."""
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return True
    if node.op_type == "Pow" and len(node.input) == 2 and node.input[1] in inits:
        from onnx import numpy_helper

        exponent = numpy_helper.to_array(inits[node.input[1]])
        return exponent.size == 1 and float(exponent.reshape(())) == 2.0
    return False


def lrn_regions(model: onnx.ModelProto) -> list[set[str]]:
    """Node labels of every LRN block: a native ``LRN`` node, or the element-wise form.

    The element-wise form starts at a square of ``x`` (``Mul(x, x)`` / ``Pow(x, 2)``) and ends at
    the first node that reads ``x`` again (the final multiply or divide); the region is every node
    on a path between them, window-sum Conv included. Backend rewrites may lay the block out as
    they like (NCHW or NHWC, Conv or MatMul window, Pow or Sqrt); this finds it by structure.
    """
    graph = model.graph
    inits = initializers_of(graph)
    consumers = consumers_of(graph)
    regions = [set(block.nodes) for block in lrn_blocks(model)]
    for node in graph.node:
        if node.op_type == "LRN":
            continue
        if not is_square(node, inits):
            continue
        x = node.input[0]
        region, frontier, closed = {node_label(node)}, list(node.output), False
        while frontier and len(region) <= _MAX_LRN_REGION:
            for consumer in consumers.get(frontier.pop(), []):
                label = node_label(consumer)
                if label in region:
                    continue
                region.add(label)
                if x in consumer.input:
                    closed = True  # the final multiply / divide by x closes the block
                else:
                    frontier.extend(consumer.output)
        if closed and len(region) <= _MAX_LRN_REGION:
            regions.append(region)
    return regions


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Shape inference on a copy whose initializers above :data:`SHAPE_INFERENCE_MAX_ELEMENTS`
    are stripped to their dims (fast on the 244 MB full-size model)."""
    import onnx

    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) > SHAPE_INFERENCE_MAX_ELEMENTS:
            t = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)
        graph.initializer.append(t)
    return list(onnx.shape_inference.infer_shapes(skeleton).graph.value_info)
