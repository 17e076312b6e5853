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
A graph rewritten first is still recognised by :func:`alexnet_deploy.quantize.lrn_regions`
(``Mul(x, x)`` ... ``Div(x, .)``) in the default form; the ``prescale`` form is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alexnet_deploy.graph import inferred_value_info, lrn_blocks, node_label
from alexnet_deploy.metadata import REWRITES, get_meta, set_meta

if TYPE_CHECKING:
    import onnx



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
    remove = {name for b in blocks for name in b.nodes}
    first = {b.nodes[0]: b for b in blocks}
    new_nodes, new_inits = [], []

    def add(op: str, inputs: list[str], name: str, **kw) -> str:
        new_nodes.append(helper.make_node(op, inputs, [name], name=name, **kw))
        return name

    def const(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    for node in model.graph.node:
        b = first.get(node_label(node))
        if b is None:
            if node_label(node) not in remove:
                new_nodes.append(node)
            continue
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

    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    # shapes of the removed tensors (lrnK.t0 ...) would be stale; re-infer them all
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred_value_info(out))
    record_rewrite(out, "lrn_for_onnxruntime" + ("(prescale)" if prescale else ""))
    return out


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
