"""Backend-specific rewrites of the one canonical export (:mod:`alexnet_deploy.export`).

Export writes one graph, the form a deployment engineer would hand-write (native ``LRN``, which
TensorRT runs as a fused layer). Where a backend runs some other exact form faster, the backend
applies a rewrite from this module to that graph when it builds its engine; every rewrite is tested
for equivalence with the canonical graph on ONNX Runtime (``tests/test_rewrite.py``).

``lrn_for_onnxruntime``
-----------------------
ONNX Runtime's CPU ``LRN`` kernel is slow: in a profile of the canonical graph it takes about
half of all kernel time (``docs/results.md``). This rewrite replaces each LRN block (``Split -> LRN per tower -> Concat``, or a lone ``LRN``) by::

    sq   = Mul(x, x)                        lrnK.sq
    d    = Conv1x1(sq, W, bias=k, group=G)  lrnK.window   W: alpha/size on a band |i-j| <= size/2
    s    = Sqrt(d)                          lrnK.sqrt     (beta = 0.75: d^0.75 = sqrt(d)*d^0.25)
    q    = Sqrt(s)                          lrnK.qrt
    p    = Mul(s, q)                        lrnK.pow
    y    = Div(x, p)                        lrnK          same output tensor name as before

The window sum is a 1x1 grouped convolution whose weight is a block-diagonal band of
``alpha/size``: one group per tower, so the 5-channel window never crosses the tower boundary,
exactly like the per-tower LRN. The bias ``k`` rides in the convolution's bias. Sqrt/Sqrt/Mul
replaces ``Pow(d, 0.75)`` because ONNX Runtime's ``Pow`` calls ``std::pow`` per element, which
costs more than the three vectorized passes; other betas use ``Sqrt`` (0.5) or ``Pow``.

Measured alternatives (all exact to below 1e-6 relative; figures in ``docs/notes.md``):
native ``LRN``; torch.onnx.export's pad/avg-pool/pow/div decomposition; ``Pow``-based forms;
``Div(Div(x, s), q)``; ``Pow(q, 3)`` for the power; and the same form with ``x`` pre-scaled by
``sqrt(alpha/size)`` before squaring (``prescale=True``). Pre-scaling keeps ``x**2`` finite in
float16 (ReLU outputs of a trained AlexNet reach a few hundred, whose square overflows float16's
65504) but costs one more pass; the float32 engines do not need it, so it is off by default: pass
``prescale=True`` before converting a rewritten graph to float16.

For the INT8 path, quantize the canonical graph first and apply this rewrite last (what
``build`` does via ``Backend.rewrite_graph``): the rewrite matches the LRN block whatever feeds
it (a ``DequantizeLinear`` included) and keeps the block's output name, so QDQ placement and
calibration keys are untouched and the float window convolution (``lrnK.window``) is never
quantized. Where a quantizer has put Q/DQ pairs between the Split and each LRN (ONNX Runtime's
``quantize_static`` does), each tower's LRN is rewritten on its own, one group each, still exact.
A graph rewritten first is still recognised by :func:`alexnet_deploy.graph.lrn_regions`
(``Mul(x, x)`` ... ``Div(x, .)``) in the default form; the ``prescale`` form is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alexnet_deploy.graph import inferred_value_info, lrn_blocks, node_label
from alexnet_deploy.metadata import REWRITES, get_meta, set_meta

if TYPE_CHECKING:
    import onnx

    from alexnet_deploy.graph import LRNBlock



def lrn_window(channels: int, groups: int, size: int, scale: float) -> np.ndarray:
    """``[channels, channels/groups, 1, 1]`` weight summing each channel's LRN window in-group.

    Output channel ``i`` of a group sums input channels ``i - (size-1)//2 .. i + size//2`` of the
    same group (ONNX's window), each weighted by ``scale``.
    """
    per = channels // groups
    i = np.arange(per)[:, None]
    j = np.arange(per)[None, :]
    band = ((j >= i - (size - 1) // 2) & (j <= i + size // 2)).astype(np.float32) * scale
    return np.tile(band, (groups, 1))[:, :, None, None].astype(np.float32)


def lrn_for_onnxruntime(model: onnx.ModelProto, *, prescale: bool = False
                        ) -> onnx.ModelProto:
    """``model`` with every LRN block replaced by the fast exact form above (a new model).

    Args:
        model: a graph holding LRN blocks (the canonical export, possibly already quantized).
        prescale: multiply ``x`` by ``sqrt(alpha/size)`` before squaring, so the square stays
            finite in float16. Defaults to False (float32 needs no pre-scaling).

    Raises:
        ValueError: an LRN input's channel count is unknown after shape inference.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    blocks = lrn_blocks(model)
    inputs = _lrn_inputs(model, [b.x for b in blocks]) if blocks else {}
    # the constants below are float32: a float16 LRN (not made by this project) stays native
    blocks = [b for b in blocks if inputs[b.x][1] == onnx.TensorProto.FLOAT]
    if not blocks:
        return out
    new_nodes, new_inits = [], []

    def add(op: str, inputs: list[str], name: str, **kw) -> str:
        new_nodes.append(helper.make_node(op, inputs, [name], name=name, **kw))
        return name

    def const(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def emit(b: LRNBlock) -> None:
        # tensors are named after the block's output ("lrn1.sq" ...); the last one *is* it
        stem, c = b.output, inputs[b.x][0]
        window_scale = b.alpha / b.size
        xs = b.x
        if prescale:
            xs = add("Mul", [b.x, const(f"{stem}.scale", np.sqrt(window_scale))], f"{stem}.x")
            window_scale = 1.0
        sq = add("Mul", [xs, xs], f"{stem}.sq")
        d = add("Conv", [sq, const(f"{stem}.window.weight",
                                   lrn_window(c, b.groups, b.size, window_scale)),
                         const(f"{stem}.window.bias", np.full(c, b.bias))],
                f"{stem}.window", kernel_shape=[1, 1], group=b.groups)
        if b.beta == 0.75:
            s = add("Sqrt", [d], f"{stem}.sqrt")
            p = add("Mul", [s, add("Sqrt", [s], f"{stem}.qrt")], f"{stem}.pow")
        elif b.beta == 0.5:
            p = add("Sqrt", [d], f"{stem}.pow")
        else:
            p = add("Pow", [d, const(f"{stem}.beta", np.float32(b.beta))], f"{stem}.pow")
        new_nodes.append(helper.make_node("Div", [b.x, p], [b.output], name=stem))

    _splice(model, blocks, new_nodes.append, emit)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    # shapes of the removed tensors (lrnK.t0 ...) would be stale; re-infer them all
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred_value_info(out))
    record_rewrite(out, "lrn_for_onnxruntime" + ("(prescale)" if prescale else ""))
    return out


def _splice(model, blocks: list[LRNBlock], keep, emit) -> None:
    """Walk ``model``'s nodes in order: ``emit(block)`` where a block starts, ``keep(node)`` for
    every node outside the blocks (the nodes of a block are dropped)."""
    first = {b.nodes[0]: b for b in blocks}
    remove = {name for b in blocks for name in b.nodes}
    for node in model.graph.node:
        if node_label(node) in first:
            emit(first[node_label(node)])
        elif node_label(node) not in remove:
            keep(node)


def _lrn_inputs(model, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{tensor: (channels, element type)}`` from the model's shapes (inferred if missing)."""
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    if any(n not in known for n in names):
        known.update({v.name: v for v in inferred_value_info(model)})
    found = {}
    for n in names:
        dims = known[n].type.tensor_type.shape.dim if n in known else []
        if len(dims) < 2 or not dims[1].HasField("dim_value"):
            raise ValueError(f"LRN input {n!r} has no known channel count: run shape inference")
        found[n] = (dims[1].dim_value, known[n].type.tensor_type.elem_type)
    return found


def record_rewrite(model, name: str) -> None:
    """Append ``name`` to the model's list of applied rewrites (metadata ``rewrites``)."""
    set_meta(model, REWRITES, [*applied_rewrites(model), name])


def applied_rewrites(model: onnx.ModelProto) -> list[str]:
    """Names of the rewrites applied to ``model``, in order (empty for the canonical export)."""
    return list(get_meta(model, REWRITES, []))


# ---- per-tower LRN as one op ----------------------------------------------------------------

def lrn_fold_towers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every per-tower LRN block (``Split -> LRN per tower -> Concat``) replaced by
    ``Reshape [N, C, H, W] -> [G*N, C/G, H, W] -> one LRN -> Reshape back`` (a new model).

    Exact: the towers' channels are contiguous, so the reshape stacks each tower as its own
    "image" and the LRN window, which never crosses an image, never crosses a tower boundary --
    the same values as the per-tower LRNs. It removes the ``Split`` / ``Concat`` copies: OpenVINO
    and TensorRT run one native LRN over the whole tensor instead of two plus two copies. The
    reshapes use ``0`` for H and W (copy the input's), so no shape needs to be known. A lone LRN
    (one group) is left as it is.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    blocks = [b for b in lrn_blocks(model) if b.groups > 1]
    if not blocks:
        return out
    channels = _lrn_inputs(model, [b.x for b in blocks])
    nodes, inits = [], []

    def emit(b: LRNBlock) -> None:
        nonlocal nodes, inits
        c, stem = channels[b.x][0], b.output
        inits += [numpy_helper.from_array(np.array([-1, c // b.groups, 0, 0], np.int64),
                                          f"{stem}.towers_shape"),
                  numpy_helper.from_array(np.array([-1, c, 0, 0], np.int64),
                                          f"{stem}.joined_shape")]
        nodes += [
            helper.make_node("Reshape", [b.x, f"{stem}.towers_shape"], [f"{stem}.towers"],
                             name=f"{stem}.towers"),
            helper.make_node("LRN", [f"{stem}.towers"], [f"{stem}.lrn"], name=f"{stem}.lrn",
                             size=b.size, alpha=b.alpha, beta=b.beta, bias=b.bias),
            helper.make_node("Reshape", [f"{stem}.lrn", f"{stem}.joined_shape"], [b.output],
                             name=stem),
        ]

    _splice(model, blocks, nodes.append, emit)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    del out.graph.value_info[:]  # the removed per-tower tensors' shapes would be stale
    record_rewrite(out, "lrn_fold_towers")
    return out


# ---- uint8 NHWC input -----------------------------------------------------------------------

INPUT_FORMATS = ("float32-nchw", "uint8-nhwc")


def uint8_nhwc_input(model: onnx.ModelProto, mean: tuple[float, float, float],
                     std: tuple[float, float, float]) -> onnx.ModelProto:
    """``model`` taking the decoded, cropped image itself: uint8 ``[N, H, W, 3]`` RGB (a new
    model; apply it last, after precision and backend rewrites, which key on tensor names).

    The preprocessing's arithmetic moves into the graph: ``Cast`` to float, ``x * 1/(255 std) -
    mean/std`` per channel as one ``Mul`` and one ``Add`` (channels last), then ``Transpose`` to
    NCHW, feeding the tensor the old input fed (renamed ``<input>.float``). The graph input keeps
    its name. Transposing last lets ONNX Runtime's layout optimizer meet its own NHWC transpose
    of an integer conv1 (measured on the full-size INT8 graph: 10 to 30% faster than transposing
    the uint8 codes first). The values equal :meth:`PreprocessSpec.normalize`'s up to float32 rounding
    (a few ulps; the fold is one multiply-add instead of a multiply, a subtract and a divide).

    Args:
        model: a graph with one float32 NCHW input of 3 channels.
        mean: per-channel mean, on pixels scaled to 0..1.
        std: per-channel standard deviation, > 0.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, found {[i.name for i in inputs]}")
    old = inputs[0]
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ValueError(f"input {old.name!r} is not [N, 3, H, W]")
    name, inner = old.name, f"{old.name}.float"
    for node in graph.node:
        for k, value in enumerate(node.input):
            if value == name:
                node.input[k] = inner
    batch = dims[0].dim_param or dims[0].dim_value
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8,
                                              [batch, dims[2].dim_value, dims[3].dim_value, 3])
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    std64, mean64 = np.asarray(std, np.float64), np.asarray(mean, np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    shift = (-mean64 / std64).astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(scale, f"{name}.scale"),
                              numpy_helper.from_array(shift, f"{name}.shift")])
    prologue = [
        helper.make_node("Cast", [name], [f"{name}.cast"], name=f"{name}.cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}.cast", f"{name}.scale"], [f"{name}.scaled"],
                         name=f"{name}.scaled"),
        helper.make_node("Add", [f"{name}.scaled", f"{name}.shift"], [f"{name}.nhwc"],
                         name=f"{name}.nhwc"),
        helper.make_node("Transpose", [f"{name}.nhwc"], [inner], name=inner, perm=[0, 3, 1, 2]),
    ]
    nodes = prologue + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    record_rewrite(out, "uint8_nhwc_input")
    return out
