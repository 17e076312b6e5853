"""Export: one canonical ONNX graph of a checkpoint (or torchvision weights), checked against PyTorch.

    alexnet-deploy export --checkpoint train/cifar10/best.pt --out model.onnx
    alexnet-deploy export --torchvision-weights alexnet-owt-7be5be79.pth --out tv.onnx
    alexnet-deploy export --checkpoint best.pt --out model.onnx --opset 13 \\
        --parity-data ../shared/data/imagenette_val300 --parity-images 64

Why the graph is written by hand instead of traced
--------------------------------------------------
AlexNet's architecture is fixed and fully known (:mod:`alexnet_deploy.model`), so this module emits
the graph node by node with ``onnx.helper`` from :class:`~alexnet_deploy.model.AlexNetGrouped`'s
weights rather than running ``torch.onnx.export`` and pattern-matching its output back into shape.
``torch.onnx.export`` lowers ``local_response_norm`` into a pad / average-pool / pow / div chain
(13 nodes per LRN with the dynamo exporter, over 60 with the TorchScript one) and leaves
``Shape``/``Gather``/``Identity`` noise and generated names behind; undoing that would mean matching
exporter-version-specific patterns. Writing the graph directly gives exactly what a deployment
engineer would hand-write, deterministically, on every torch version. The *parity check* that runs
after every export (ONNX Runtime vs the PyTorch reference on real images, max abs logit error <=
1e-4 and identical top-1) is what proves the hand-written graph equals the model.

The canonical graph
-------------------
Node names and their output tensor names are the same readable string; calibration caches, QDQ
placement and per-layer reports key on them::

    input [N,3,H,W]
    conv1 relu1 lrn1 pool1                      conv1: 11x11/4, pad 0 (paper) or 2 (torchvision)
    conv2 relu2 lrn2 pool2                      conv2: 5x5 pad 2, group 2 (paper)
    conv3 relu3 conv4 relu4 conv5 relu5 pool5   conv4/5: group 2 (paper)
    [avgpool]                                   only when pool5 is not already 6x6
    flatten fc6 relu6 fc7 relu7 fc8 -> logits [N,classes]

* ``lrnK`` (paper arch only) keeps the per-tower semantics exactly: ``Split`` (node and outputs
  ``lrnK.split``, ``lrnK.t0``/``lrnK.t1``) into the two towers' channels, one native ``LRN`` per
  tower (``lrnK.lrn0``/``lrnK.lrn1``, outputs ``lrnK.t0.out``/``lrnK.t1.out``), ``Concat`` named
  ``lrnK`` producing tensor ``lrnK``. A single LRN over the merged channels would let the 5-channel
  window cross the tower boundary, which the paper's model never does.
* LRN attributes: ``size=5, alpha=5e-4, beta=0.75, bias=2`` (ONNX, like PyTorch, divides alpha by
  size, so this is the paper's alpha=1e-4).
* FC layers are ``Gemm(transB=1)`` on the PyTorch weight as stored; dropout is gone (eval form).
* Weights are initializers named like the ``state_dict`` keys (``conv1.weight``, ``fc8.bias``).
* The last node is ``fc8``; its output tensor is ``logits`` (:data:`metadata.OUTPUT_NAME`).
* Batch is the symbolic dimension ``N``; height and width are fixed by the preprocessing spec.

The adaptive 6x6 average pool before fc6 is omitted when pool5 is already 6x6 (227 px paper,
224 px torchvision). Otherwise it is emitted exactly: an ``AveragePool`` with kernel = stride =
side/6 when pool5's side is a multiple of 6, and for every other side (including sides below 6,
where PyTorch replicates) the pool written as its linear map, ``avgpool.rows @ X @ avgpool.cols``
(two ``MatMul`` nodes with constant bin-averaging matrices, ``avgpool.w`` then ``avgpool``), which
is exactly PyTorch's ``adaptive_avg_pool2d`` bins. No size is refused.

Opset: 17 by default; 13 (per-channel QuantizeLinear for the INT8 stage) up to
:data:`MAX_OPSET`. Backend-specific variants (e.g. a faster LRN form for ONNX Runtime) are produced
from this one graph by :mod:`alexnet_deploy.rewrite`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from alexnet_deploy import __version__
from alexnet_deploy.checkpoint import load_checkpoint, load_torch_file
from alexnet_deploy.data import imagenet1k_classes, iter_batches
from alexnet_deploy.errors import UserError, first_line
from alexnet_deploy.fileio import atomic_path, check_output, check_writable_dir, sha256_file
from alexnet_deploy.metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo, write_model_info
from alexnet_deploy.model import (
    LRN_BETA,
    LRN_K,
    LRN_SIZE,
    POOL_KERNEL,
    POOL_OUT,
    POOL_STRIDE,
    TORCH_LRN_ALPHA,
    AlexNetGrouped,
    count_parameters,
    torchvision_to_grouped,
)
from alexnet_deploy.onnxrt import cpu_session
from alexnet_deploy.preprocess import PreprocessSpec
from alexnet_deploy.quantize import MIN_QDQ_OPSET

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 17
MIN_OPSET = MIN_QDQ_OPSET  # INT8 needs per-channel Q/DQ (LRN itself is opset 1)
MAX_OPSET = 21  # the newest opset this project's exporters and backends are tested at
BATCH_DIM = "N"
# Parity thresholds (issue 3): max |logit difference| and top-1 must agree on every image.
PARITY_MAX_ABS = 1e-4
DEFAULT_PARITY_IMAGES = 32
DEFAULT_PARITY_DATA = "synthetic:test"
TORCHVISION_PREPROCESS = PreprocessSpec(crop=224, resize=256)


# ---------------------------------------------------------------------------------------------
# What to export


@dataclass
class ExportSource:
    """A model ready to export: the PyTorch reference plus what travels with it."""

    model: AlexNetGrouped
    preprocess: PreprocessSpec
    classes: list[str]
    sha256: str
    path: Path
    training_data: dict = field(default_factory=dict)  # Checkpoint.training_data

    def info(self) -> ModelInfo:
        return ModelInfo(preprocess=self.preprocess, classes=list(self.classes),
                         config=self.model.cfg.to_dict(), source_sha256=self.sha256,
                         version=__version__, training_data=dict(self.training_data))


def source_from_checkpoint(path: Path | str) -> ExportSource:
    """The grouped (single-device) eval model of an alexnet-deploy checkpoint."""

    ckpt = load_checkpoint(path)
    if ckpt.preprocess.crop != ckpt.config.image_size:
        raise UserError(f"checkpoint {path}: preprocessing crop {ckpt.preprocess.crop} differs "
                        f"from the model's image_size {ckpt.config.image_size}")
    return ExportSource(model=ckpt.grouped_model(), preprocess=ckpt.preprocess,
                        classes=ckpt.classes, sha256=ckpt.sha256, path=Path(path),
                        training_data=ckpt.training_data)


def source_from_torchvision(path: Path | str) -> ExportSource:
    """A torchvision AlexNet ``state_dict`` file (``torch.save(model.state_dict(), path)``).

    Its preprocessing is torchvision's: resize 256, center crop 224, ImageNet mean/std. Class
    names are the indices ``"0"`` .. ``"999"`` (no name list travels with torchvision weights).
    """

    path = Path(path)
    state = load_torch_file(path, "torchvision weights",
                            missing="pass a file written by "
                                    "torch.save(torchvision.models.alexnet(...).state_dict(), FILE)",
                            corrupt="pass a torchvision AlexNet state_dict file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = " (this looks like an alexnet-deploy checkpoint: use --checkpoint)" if (
            isinstance(state, dict) and "format" in state) else ""
        raise UserError(f"torchvision weights {path} are not a state_dict of tensors{hint}")
    try:
        model = torchvision_to_grouped(state, image_size=TORCHVISION_PREPROCESS.crop)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    n = model.cfg.num_classes
    classes = imagenet1k_classes() if n == 1000 else [str(i) for i in range(n)]
    return ExportSource(model=model.eval(), preprocess=TORCHVISION_PREPROCESS,
                        classes=classes, sha256=sha256_file(path), path=path)


# ---------------------------------------------------------------------------------------------
# The canonical graph


def pool5_size(cfg) -> int:
    """Side of pool5's output for ``cfg`` (6 at 227 px paper / 224 px torchvision)."""
    side = (cfg.image_size + 2 * cfg.conv1_padding - 11) // 4 + 1  # conv1
    for _ in range(3):  # pool1, pool2, pool5 (conv2..conv5 keep the size)
        side = (side - POOL_KERNEL) // POOL_STRIDE + 1
    return side


def adaptive_pool_matrix(size: int, out: int = POOL_OUT) -> np.ndarray:
    """``[out, size]`` matrix averaging PyTorch's adaptive-pool bins (floor/ceil edges)."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class _GraphWriter:
    """Accumulates nodes and initializers. A node is named after its output tensor, except
    inside an LRN block (``lrnK.split``, ``lrnK.lrn0`` ...) and fc8, whose output is ``logits``."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []

    def weight(self, name: str, array: np.ndarray | torch.Tensor) -> str:
        from onnx import numpy_helper

        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None,
             **attrs) -> str:
        from onnx import helper

        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x: str, name: str, layer: torch.nn.Conv2d) -> str:
        k = list(layer.kernel_size)
        p = list(layer.padding) * 2
        return self.node("Conv", [x, self.weight(f"{name}.weight", layer.weight),
                                  self.weight(f"{name}.bias", layer.bias)], name,
                         kernel_shape=k, strides=list(layer.stride), pads=p,
                         group=layer.groups)

    def gemm(self, x: str, name: str, layer: torch.nn.Linear, output: str | None = None) -> str:
        return self.node("Gemm", [x, self.weight(f"{name}.weight", layer.weight),
                                  self.weight(f"{name}.bias", layer.bias)], name,
                         outputs=[output or name], transB=1)

    def maxpool(self, x: str, name: str) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[POOL_KERNEL] * 2,
                         strides=[POOL_STRIDE] * 2)

    def group_lrn(self, x: str, name: str, groups: int) -> str:
        """LRN per channel group: Split -> one LRN per tower -> Concat (named ``name``)."""
        lrn = {"size": LRN_SIZE, "alpha": TORCH_LRN_ALPHA, "beta": LRN_BETA, "bias": LRN_K}
        if groups == 1:
            return self.node("LRN", [x], name, **lrn)
        parts = [f"{name}.t{t}" for t in range(groups)]
        split_attrs = {"axis": 1}
        if self.opset >= 18:  # opset 18 made the number of outputs an explicit attribute
            split_attrs["num_outputs"] = groups
        self.node("Split", [x], f"{name}.split", outputs=parts, **split_attrs)
        normed = [self.node("LRN", [p], f"{name}.lrn{t}", outputs=[f"{p}.out"], **lrn)
                  for t, p in enumerate(parts)]
        return self.node("Concat", normed, name, axis=1)

    def adaptive_pool(self, x: str, side: int) -> str:
        """PyTorch's adaptive 6x6 average pool from ``side`` x ``side``, exactly."""
        if side == POOL_OUT:
            return x
        if side % POOL_OUT == 0:
            k = side // POOL_OUT
            return self.node("AveragePool", [x], "avgpool", kernel_shape=[k, k], strides=[k, k])
        m = adaptive_pool_matrix(side)
        cols = self.node("MatMul", [x, self.weight("avgpool.cols", m.T.copy())], "avgpool.w")
        return self.node("MatMul", [self.weight("avgpool.rows", m), cols], "avgpool")


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                        f"(INT8 needs per-channel QuantizeLinear, opset >= {MIN_OPSET}; "
                        f"default {DEFAULT_OPSET})")


def build_graph(model: AlexNetGrouped, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The canonical ONNX graph of ``model`` (weights copied; see the module docstring).

    Args:
        model: the single-device AlexNet (paper or torchvision arch); its eval form is exported.
        opset: ONNX opset of the default domain. Defaults to 17.
    """
    from onnx import TensorProto, helper

    check_opset(opset)
    cfg = model.cfg
    norm = (lambda x, name: g.group_lrn(x, name, cfg.groups)) if cfg.lrn else (lambda x, _: x)
    g = _GraphWriter(opset)
    x = g.conv(INPUT_NAME, "conv1", model.conv1)
    x = g.maxpool(norm(g.node("Relu", [x], "relu1"), "lrn1"), "pool1")
    x = g.conv(x, "conv2", model.conv2)
    x = g.maxpool(norm(g.node("Relu", [x], "relu2"), "lrn2"), "pool2")
    for i in (3, 4, 5):
        x = g.node("Relu", [g.conv(x, f"conv{i}", getattr(model, f"conv{i}"))], f"relu{i}")
    x = g.adaptive_pool(g.maxpool(x, "pool5"), pool5_size(cfg))
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.node("Relu", [g.gemm(x, "fc6", model.fc6)], "relu6")
    x = g.node("Relu", [g.gemm(x, "fc7", model.fc7)], "relu7")
    g.gemm(x, "fc8", model.fc8, output=OUTPUT_NAME)

    side = cfg.image_size
    graph = helper.make_graph(
        g.nodes, f"alexnet_{cfg.arch}",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                              [BATCH_DIM, 3, side, side])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                               [BATCH_DIM, cfg.num_classes])],
        initializer=g.initializers,
    )
    opset_ids = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(graph, opset_imports=opset_ids, producer_name="alexnet-deploy",
                                   producer_version=__version__,
                                   doc_string=f"AlexNet ({cfg.arch}), canonical export")
    # The oldest IR version that can carry this opset: loads on the widest range of runtimes.
    onnx_model.ir_version = helper.find_min_ir_version_for(opset_ids)
    return onnx_model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every intermediate tensor's shape filled in (strict: errors raise)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        raise UserError(f"ONNX shape inference failed on the exported graph: {first_line(e)}") \
            from e


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch reference


@dataclass
class ParityReport:
    """ONNX Runtime (CPU) vs PyTorch on the same images.

    ``max_abs``/``mean_abs``: absolute logit difference over all images and classes;
    ``top1_agree``: images whose arg-max class is the same in both.
    """

    num_images: int
    max_abs: float
    mean_abs: float
    top1_agree: int
    source: str = ""
    max_allowed: float = PARITY_MAX_ABS
    disagree_margin: float = 0.0  # largest reference logit gap between the two top-1 choices

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.max_allowed and self.top1_agree == self.num_images

    def summary(self) -> str:
        text = (f"{self.num_images} images from {self.source}: max |dlogit| {self.max_abs:.2e} "
                f"(limit {self.max_allowed:g}), mean {self.mean_abs:.2e}, top-1 agreement "
                f"{self.top1_agree}/{self.num_images} (ONNX Runtime CPU vs PyTorch)")
        if self.top1_agree < self.num_images:
            text += (f"; where top-1 differs, the reference's own gap between the two classes "
                     f"is at most {self.disagree_margin:.2e}")
        return text


def ort_session(model: onnx.ModelProto | str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session (all graph optimizations on) for a model or a path."""
    return cpu_session(model, threads, what="the exported model")


def check_parity(onnx_model: onnx.ModelProto | str | Path, reference: torch.nn.Module,
                 images: np.ndarray, source: str = "", max_abs: float = PARITY_MAX_ABS,
                 batch_size: int = 32) -> ParityReport:
    """Run ``onnx_model`` on ONNX Runtime CPU and ``reference`` (eval) on the same ``images``.

    Args:
        onnx_model: the exported model, in memory or as a path.
        reference: the PyTorch model it was exported from.
        images: float32 ``[N, 3, H, W]`` preprocessed images.
        source: where the images came from (for the report).
        max_abs: largest tolerated absolute logit difference. Defaults to 1e-4.
        batch_size: images per inference call. Defaults to 32.
    """
    session = ort_session(onnx_model)
    reference = reference.eval()
    ours, theirs = [], []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[lo:lo + batch_size], np.float32)
            ours.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
            theirs.append(reference(torch.from_numpy(batch)).numpy())
    a, b = np.concatenate(ours), np.concatenate(theirs)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    top_a, top_b = a.argmax(1), b.argmax(1)
    rows = np.flatnonzero(top_a != top_b)
    margin = float((b[rows, top_b[rows]] - b[rows, top_a[rows]]).max()) if len(rows) else 0.0
    return ParityReport(num_images=len(images), max_abs=float(diff.max()),
                        mean_abs=float(diff.mean()), top1_agree=len(images) - len(rows),
                        source=source, max_allowed=max_abs, disagree_margin=margin)


def load_parity_images(source: str | Path, spec: PreprocessSpec, count: int) -> np.ndarray:
    """``count`` real images from ``source`` (an image folder, an ``.npz`` or ``synthetic:test``),
    preprocessed by ``spec``: float32 ``[n, 3, crop, crop]``. A seeded random subset, so a
    class-sorted folder still contributes several classes."""

    batches = [b.images for b in iter_batches(source, spec, batch_size=count, limit=count,
                                              seed=0, workers=0)]
    if not batches or not sum(len(b) for b in batches):
        raise UserError(f"parity data {source}: no readable image")
    return np.concatenate(batches).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# The export command


@dataclass
class ExportResult:
    """What :func:`export` wrote: the file, its graph in numbers, and the parity report."""

    path: Path
    opset: int
    num_parameters: int
    size_bytes: int
    sha256: str
    op_counts: dict[str, int]
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    parity: ParityReport | None = None

    def summary(self) -> str:
        def io_line(kind, items):
            return "\n".join(f"  {kind:<7} {name} float32 [{', '.join(map(str, shape))}]"
                             for name, shape in items)

        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items()))
        lines = [f"wrote {self.path} (opset {self.opset})",
                 io_line("input", self.inputs), io_line("output", self.outputs),
                 f"  ops     {ops} ({sum(self.op_counts.values())} nodes)",
                 f"  params  {self.num_parameters:,}",
                 f"  size    {self.size_bytes / 1e6:.1f} MB",
                 f"  sha256  {self.sha256}"]
        if self.parity:
            lines.append(f"  parity  {self.parity.summary()}")
        return "\n".join(lines)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def _value_shapes(values) -> list[tuple[str, list]]:
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values]


def _check_file(path: Path) -> None:
    """``onnx.checker`` full check (types and shapes too) of the file at ``path``."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"onnx.checker rejected the exported graph: {first_line(e)}") from e


def export(source: ExportSource, out: Path | str, *, opset: int = DEFAULT_OPSET,
           parity_images: np.ndarray | None = None, parity_source: str = "",
           max_abs: float = PARITY_MAX_ABS) -> ExportResult:
    """Write ``source``'s canonical ONNX graph to ``out`` atomically, checked and parity-tested.

    The file is checked (``onnx.checker`` full check, strict shape inference) and, when
    ``parity_images`` is given, run against the PyTorch reference *before* it is renamed onto
    ``out``: a model that fails any check is never left behind.

    Args:
        source: the model and its metadata (:func:`source_from_checkpoint`,
            :func:`source_from_torchvision`).
        out: the ``.onnx`` path to write.
        opset: ONNX opset. Defaults to 17.
        parity_images: float32 ``[N, 3, H, W]`` preprocessed real images; None skips parity.
        parity_source: where they came from (for the report).
        max_abs: parity's largest tolerated absolute logit difference. Defaults to 1e-4.
    """
    import onnx

    check_opset(opset)
    out = Path(out)
    check_writable_dir(out)
    model = build_graph(source.model, opset)
    write_model_info(model, source.info())
    model = infer_shapes(model)
    try:
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
            _check_file(tmp)
            parity = None
            if parity_images is not None:
                parity = check_parity(tmp, source.model, parity_images, parity_source, max_abs)
                if not parity.passed:
                    raise UserError(f"parity check failed, {out} not written: {parity.summary()}")
            size, digest = tmp.stat().st_size, sha256_file(tmp)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}: choose another --out") from e
    return ExportResult(path=out, opset=opset, num_parameters=count_parameters(source.model),
                        size_bytes=size, sha256=digest, op_counts=op_counts(model),
                        inputs=_value_shapes(model.graph.input),
                        outputs=_value_shapes(model.graph.output), parity=parity)


def run_export(out: Path | str, *, checkpoint: Path | str | None = None,
               torchvision_weights: Path | str | None = None, opset: int = DEFAULT_OPSET,
               parity_data: str | None = None, parity_images: int = DEFAULT_PARITY_IMAGES
               ) -> ExportResult:
    """What ``alexnet-deploy export`` does: load, export, check, parity-test on real images."""
    if (checkpoint is None) == (torchvision_weights is None):
        raise UserError("pass exactly one of --checkpoint FILE and --torchvision-weights FILE")
    if parity_images < 1:
        raise UserError(f"--parity-images must be >= 1, got {parity_images}")
    check_opset(opset)
    # before the slow part: fail fast on an --out that cannot or must not be written
    check_output(out, "--out", "onnx", inputs={"--checkpoint": checkpoint,
                                               "--torchvision-weights": torchvision_weights,
                                               "--parity-data": parity_data})
    source = (source_from_checkpoint(checkpoint) if checkpoint is not None
              else source_from_torchvision(torchvision_weights))
    data = parity_data or DEFAULT_PARITY_DATA
    images = load_parity_images(data, source.preprocess, parity_images)
    return export(source, out, opset=opset, parity_images=images, parity_source=str(data))
