"""Exact BackSelect candidates, computed from what masking one more pixel changes.

Every candidate of a backward-selection step is the step's current image with one more pixel masked, so in
each layer only the activations inside that pixel's receptive-field cone differ from the current image's.
:class:`IncrementalForward` traces the model (``torch.fx``), caches every layer's output for the current image
of each active slot (once per step), and for a batch of candidates recomputes only a fixed-size window
around each cone, reading everything outside the window from the cache. A global average pool becomes the
cached sum plus (new window sum - old window sum). Convolutions (any stride, padding, dilation, groups),
max/average pooling, eval-mode batch norm, activations, residual additions and strided (option-A) shortcuts
are local; from the first operation that is not (a global op such as squeeze-excitation or spatial
normalisation), or where the window would cover most of a layer's map, the candidates are computed in full.
It is the same function, not an approximation: only the rounding of the window convolutions differs.

Exact ties: a candidate whose window inputs equal the cache bitwise takes the cached outputs (and outputs that
come out bitwise equal to the cache count as unchanged), so a pixel that the model ignores leaves f exactly as
it is, and such candidates tie exactly, as they do with full forwards.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.shape_prop import ShapeProp

POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                     nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
                     nn.Dropout2d)
POINTWISE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv,
                       operator.neg, torch.add, torch.sub, torch.mul, torch.relu, torch.sigmoid, torch.tanh,
                       torch.clamp, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
                       F.hardsigmoid, F.hardtanh, F.softplus}
POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "sub", "mul", "mul_", "div", "clamp",
                     "contiguous"}
# Operations after which a changed input can come out exactly unchanged (clipped, multiplied by 0, not the max).
ZEROING_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d)
ZEROING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, operator.mul, operator.imul, torch.mul}
ZEROING_METHODS = {"relu", "relu_", "clamp", "mul", "mul_"}
# Compare windows with the cache only while they are this small: a change vanishes exactly near its pixel if
# at all, and comparing larger windows costs more than it finds.
COMPARE_UP_TO = 49
EVALUATORS = ("auto", "incremental", "full")


class Unsupported(Exception):
    """The model cannot be evaluated incrementally (the message says why)."""


# ----------------------------------------------------------------------------------------------------------
# What each node of the traced graph is


@dataclass(frozen=True)
class _Local:
    """A spatially local operation: ``kernel``/``stride``/``padding``/``dilation`` per axis (rows, cols)."""

    kind: str  # "conv", "pool", "subsample" or "pointwise"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise Unsupported("asymmetric 'same' padding")
        return tuple(t // 2 for t in total)
    return _pair(module.padding)


def _is_subsample(index) -> tuple[int, int] | None:
    """The strides of ``x[:, :, ::s, ::t]`` (or ``x[..., ::s, ::t]``); None for any other index."""
    if not isinstance(index, tuple):
        return None
    if index[:1] == (Ellipsis,):
        index = (slice(None), slice(None), *index[1:])
    if len(index) != 4 or any(not isinstance(i, slice) for i in index):
        return None
    if any(i != slice(None) for i in index[:2]) or any(i.start not in (None, 0) or i.stop is not None for i in index[2:]):
        return None
    return tuple(i.step or 1 for i in index[2:])


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> _Local | str | None:
    """_Local for a local operation, "global_pool" for a global average pool, None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            return _Local("conv", module.kernel_size, module.stride, _conv_padding(module), module.dilation)
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and _pair(module.padding) == (0, 0) \
                and not module.ceil_mode and not getattr(module, "return_indices", False):
            stride = module.stride if module.stride is not None else module.kernel_size
            dilation = getattr(module, "dilation", 1)
            return _Local("pool", _pair(module.kernel_size), _pair(stride), (0, 0), _pair(dilation))
        if isinstance(module, nn.BatchNorm2d) and not module.training and module.running_mean is not None:
            return _Local("pointwise")
        if isinstance(module, POINTWISE_MODULES):
            return _Local("pointwise")
        if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
            return "global_pool"
        return None
    if node.op == "call_function":
        if node.target in POINTWISE_FUNCTIONS:
            return _Local("pointwise")
        if node.target is F.dropout and not node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
            return _Local("pointwise")
        if node.target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            if mode == "constant" and len(pad) == 6 and not any(pad[:4]):  # channels only
                return _Local("pointwise")
            return None
        if node.target is F.adaptive_avg_pool2d and _pair(node.args[1]) == (1, 1):
            return "global_pool"
        if node.target is operator.getitem:
            strides = _is_subsample(node.args[1])
            return _Local("subsample", stride=strides) if strides else None
        if node.target is torch.mean and _spatial_dims(node.args[1:2] or (node.kwargs.get("dim"),)):
            return "global_pool"
        return None
    if node.op == "call_method":
        if node.target in POINTWISE_METHODS:
            return _Local("pointwise")
        if node.target == "mean" and _spatial_dims(node.args[1:2] or (node.kwargs.get("dim"),)):
            return "global_pool"
    return None


def _can_zero(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], ZEROING_MODULES)
    if node.op == "call_function":
        return node.target in ZEROING_FUNCTIONS
    return node.op == "call_method" and node.target in ZEROING_METHODS


def _spatial_dims(dims) -> bool:
    dims = dims[0] if dims else None
    return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


# ----------------------------------------------------------------------------------------------------------
# Window geometry, one spatial axis at a time


@dataclass
class _Axis:
    """A node's map along one axis: for each input coordinate x, the changed region [lo[x], hi[x]) and the
    window [start[x], start[x] + window) that contains it."""

    size: int
    lo: np.ndarray
    hi: np.ndarray
    window: int = field(init=False)
    start: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lo = np.clip(self.lo, 0, self.size - 1)
        self.hi = np.clip(np.maximum(self.hi, self.lo + 1), 1, self.size)  # an empty region: one place, kept
        self.window = int((self.hi - self.lo).max())
        self.start = np.minimum(self.lo, self.size - self.window)


def _local_axis(source: _Axis, op: _Local, axis: int, size: int) -> _Axis:
    k, s, p, d = op.kernel[axis], op.stride[axis], op.padding[axis], op.dilation[axis]
    if op.kind == "pointwise":
        return _Axis(size, source.lo.copy(), source.hi.copy())
    if op.kind == "subsample":
        return _Axis(size, -(-source.lo // s), (source.hi - 1) // s + 1)
    return _Axis(size, -(-(source.lo + p - (k - 1) * d) // s), (source.hi - 1 + p) // s + 1)


def _read_start(consumer: _Axis, op: _Local | None, axis: int) -> tuple[np.ndarray, int]:
    """Where (per input coordinate) and how long the consumer reads its input along ``axis``."""
    if op is None:  # the whole map (a full-mode consumer)
        return np.zeros_like(consumer.start), consumer.size
    k, s, p, d = op.kernel[axis], op.stride[axis], op.padding[axis], op.dilation[axis]
    if op.kind == "pointwise":
        return consumer.start, consumer.window
    if op.kind == "subsample":
        return consumer.start * s, (consumer.window - 1) * s + 1
    return consumer.start * s - p, (consumer.window - 1) * s + (k - 1) * d + 1


@dataclass
class _Read:
    """How one node reads one of its window inputs: start per input row/col and the region's size."""

    producer: fx.Node
    rows: torch.Tensor
    cols: torch.Tensor
    height: int
    width: int
    passthrough: bool  # the region is the producer's own window and nothing else reads it


@dataclass
class _Plan:
    state: str  # "const", "window" or "full"
    op: _Local | str | None = None
    rows: _Axis | None = None
    cols: _Axis | None = None
    reads: dict = field(default_factory=dict)  # producer node -> _Read
    value: object = None  # constants: their value
    starts: tuple | None = None  # windows: (row start, col start) per input coordinate, on the device
    zeroing: bool = False  # compare its windows with the cache: a change may vanish here


class IncrementalForward:
    """``logits(slots, rows, cols)``: the model's output for each candidate, the current image of slot
    ``slots[i]`` with pixel (``rows[i]``, ``cols[i]``) set to ``baseline``, from per-slot caches that
    :meth:`refresh` fills with the current images. Raises :class:`Unsupported` if the model cannot be traced
    or nothing in it is local.

    ``full_above``: a layer whose window would cover more than this share of its map is computed in full,
    and so is everything after it (cheaper there than windows with their gathers).
    """

    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int], baseline: float,
                 dtype: torch.dtype, device: torch.device, full_above: float = 0.7):
        try:  # eval batch norm folded into the convolution before it: one op per layer on the windows
            self.graph_module = fuse(fx.symbolic_trace(model), no_trace=True)
        except Exception as err:  # fx raises many types for code it cannot trace
            raise Unsupported(f"the model cannot be traced ({type(err).__name__}: {str(err).splitlines()[0]})")
        self.modules = dict(self.graph_module.named_modules())
        self.channels, self.height, self.width = image_shape
        self.baseline, self.dtype, self.device = baseline, dtype, device
        probe = torch.zeros(1, *image_shape, dtype=dtype, device=device)
        with torch.inference_mode():
            ShapeProp(self.graph_module).propagate(probe)
        self.nodes = list(self.graph_module.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise Unsupported(f"the model takes {len(placeholders)} inputs, not one image batch")
        self.input = placeholders[0]
        self.plans: dict[fx.Node, _Plan] = {}
        for node in self.nodes:
            self.plans[node] = self._plan(node, full_above)
        output = self.nodes[-1]
        if not isinstance(output.args[0], fx.Node):
            raise Unsupported("the model returns more than one tensor")
        if self.plans[output.args[0]].state != "full":
            raise Unsupported("the model's output is not computed from a global pool or a full layer")
        for plan in self.plans.values():
            if plan.state == "window":
                plan.starts = (self._device_index(plan.rows.start), self._device_index(plan.cols.start))
        self._plan_reads()
        self.window_nodes = [n for n in self.nodes if self.plans[n].state == "window"]
        if self.window_nodes == [self.input]:
            raise Unsupported("no layer of it is local (its first operation already looks at the whole image)")
        for node in self.window_nodes:
            plan = self.plans[node]
            plan.zeroing = node.op == "placeholder" or (_can_zero(node, self.modules)
                                                        and plan.rows.window * plan.cols.window <= COMPARE_UP_TO)
        self.pool_nodes = [n for n in self.nodes if self.plans[n].op == "global_pool"
                           and self.plans[n].state == "full"
                           and any(self.plans[m].state == "window" for m in n.all_input_nodes)]
        self.capacity = 0
        self.caches: dict[fx.Node, torch.Tensor] = {}  # (slots, H + 2 pad, W + 2 pad, C), zero padding
        self.sums: dict[fx.Node, torch.Tensor] = {}  # global pools: (slots, C) sums of their input map
        self.outputs: torch.Tensor | None = None  # (slots, *output shape): the current images' output
        self.padding: dict[fx.Node, int] = {}
        self._padding()
        # The longest read or window along an axis: maps only shrink here, and reads reach past them by padding.
        self.extent = max(self.height, self.width) + 2 * max(self.padding.values())
        self.gain = self._estimated_gain()

    # -------------------------------------------------------------------------------------------- planning
    def _shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _plan(self, node: fx.Node, full_above: float) -> _Plan:
        if node.op == "placeholder":
            return _Plan("window", _Local("pointwise"), _Axis(self.height, np.arange(self.height), np.arange(1, self.height + 1)),
                         _Axis(self.width, np.arange(self.width), np.arange(1, self.width + 1)))
        if node.op == "output":
            return _Plan("full")
        inputs = node.all_input_nodes
        states = {self.plans[m].state for m in inputs}
        if node.op == "get_attr" or states <= {"const"}:
            return _Plan("const", value=self._run(node, lambda m: self.plans[m].value))
        if node.op == "call_function" and node.target is getattr and node.args[1] in ("dtype", "device"):
            return _Plan("const", value=self.dtype if node.args[1] == "dtype" else self.device)
        if "full" in states:
            return _Plan("full")
        op = _classify(node, self.modules)
        windows = [m for m in inputs if self.plans[m].state == "window"]
        shape = self._shape(node)
        if op == "global_pool" and len(windows) == 1:
            return _Plan("full", op)
        if not isinstance(op, _Local) or shape is None or len(shape) != 4:
            return _Plan("full")
        sizes = {self._shape(m)[2:] for m in windows}
        if op.kind != "pointwise" and len(windows) != 1 or len(sizes) != 1:
            return _Plan("full")
        if op.kind == "pointwise" and not all(self._broadcasts(a, shape) for a in self._const_tensors(node)):
            return _Plan("full")
        rows = self._union([_local_axis(self.plans[m].rows, op, 0, shape[2]) for m in windows])
        cols = self._union([_local_axis(self.plans[m].cols, op, 1, shape[3]) for m in windows])
        if rows.window * cols.window > full_above * shape[2] * shape[3]:
            return _Plan("full")
        return _Plan("window", op, rows, cols)

    @staticmethod
    def _union(axes: list[_Axis]) -> _Axis:
        return _Axis(axes[0].size, np.min([a.lo for a in axes], 0), np.max([a.hi for a in axes], 0))

    def _const_tensors(self, node: fx.Node) -> list[torch.Tensor]:
        return [self.plans[m].value for m in node.all_input_nodes
                if self.plans[m].state == "const" and isinstance(self.plans[m].value, torch.Tensor)]

    @staticmethod
    def _broadcasts(const: torch.Tensor, shape: tuple[int, ...]) -> bool:
        """A constant operand of a pointwise op that windows can take: no batch dimension, and spatial
        dimensions of 1 or of the whole map (then it is cut to the window)."""
        if const.ndim > 4 or (const.ndim == 4 and const.shape[0] != 1):
            return False
        spatial = tuple(const.shape[-2:]) if const.ndim >= 2 else ()
        return all(s == 1 for s in spatial) or spatial == tuple(shape[2:])

    def _plan_reads(self) -> None:
        users = {n: len(n.users) for n in self.nodes}
        for node in self.nodes:
            plan = self.plans[node]
            if plan.state == "const" or node.op == "placeholder":
                continue
            for producer in node.all_input_nodes:
                source = self.plans[producer]
                if source.state != "window":
                    continue
                if plan.state == "window":
                    op, consumer = plan.op, plan
                else:  # a full-mode consumer reads the whole map; a global pool its producer's window
                    op, consumer = (_Local("pointwise"), source) if plan.op == "global_pool" else (None, source)
                rows, height = _read_start(consumer.rows, op, 0)
                cols, width = _read_start(consumer.cols, op, 1)
                same = (plan.state == "window" and op.kind == "pointwise" and height == source.rows.window
                        and width == source.cols.window and np.array_equal(rows, source.rows.start)
                        and np.array_equal(cols, source.cols.start) and producer.op != "placeholder")
                plan.reads[producer] = _Read(producer, self._device_index(rows), self._device_index(cols), height,
                                             width, same and users[producer] == 1)

    def _padding(self) -> None:
        """Zero padding of each cached map: as far as any read reaches outside it."""
        for node in self.window_nodes:  # the input among them
            self.padding[node] = 0
        for node in self.nodes:
            for read in self.plans[node].reads.values():
                plan = self.plans[read.producer]
                top = max(0, -int(read.rows.min()))
                left = max(0, -int(read.cols.min()))
                bottom = max(0, int(read.rows.max()) + read.height - plan.rows.size)
                right = max(0, int(read.cols.max()) + read.width - plan.cols.size)
                self.padding[read.producer] = max(self.padding[read.producer], top, bottom, left, right)

    def _estimated_gain(self) -> float:
        """Full-forward cost over incremental cost, counting multiply-adds of every layer on a map."""
        full = incremental = 0.0
        for node in self.nodes:
            shape = self._shape(node)
            if shape is None or len(shape) != 4 or self.plans[node].state == "const":
                continue
            per_position = shape[1]
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.Conv2d):
                conv = self.modules[node.target]
                per_position *= conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            plan = self.plans[node]
            area = shape[2] * shape[3]
            full += per_position * area
            incremental += per_position * (plan.rows.window * plan.cols.window if plan.state == "window" else area)
        return full / max(incremental, 1.0)

    def _device_index(self, values: np.ndarray) -> torch.Tensor:
        # int32: the index arithmetic of every read runs on (candidates, h, w) grids of these
        return torch.as_tensor(np.asarray(values, dtype=np.int32), device=self.device)

    # -------------------------------------------------------------------------------------------- running
    def _run(self, node: fx.Node, value_of):
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.graph_module
            for name in node.target.split("."):
                value = getattr(value, name)
            return value
        raise Unsupported(f"graph node {node.op}")

    def ensure_capacity(self, capacity: int) -> None:
        """Room for ``capacity`` slots (their caches start empty: :meth:`refresh` before use)."""
        if capacity <= self.capacity:
            return
        for node, pad in self.padding.items():
            shape = self._shape(node)
            fresh = torch.zeros(capacity - self.capacity, shape[2] + 2 * pad, shape[3] + 2 * pad, shape[1],
                                dtype=self.dtype, device=self.device)
            old = self.caches.get(node)
            self.caches[node] = fresh if old is None else torch.cat([old, fresh])
        for node in self.pool_nodes:
            (source,) = self.plans[node].reads
            fresh = torch.zeros(capacity - self.capacity, self._shape(source)[1], dtype=self.dtype, device=self.device)
            old = self.sums.get(node)
            self.sums[node] = fresh if old is None else torch.cat([old, fresh])
        fresh = torch.zeros(capacity - self.capacity, *self._shape(self.nodes[-1].args[0])[1:], dtype=self.dtype,
                            device=self.device)
        self.outputs = fresh if self.outputs is None else torch.cat([self.outputs, fresh])
        self.capacity = capacity

    def refresh(self, slots: torch.Tensor, images: torch.Tensor) -> None:
        """Cache every layer of the current ``images`` (N, C, H, W) for ``slots`` (N,)."""
        values = {}
        for node in self.nodes:
            if node.op == "output":
                self.outputs[slots] = values[node.args[0]]
                break
            plan = self.plans[node]
            if plan.state == "const":
                values[node] = plan.value
                continue
            values[node] = images if node.op == "placeholder" else self._run(node, values.__getitem__)
            if node in self.padding:
                pad = self.padding[node]
                shape = self._shape(node)
                self.caches[node][slots, pad:pad + shape[2], pad:pad + shape[3]] = values[node].permute(0, 2, 3, 1)
            if node in self.sums:  # from the cache: a later in-place op cannot have touched it
                (source,) = self.plans[node].reads
                pad, shape = self.padding[source], self._shape(source)
                self.sums[node][slots] = self.caches[source][slots, pad:pad + shape[2], pad:pad + shape[3]].sum((1, 2))

    def _cache_rows(self, node: fx.Node, slots, top, left) -> tuple[torch.Tensor, torch.Tensor]:
        """Row numbers in ``caches[node].view(-1, C)`` of map positions ``top`` (B, h) x ``left`` (B, w), as a
        row part (B, h, 1) and a column part (1 or B, 1, w) to add."""
        pad = self.padding[node]
        _, height, width, _ = self.caches[node].shape
        return ((slots.view(-1, 1) * height + top + pad) * width).unsqueeze(2), (left + pad).unsqueeze(1)

    def _read(self, read: _Read, slots, rows, cols, windows, arange) -> torch.Tensor:
        """(B, C, h, w) input region of each candidate: its new window where it has one, the cache elsewhere,
        gathered by one index_select from the cache and the new windows laid end to end."""
        if read.passthrough:
            return windows[read.producer]
        plan = self.plans[read.producer]
        cache = self.caches[read.producer]
        channels = cache.shape[3]
        top = read.rows[rows].unsqueeze(1) + arange[:read.height]
        left = read.cols[cols].unsqueeze(1) + arange[:read.width]
        in_row = top - plan.starts[0][rows].unsqueeze(1)
        in_col = left - plan.starts[1][cols].unsqueeze(1)
        inside = ((in_row >= 0) & (in_row < plan.rows.window)).unsqueeze(2) \
            & ((in_col >= 0) & (in_col < plan.cols.window)).unsqueeze(1)
        first_new = cache.numel() // channels + arange[:len(slots)].view(-1, 1) * (plan.rows.window * plan.cols.window)
        cache_rows, cache_cols = self._cache_rows(read.producer, slots, top, left)
        index = torch.where(inside, (first_new + in_row * plan.cols.window).unsqueeze(2) + in_col.unsqueeze(1),
                            cache_rows + cache_cols)
        new = windows[read.producer].permute(0, 2, 3, 1).reshape(-1, channels)
        source = torch.cat([cache.view(-1, channels), new])
        return source.index_select(0, index.view(-1)).view(len(slots), read.height, read.width, channels).permute(0, 3, 1, 2)

    def _cached_window(self, node: fx.Node, slots, rows, cols, arange) -> torch.Tensor:
        """(B, C, h, w): the cache of ``node`` at each candidate's window of it."""
        plan = self.plans[node]
        cache = self.caches[node]
        top = plan.starts[0][rows].unsqueeze(1) + arange[:plan.rows.window]
        left = plan.starts[1][cols].unsqueeze(1) + arange[:plan.cols.window]
        cache_rows, cache_cols = self._cache_rows(node, slots, top, left)
        return (cache.view(-1, cache.shape[3]).index_select(0, (cache_rows + cache_cols).view(-1))
                .view(len(slots), plan.rows.window, plan.cols.window, -1).permute(0, 3, 1, 2))

    def _window_op(self, node: fx.Node, inputs: dict, rows, cols) -> torch.Tensor:
        plan = self.plans[node]
        op = plan.op
        if op.kind in ("conv", "pool") and node.op == "call_module":
            (x,) = inputs.values()
            module = self.modules[node.target]
            if isinstance(module, nn.Conv2d):
                return F.conv2d(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
            if isinstance(module, nn.MaxPool2d):
                return F.max_pool2d(x, module.kernel_size, module.stride, 0, module.dilation)
            return F.avg_pool2d(x, module.kernel_size, module.stride, 0, divisor_override=module.divisor_override)

        def value_of(m):
            if m in inputs:
                return inputs[m]
            value = self.plans[m].value
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[-2:] != (1, 1):
                return self._const_window(value, node, rows, cols)
            return value

        return self._run(node, value_of)

    def _const_window(self, value: torch.Tensor, node: fx.Node, rows, cols) -> torch.Tensor:
        """A constant with the map's spatial size, cut to each candidate's window of ``node``."""
        plan = self.plans[node]
        start_row, start_col = plan.starts
        top = start_row[rows].unsqueeze(1) + torch.arange(plan.rows.window, device=self.device)
        left = start_col[cols].unsqueeze(1) + torch.arange(plan.cols.window, device=self.device)
        value = value.reshape(-1, *value.shape[-2:]).to(self.device)  # (C or 1, H, W)
        return value[:, top.unsqueeze(2), left.unsqueeze(1)].permute(1, 0, 2, 3)

    def logits(self, slots: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The model's output for every candidate: slot ``slots[i]``'s current image with ``pixels[i]`` masked.

        ``changed[node]`` says, per candidate, whether the node's value may differ from the cache; where a
        change vanished (an input pixel already at the baseline, a ReLU clipping it, a product with 0), the
        output is the current image's, exactly, as a full forward gives it."""
        slots, pixels = slots.int(), pixels.int()
        rows, cols = pixels // self.width, pixels % self.width
        n = len(slots)
        arange = torch.arange(max(n, self.extent), dtype=torch.int32, device=self.device)
        materialised: dict[fx.Node, torch.Tensor] = {}  # whole maps, shared by the full-mode consumers
        windows: dict[fx.Node, torch.Tensor] = {}
        changed: dict[fx.Node, torch.Tensor] = {}
        values: dict[fx.Node, object] = {}
        for node in self.nodes:
            plan = self.plans[node]
            inputs = [changed[m] for m in node.all_input_nodes if m in changed]
            moved = inputs[0] if len(inputs) == 1 else torch.stack(inputs).any(0) if inputs else None
            if plan.state == "const":
                values[node] = plan.value
                continue
            if node.op == "placeholder":
                windows[node] = torch.full((n, self.channels, 1, 1), self.baseline, dtype=self.dtype, device=self.device)
                moved = torch.ones(n, dtype=torch.bool, device=self.device)
            elif node.op == "output":
                logits = values[node.args[0]]
                return torch.where(moved.view(-1, *[1] * (logits.ndim - 1)), logits, self.outputs[slots.long()])
            elif plan.state == "window":
                reads = {m: self._read(read, slots, rows, cols, windows, arange) for m, read in plan.reads.items()}
                windows[node] = self._window_op(node, reads, rows, cols)
            elif plan.op == "global_pool" and node in self.sums:
                (source,) = plan.reads
                new = windows[source].permute(0, 2, 3, 1).sum((1, 2))
                old = self._cached_window(source, slots, rows, cols, arange).permute(0, 2, 3, 1).sum((1, 2))
                shape = self._shape(source)
                mean = (self.sums[node][slots.long()] + (new - old)) / (shape[2] * shape[3])
                values[node] = mean.view(n, *self._shape(node)[1:])
            else:
                for m, read in plan.reads.items():
                    if m not in materialised:
                        materialised[m] = self._read(read, slots, rows, cols, windows, arange)
                values[node] = self._run(node, lambda m: materialised[m] if m in materialised else values[m])
            if plan.zeroing:
                old = self._cached_window(node, slots, rows, cols, arange)
                moved = moved & (windows[node] != old).flatten(1).any(1)
            changed[node] = moved
        raise AssertionError("the traced graph has no output node")


def build(model: nn.Module, image_shape: tuple[int, int, int], baseline: float, dtype: torch.dtype,
          device: torch.device, evaluator: str = "auto") -> tuple[IncrementalForward | None, str]:
    """The incremental evaluator for ``model`` (None where it is not to be used) and why.

    ``evaluator``: "incremental" (an error if the model is not supported), "full" (plain forwards: None) or
    "auto" (the evaluator if the model is supported and passes a self-check against full forwards; the engine
    then measures which of the two is faster).
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}, not {evaluator!r}")
    if evaluator == "full":
        return None, "full forwards (asked for)"
    try:
        forward = IncrementalForward(model, image_shape, baseline, dtype, device)
        _self_check(model, forward)
    except Unsupported as err:
        if evaluator == "incremental":
            raise ValueError(f"the incremental evaluator does not support this model: {err}; use full forwards") from None
        return None, f"full forwards ({err})"
    return forward, f"incremental (estimated {forward.gain:.2f}x less work than full forwards)"


@torch.inference_mode()
def _self_check(model: nn.Module, forward: IncrementalForward, candidates: int = 6) -> None:
    """Compare a few candidates of a random image with full forwards; a mismatch means the trace does not
    describe the model (e.g. code fx cannot see), so the model is not supported."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, forward.channels, forward.height, forward.width, generator=g).to(forward.device, forward.dtype)
    pixels = torch.randperm(forward.height * forward.width, generator=g)[:candidates].to(forward.device)
    forward.ensure_capacity(1)
    slots = torch.zeros(len(pixels), dtype=torch.long, device=forward.device)
    forward.refresh(slots[:1], image)
    got = forward.logits(slots, pixels)
    batch = image.repeat(len(pixels), 1, 1, 1)
    batch.view(len(pixels), forward.channels, -1)[torch.arange(len(pixels)), :, pixels] = forward.baseline
    want = model(batch)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise Unsupported("the traced model's output does not match the model's")
    tolerance = 1e-9 if forward.dtype == torch.float64 else 1e-3
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not error <= tolerance:
        raise Unsupported(f"the traced model differs from the model by {error:.1e} (relative) on a self-check")
