"""Seeded random graphs and the differential check behind the fuzz tests and ``tools/fuzz.py``.

``build(seed)`` draws a small DAG (6x6 spatial, 2-5 channels) of ``Conv2D`` (grouped too),
``Conv2DBackpropInput`` (strides, SAME/VALID), ``DepthwiseConv2dNative``, ``MatMul``,
``BatchMatMulV2``, ``Einsum`` (dense form), biases (``BiasAdd``, ``x + k``, ``k + x``, ``x - k``),
batch norms (``FusedBatchNormV3`` and the decomposed ``tf.nn.batch_normalization`` form), ``Add``,
``ConcatV2`` (on the channel axis and on a spatial axis), ``Relu``, ``MaxPool``, ``AvgPool``,
``Pad``, ``Reshape`` (Flatten), ``Mean``, ``Transpose``, ``Identity``, per-channel ``Mul`` and
``RealDiv`` (either operand order) and broadcast ``Mul`` by ``[H,1,1]``/``[H,W,C]`` constants. It
varies padding (SAME/VALID/EXPLICIT), strides, dilations, NHWC/NCHW, float32/float16, γ signs and
zeros, shared weight constants, tensors with several consumers and intermediate function outputs.
A third stream adds, to about a third of the graphs, one block of the patterns partial folds and
commuting ops are about (docs/folding.md §8): BN → f → layer and layer → f → BN with f one of
``Relu``, ``LeakyRelu``, a per-channel PReLU (``Relu(x) + k·Relu(−x)``) or a size-keeping
``MaxPool``, γ all positive (70%) or of mixed signs; and nearest (``Tile``,
``ResizeNearestNeighbor``) or bilinear upsampling on either side of a BN. The other graphs are
those of the seeds before it.

``check(case)`` rewrites the function and asserts the property: the rewritten function equals the
original (relative error ``max|a-b| / max|a|`` <= 1e-5 for float32, 2e-2 for float16; an output
over that, which happens where the output is a cancellation of much larger values, passes if,
against the same graph built in float64 from the same constants, it is at most twice (+1e-6
float32, +1e-3 float16) as far off as the original), the optimized GraphDef imports into a fresh
graph, and the report adds up (every batch norm the generator inserted is listed once, folded or
not, and every unfolded one has a reason).

NCHW: CPU TensorFlow has no NCHW ``Conv2D``/``DepthwiseConv2dNative``/``MaxPool``/``AvgPool``
kernels, so for NCHW graphs both the frozen original and the folded GraphDef are executed through
their NHWC twin (``nhwc_twin``: each such op runs in NHWC between two transposes); the folded
GraphDef
itself keeps NCHW and is what ``rewrite`` imports.

The generator avoids graphs whose original cannot run on CPU TensorFlow 2.21 (oneDNN): a
``BiasAdd``/``Add`` of a constant right after an EXPLICIT-padded depthwise aborts the process, a
``Conv2D`` right after a channel ``Pad`` fails (a ``Relu`` is put between), a ``Mul`` by a constant
right after a grouped ``Conv2D`` aborts in Grappler (a bias is put between), and a float16
``DepthwiseConv2dNative`` is never dilated (oneDNN runs it only on CPUs with AVX512-FP16; the other
CPU kernel has no dilation: "Current kernel implementation does not support dilations").
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfold  # noqa: E402

from helpers import freeze, nhwc_twin, run_graph_def  # noqa: E402

TOLERANCE = {tf.float32: 1e-5, tf.float16: 2e-2}
ACCURACY_FLOOR = {tf.float32: 1e-6, tf.float16: 1e-3}
MAX_SPATIAL = 12
EPS = 1e-3


@dataclasses.dataclass(eq=False)
class Tensor:
    value: tf.Tensor
    rank: int
    c: int
    h: int = 1
    w: int = 1
    uses: int = 0
    is_input: bool = False
    explicit_depthwise: bool = False  # TF (oneDNN) aborts on BiasAdd/Add(k) after such a layer
    channel_padded: bool = False  # TF (oneDNN) Pad+Conv2D fusion drops a channel padding


@dataclasses.dataclass
class Case:
    seed: int
    fn: tf.types.experimental.ConcreteFunction
    layout: str
    dtype: tf.DType
    batch_norms: list[str]  # names of the batch norms the generator inserted
    log: list[str]  # one line per op, to read a failure

    def describe(self) -> str:
        return (
            f"seed {self.seed}: {self.layout} {self.dtype.name}, "
            f"{len(self.batch_norms)} BN\n  " + "\n  ".join(self.log)
        )


class _Builder:
    """Draws ops while ``tf.function`` traces (the trace runs once, so the draws are fixed)."""

    def __init__(
        self,
        rng: np.random.Generator,
        layout: str,
        dtype: tf.DType,
        round_to=None,
        variants: np.random.Generator | None = None,
    ):
        self.rng, self.layout, self.dtype = rng, layout, dtype
        # A second stream picks the layer variants (grouped, transposed, BatchMatMulV2, Einsum):
        # the main stream's draws, and so the graphs of older seeds, keep their structure.
        self.variants = variants or np.random.default_rng(0)
        self.novel = np.random.default_rng(0)  # the partial-fold blocks' stream (``build``)
        self.np_dtype = dtype.as_numpy_dtype
        self.round_to = round_to  # the float64 reference of a graph: its constants, rounded
        self.pool: list[Tensor] = []
        self.batch_norms: list[str] = []
        self.log: list[str] = []
        self.weights: dict[tuple, tf.Tensor] = {}
        self.count = 0

    # ---- tensors --------------------------------------------------------------------------------
    def axis(self, t: Tensor) -> int:
        return 1 if t.rank == 4 and self.layout == "NCHW" else t.rank - 1

    def wrap(self, value, what: str, *inputs: Tensor) -> Tensor:
        for t in inputs:
            t.uses += 1
        shape = value.shape.as_list()
        if len(shape) == 4:
            c, h, w = (
                (shape[1], shape[2], shape[3])
                if self.layout == "NCHW"
                else (shape[3], shape[1], shape[2])
            )
            t = Tensor(value, 4, c, h, w)
        else:
            t = Tensor(value, 2, shape[1])
        self.log.append(
            f"t{len(self.pool)} = {what}({', '.join(self._ref(i) for i in inputs)}) -> {shape}"
        )
        self.pool.append(t)
        return t

    def _ref(self, t: Tensor) -> str:
        return f"t{self.pool.index(t)}"

    def pick(self, rank: int | None = None, where=None) -> Tensor | None:
        ok = [
            t for t in self.pool if (rank is None or t.rank == rank) and (where is None or where(t))
        ]
        if not ok:
            return None
        if self.pool[-1] in ok and self.rng.random() < 0.6:
            return self.pool[-1]
        return ok[self.rng.integers(len(ok))]

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def channel_shape(self, t: Tensor, c: int | None = None) -> list[int]:
        """Shape of a per-channel constant for ``t`` (NCHW: ``[C, 1, 1]``)."""
        c = t.c if c is None else c
        return [c, 1, 1] if t.rank == 4 and self.layout == "NCHW" else [c]

    def const(self, array) -> tf.Tensor:
        array = np.asarray(array)
        if self.round_to is not None:
            array = array.astype(self.round_to)
        return tf.constant(array.astype(self.np_dtype))

    def normal(self, *shape, scale=1.0):
        return self.rng.normal(0.0, scale, shape)

    def signed(self, c: int) -> np.ndarray:
        return self.rng.uniform(0.5, 1.5, c) * np.where(self.rng.random(c) < 0.3, -1.0, 1.0)

    def weight(self, shape: tuple, fan_in: int) -> tf.Tensor:
        """A weight constant; one of a given shape is reused (shared) one time in four."""
        shape = tuple(shape)
        if shape in self.weights and self.rng.random() < 0.25:
            self.log.append(f"  (shared weight {list(shape)})")
            return self.weights[shape]
        w = self.const(self.normal(*shape) / np.sqrt(fan_in))
        self.weights[shape] = w
        return w

    def strides4(self, s: int) -> list[int]:
        return [1, 1, s, s] if self.layout == "NCHW" else [1, s, s, 1]

    def spatial_pairs(self, pairs: list[list[int]]) -> list[list[int]]:
        """Per-axis pad pairs ``[[top, bottom], [left, right]]`` for a 4-D tensor."""
        zero = [0, 0]
        return [zero, zero, *pairs] if self.layout == "NCHW" else [zero, *pairs, zero]

    # ---- ops ------------------------------------------------------------------------------------
    def _window(self, x: Tensor, k_eff: int) -> str:
        options = ["SAME"] + (["VALID", "EXPLICIT"] if min(x.h, x.w) >= k_eff else [])
        return options[self.rng.integers(len(options))]

    def conv(self, x: Tensor, cout: int | None = None, same: bool = False) -> Tensor:
        rng = self.rng
        if x.channel_padded:  # the original would fail to run (see Tensor)
            x = self.relu(x)
        variant = self.variants.random()
        if variant < 0.15 and not same and self.dtype != tf.float16:
            return self.conv_transpose(x, cout)
        groups = int(self.variants.choice([g for g in (2, 3) if x.c % g == 0] or [1]))
        if (
            variant > 0.75
            and groups > 1
            and self.dtype != tf.float16
            and (cout is None or cout % groups == 0)
        ):
            cout = groups * int(self.variants.integers(1, 3)) if cout is None else cout
        else:
            groups = 1
        k = int(rng.choice([1, 2, 3]))
        stride = 1 if same else int(rng.choice([1, 1, 2]))
        dilation = int(rng.choice([1, 2])) if stride == 1 and k > 1 and not same else 1
        cout = int(rng.integers(2, 6)) if cout is None else cout
        padding = "SAME" if same else self._window(x, (k - 1) * dilation + 1)
        w = self.weight((k, k, x.c // groups, cout), k * k * x.c // groups)
        attrs = dict(
            strides=self.strides4(stride),
            padding=padding,
            data_format=self.layout,
            dilations=self.strides4(dilation),
        )
        if padding == "EXPLICIT":
            pads = self.spatial_pairs([list(rng.integers(0, 2, 2)) for _ in range(2)])
            attrs["explicit_paddings"] = [int(p) for pair in pads for p in pair]
        y = tf.raw_ops.Conv2D(input=x.value, filter=w, name=self.name("conv"), **attrs)
        if groups == 1:
            return self.wrap(y, f"conv{k}x{k}/s{stride}/d{dilation}/{padding}", x)
        # A Mul by a constant right after a grouped Conv2D makes Grappler's MulConvPushDown
        # abort the process (TF 2.21, a CHECK on the filter shape): a bias between them, as in
        # Keras.
        return self.bias(
            self.wrap(y, f"conv{k}x{k}/s{stride}/d{dilation}/{padding}/groups{groups}", x)
        )

    def conv_transpose(self, x: Tensor, cout: int | None = None) -> Tensor:
        """``Conv2DBackpropInput`` (Keras Conv2DTranspose): filter [k, k, cout, x.c], data input 2.
        (TensorFlow's CPU kernel has no dilation.)"""
        v = self.variants
        k = int(v.choice([1, 2, 3]))
        stride = int(v.choice([1, 2]))
        padding = str(v.choice(["SAME", "VALID"]))
        size = lambda n: n * stride if padding == "SAME" else (n - 1) * stride + k
        if max(size(x.h), size(x.w)) > MAX_SPATIAL:
            stride, padding = 1, "SAME"
        h, w_ = size(x.h), size(x.w)
        cout = int(v.integers(2, 6)) if cout is None else cout
        w = self.weight((k, k, cout, x.c), k * k * x.c)
        n = tf.shape(x.value)[0]
        shape = tf.stack([n, cout, h, w_] if self.layout == "NCHW" else [n, h, w_, cout])
        y = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=shape,
            filter=w,
            out_backprop=x.value,
            strides=self.strides4(stride),
            padding=padding,
            data_format=self.layout,
            name=self.name("conv_transpose"),
        )
        return self.wrap(y, f"conv_transpose{k}x{k}/s{stride}/{padding}", x)

    def depthwise(self, x: Tensor, same: bool = False) -> Tensor:
        rng = self.rng
        k = int(rng.choice([1, 2, 3]))
        stride = 1 if same else int(rng.choice([1, 1, 2]))
        dilation = int(rng.choice([1, 2])) if stride == 1 and k > 1 and not same else 1
        if self.dtype == tf.float16:  # no kernel for it on CPUs without AVX512-FP16
            dilation = 1
        m = 1 if same else int(rng.choice([1, 1, 2]))
        padding = "SAME" if same else self._window(x, (k - 1) * dilation + 1)
        w = self.weight((k, k, x.c, m), k * k)
        attrs = dict(
            strides=self.strides4(stride),
            padding=padding,
            data_format=self.layout,
            dilations=self.strides4(dilation),
        )
        if padding == "EXPLICIT":
            pads = self.spatial_pairs([list(rng.integers(0, 2, 2)) for _ in range(2)])
            attrs["explicit_paddings"] = [int(p) for pair in pads for p in pair]
        y = tf.raw_ops.DepthwiseConv2dNative(input=x.value, filter=w, name=self.name("dw"), **attrs)
        t = self.wrap(y, f"depthwise{k}x{k}/m{m}/s{stride}/d{dilation}/{padding}", x)
        t.explicit_depthwise = padding == "EXPLICIT"
        return t

    def matmul(self, x: Tensor, cout: int | None = None) -> Tensor:
        cout = int(self.rng.integers(2, 6)) if cout is None else cout
        transpose_b = bool(self.rng.random() < 0.4)
        shape = (cout, x.c) if transpose_b else (x.c, cout)
        w = self.weight(shape, x.c)
        variant = self.variants.random()
        if variant < 0.2:
            y = tf.raw_ops.BatchMatMulV2(
                x=x.value, y=w, adj_y=transpose_b, name=self.name("batch_matmul")
            )
            return self.wrap(y, f"batch_matmul(adj_y={transpose_b})", x)
        if variant < 0.4:
            equation = "ab,cb->ac" if transpose_b else "ab,bc->ac"
            y = tf.raw_ops.Einsum(inputs=[x.value, w], equation=equation, name=self.name("einsum"))
            return self.wrap(y, f"einsum({equation})", x)
        y = tf.matmul(x.value, w, transpose_b=transpose_b, name=self.name("matmul"))
        return self.wrap(y, f"matmul(transpose_b={transpose_b})", x)

    def linear(self, x: Tensor, cout: int) -> Tensor:
        """A layer from ``x`` with ``cout`` output channels and ``x``'s spatial size."""
        if x.rank == 2:
            return self.matmul(x, cout)
        if cout == x.c and self.rng.random() < 0.3:
            return self.depthwise(x, same=True)
        return self.conv(x, cout, same=True)

    def bias(self, x: Tensor) -> Tensor:
        b = self.normal(x.c) + 0.5 * np.sign(self.normal(x.c))
        form = self.rng.choice(["bias_add", "add", "radd", "sub"])
        if x.explicit_depthwise:
            form = "sub"
        name = self.name("bias")
        if form == "bias_add":
            fmt = self.layout if x.rank == 4 else "NHWC"
            y = tf.nn.bias_add(x.value, self.const(b), data_format=fmt, name=name)
        else:
            k = self.const(b.reshape(self.channel_shape(x)))
            with tf.name_scope(name):
                y = {
                    "add": lambda: x.value + k,
                    "radd": lambda: k + x.value,
                    "sub": lambda: x.value - k,
                }[form]()
        return self.wrap(y, f"bias/{form}", x)

    def bn_params(self, c: int, positive: bool = False):
        gamma = self.signed(c)
        if positive:
            gamma = np.abs(gamma)
        elif self.rng.random() < 0.15:
            gamma[self.rng.integers(c)] = 0.0
        beta, mean = self.normal(c), self.normal(c)
        var = self.rng.uniform(0.2, 2.0, c)
        return [v.astype(np.float32) for v in (gamma, beta, mean, var)]

    def batch_norm(self, x: Tensor, fused: bool, positive: bool = False) -> Tensor:
        name = self.name("bn")
        self.batch_norms.append(name)
        gamma, beta, mean, var = self.bn_params(x.c, positive)
        with tf.name_scope(name):
            if self.dtype == tf.float64:  # the reference: the same map, in float64
                shape = self.channel_shape(x)
                p = [
                    tf.constant(v.reshape(shape).astype(np.float64))
                    for v in (mean, var, beta, gamma)
                ]
                y = tf.nn.batch_normalization(
                    x.value, p[0], p[1], p[2], p[3], float(np.float32(EPS))
                )
                form = "reference"
            elif fused and x.rank == 4:
                y = tf.raw_ops.FusedBatchNormV3(
                    x=x.value,
                    scale=gamma,
                    offset=beta,
                    mean=mean,
                    variance=var,
                    epsilon=EPS,
                    data_format=self.layout,
                    is_training=False,
                )[0]
                form = "FusedBatchNormV3"
            else:
                shape = self.channel_shape(x)
                p = [tf.constant(v.reshape(shape)) for v in (mean, var, beta, gamma)]
                y = tf.nn.batch_normalization(x.value, p[0], p[1], p[2], p[3], EPS)
                form = "batch_normalization"
        return self.wrap(y, f"{name}:{form}" + (" gamma=0" if np.any(gamma == 0) else ""), x)

    def scale(self, x: Tensor) -> Tensor:
        """``x * k``, ``k * x`` or ``x / k`` with a per-channel constant (not a batch norm)."""
        k = self.const(self.signed(x.c).reshape(self.channel_shape(x)))
        form = self.rng.choice(["mul", "rmul", "div"])
        with tf.name_scope(self.name("scale")):
            y = {
                "mul": lambda: x.value * k,
                "rmul": lambda: k * x.value,
                "div": lambda: x.value / k,
            }[form]()
        return self.wrap(y, f"scale/{form}", x)

    def broadcast_mul(self, x: Tensor) -> Tensor:
        """``x * k`` with ``k`` broadcasting along a spatial axis: not per-channel."""
        nchw = self.layout == "NCHW"
        if self.rng.random() < 0.5:
            shape = [x.h, 1] if nchw else [x.h, 1, 1]
            form = "per-H"
        else:
            shape = [x.c, x.h, x.w] if nchw else [x.h, x.w, x.c]
            form = "per-HWC"
        k = self.const(self.rng.uniform(0.5, 1.5, shape))
        with tf.name_scope(self.name("bcast")):
            y = x.value * k if self.rng.random() < 0.5 else k * x.value
        return self.wrap(y, f"broadcast_mul/{form}", x)

    def relu(self, x: Tensor) -> Tensor:
        return self.wrap(tf.nn.relu(x.value, name=self.name("relu")), "relu", x)

    def identity(self, x: Tensor) -> Tensor:
        y = self.wrap(tf.identity(x.value, name=self.name("identity")), "identity", x)
        y.channel_padded = x.channel_padded
        return y

    def pooling(self, x: Tensor) -> Tensor:
        k = int(self.rng.choice([2, 3]))
        stride = int(self.rng.choice([1, 2]))
        padding = "VALID" if min(x.h, x.w) >= k and self.rng.random() < 0.5 else "SAME"
        kind = self.rng.choice(["max", "avg"])
        op = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
        y = op(x.value, k, stride, padding, data_format=self.layout, name=self.name(kind))
        return self.wrap(y, f"{kind}pool{k}/s{stride}/{padding}", x)

    def pad(self, x: Tensor) -> Tensor:
        pairs = self.spatial_pairs([list(self.rng.integers(0, 2, 2)) for _ in range(2)])
        if self.rng.random() < 0.15:
            pairs[self.axis(x)] = [0, 1]
        if x.h + 2 > MAX_SPATIAL or x.w + 2 > MAX_SPATIAL:
            return self.identity(x)
        y = self.wrap(tf.pad(x.value, pairs, name=self.name("pad")), f"pad{pairs}", x)
        y.channel_padded = pairs[self.axis(x)] != [0, 0]
        return y

    def mean(self, x: Tensor) -> Tensor:
        axes = [2, 3] if self.layout == "NCHW" else [1, 2]
        keep = bool(self.rng.random() < 0.5)
        y = tf.reduce_mean(x.value, axes, keepdims=keep, name=self.name("mean"))
        return self.wrap(y, f"mean(keepdims={keep})", x)

    def flatten(self, x: Tensor) -> Tensor:
        y = tf.reshape(x.value, [-1, x.h * x.w * x.c], name=self.name("flatten"))
        return self.wrap(y, "flatten", x)

    def transpose(self, x: Tensor) -> Tensor:
        if self.rng.random() < 0.3:
            perm = [0, 1, 2, 3]
        else:
            perm = [0, 1, 3, 2] if self.layout == "NCHW" else [0, 2, 1, 3]
        return self.wrap(
            tf.transpose(x.value, perm, name=self.name("transpose")), f"transpose{perm}", x
        )

    def partner(self, x: Tensor, same_c: bool) -> Tensor:
        """Another tensor for an Add or Concat with ``x``: one from the pool that fits, or a new
        linear branch from some tensor of ``x``'s spatial size."""

        def fits(t):
            return (
                t is not x
                and t.rank == x.rank
                and (t.h, t.w) == (x.h, x.w)
                and (t.c == x.c or not same_c)
            )

        if self.rng.random() < 0.5:
            found = self.pick(where=fits)
            if found is not None:
                return found
        source = (
            self.pick(where=lambda t: t is not x and t.rank == x.rank and (t.h, t.w) == (x.h, x.w))
            or x
        )
        cout = x.c if same_c else int(self.rng.integers(2, 5))
        y = self.linear(source, cout)
        if self.rng.random() < 0.4:
            y = self.batch_norm(y, fused=bool(self.rng.random() < 0.5))
        return y

    def add(self, x: Tensor) -> Tensor:
        other = self.partner(x, same_c=True)
        a, b = (x, other) if self.rng.random() < 0.5 else (other, x)
        return self.wrap(tf.add(a.value, b.value, name=self.name("add")), "add", a, b)

    def concat(self, x: Tensor) -> Tensor:
        if x.c > 8:
            return self.identity(x)
        other = self.partner(x, same_c=False)
        axis = self.axis(x)
        if self.rng.random() < 0.5:
            axis -= x.rank
        parts = [x, other] if self.rng.random() < 0.5 else [other, x]
        y = tf.concat([p.value for p in parts], axis, name=self.name("concat"))
        return self.wrap(y, f"concat(axis={axis})", *parts)

    def concat_spatial(self, x: Tensor) -> Tensor:
        """Concatenation on a spatial axis (not the channel axis), of ``x`` with itself."""
        if 2 * x.h > MAX_SPATIAL:
            return self.identity(x)
        axis = 2 if self.layout == "NCHW" else 1
        y = tf.concat([x.value, x.value], axis, name=self.name("concat_h"))
        return self.wrap(y, f"concat(axis={axis})", x, x)

    # ---- blocks: the patterns real models are made of, so that many graphs fold --------------
    def passthrough(self, x: Tensor) -> Tensor:
        """An op that batch norms may move through (sometimes): identity, pool, mean, relu, pad."""
        kinds = ["identity", "relu"] + (["pooling", "mean", "pad"] if x.rank == 4 else [])
        return _step(self, str(self.rng.choice(kinds)), x)

    def layer_bn(self, x: Tensor) -> Tensor:
        """layer -> [bias] -> [pass-through] -> BN -> [relu]."""
        if x.rank == 2:
            y = self.matmul(x)
        else:
            y = self.conv(x) if self.rng.random() < 0.65 else self.depthwise(x)
        if self.rng.random() < 0.6:
            y = self.bias(y)
        if self.rng.random() < 0.35:
            y = self.passthrough(y)
        y = self.batch_norm(y, fused=y.rank == 4 and bool(self.rng.random() < 0.5))
        return self.relu(y) if self.rng.random() < 0.4 else y

    def junction_bn(self, x: Tensor) -> Tensor:
        """Two layers -> Add or Concat -> [bias] -> [pass-through] -> BN."""
        y = self.add(x) if self.rng.random() < 0.5 else self.concat(x)
        if self.rng.random() < 0.5:
            y = self.bias(y)
        if self.rng.random() < 0.3:
            y = self.passthrough(y)
        return self.batch_norm(y, fused=y.rank == 4 and bool(self.rng.random() < 0.5))

    def bn_layer(self, x: Tensor) -> Tensor:
        """BN -> [pass-through, Concat, Flatten] -> layer."""
        y = self.batch_norm(x, fused=x.rank == 4 and bool(self.rng.random() < 0.5))
        r = self.rng.random()
        if r < 0.3:
            y = self.passthrough(y)
        elif r < 0.45 and y.rank == 4:
            y = self.concat(y)
        elif r < 0.55 and y.rank == 4:
            y = self.flatten(y)
        elif r < 0.75:
            y = self.add(y)  # another branch joins: its layer is a leaf
        return (
            self.linear(y, int(self.rng.integers(2, 6)))
            if y.rank == 4 or self.rng.random() < 0.5
            else self.matmul(y)
        )

    # ---- the patterns of partial folds and of ops that commute with A (docs/folding.md §8) -------
    def activation(self, x: Tensor) -> Tensor:
        """A positively homogeneous op: Relu, LeakyRelu, a per-channel PReLU, a size-keeping
        MaxPool."""
        kinds = ["relu", "leaky_relu", "prelu"] + (["max_pool"] if x.rank == 4 else [])
        kind = str(self.rng.choice(kinds))
        name = self.name(kind)
        if kind == "relu":
            y = tf.nn.relu(x.value, name=name)
        elif kind == "leaky_relu":
            y = tf.nn.leaky_relu(x.value, float(self.rng.uniform(0.05, 0.4)), name=name)
        elif kind == "prelu":
            k = self.const(self.rng.uniform(-0.5, 0.5, self.channel_shape(x)))
            with tf.name_scope(name):
                y = tf.nn.relu(x.value) + k * tf.nn.relu(-x.value)
        else:
            y = tf.nn.max_pool2d(x.value, 2, 1, "SAME", data_format=self.layout, name=name)
        return self.wrap(y, kind, x)

    def pre_activation(self, x: Tensor) -> Tensor:
        """BN → f → [Pad] → layer (DenseNet, ResNetV2): γ all positive 70% of the time."""
        y = self.batch_norm(
            x,
            fused=x.rank == 4 and bool(self.rng.random() < 0.5),
            positive=bool(self.rng.random() < 0.7),
        )
        y = self.activation(y)
        if y.rank == 4 and self.rng.random() < 0.3:
            y = self.pad(y)
        cout = int(self.rng.integers(2, 6))
        return (
            self.matmul(y, cout)
            if y.rank == 2
            else self.conv(y, cout, same=bool(self.rng.random() < 0.5))
        )

    def post_activation(self, x: Tensor) -> Tensor:
        """layer → [bias] → f → BN → [layer] (Conv → ReLU → BN)."""
        y = self.matmul(x) if x.rank == 2 else self.conv(x)
        if self.rng.random() < 0.5:
            y = self.bias(y)
        y = self.batch_norm(
            self.activation(y),
            fused=y.rank == 4 and bool(self.rng.random() < 0.5),
            positive=bool(self.rng.random() < 0.7),
        )
        if self.rng.random() < 0.5:
            y = self.matmul(y) if y.rank == 2 else self.conv(y)
        return y

    def upsample(self, x: Tensor) -> Tensor:
        """×2 nearest (``tf.repeat``: Tile; ``ResizeNearestNeighbor``) or bilinear upsampling,
        between a layer and a BN (either order). Resize ops are channels-last only."""
        if x.rank != 4 or 2 * max(x.h, x.w) > MAX_SPATIAL:
            return self.identity(x)
        kinds = ["repeat"] + (["nearest", "bilinear"] if self.layout == "NHWC" else [])
        kind = str(self.rng.choice(kinds))
        bn_first = bool(self.rng.random() < 0.5)
        y = (
            self.batch_norm(x, fused=bool(self.rng.random() < 0.5))
            if bn_first
            else self.conv(x, same=True)
        )
        if kind == "repeat":
            h_axis, w_axis = (2, 3) if self.layout == "NCHW" else (1, 2)
            z = tf.repeat(tf.repeat(y.value, 2, axis=h_axis), 2, axis=w_axis)
        else:
            z = tf.image.resize(y.value, [2 * y.h, 2 * y.w], method=kind)
            z = tf.cast(z, y.value.dtype) if z.dtype != y.value.dtype else z
        z = self.wrap(z, f"upsample/{kind}", y)
        if bn_first:
            return self.conv(z, same=bool(self.rng.random() < 0.5))
        return self.batch_norm(z, fused=bool(self.rng.random() < 0.5))

    def residual(self, x: Tensor) -> Tensor:
        """``x + layer(x)`` (the layer may carry a BN), then maybe a layer."""
        y = self.linear(x, x.c)
        if self.rng.random() < 0.5:
            y = self.batch_norm(y, fused=y.rank == 4 and bool(self.rng.random() < 0.5))
        parts = (x, y) if self.rng.random() < 0.5 else (y, x)
        z = self.wrap(
            tf.add(parts[0].value, parts[1].value, name=self.name("residual")), "add", *parts
        )
        return self.linear(z, int(self.rng.integers(2, 6))) if self.rng.random() < 0.5 else z


OPS4 = {
    "conv": 3.0,
    "depthwise": 2.0,
    "fused_bn": 3.0,
    "decomposed_bn": 2.0,
    "bias": 2.0,
    "relu": 1.5,
    "pooling": 1.5,
    "pad": 0.8,
    "add": 2.0,
    "concat": 1.5,
    "concat_spatial": 0.3,
    "mean": 0.6,
    "flatten": 0.5,
    "transpose": 0.4,
    "scale": 0.8,
    "broadcast_mul": 0.4,
    "identity": 0.3,
    "layer_bn": 4.0,
    "junction_bn": 2.0,
    "bn_layer": 2.5,
    "residual": 1.5,
}
OPS2 = {
    "matmul": 3.0,
    "decomposed_bn": 2.5,
    "bias": 1.5,
    "relu": 1.0,
    "add": 1.5,
    "concat": 1.0,
    "scale": 0.6,
    "identity": 0.2,
    "layer_bn": 3.0,
    "bn_layer": 2.0,
    "residual": 1.0,
}


def _step(b: _Builder, kind: str, x: Tensor) -> Tensor:
    if kind in ("fused_bn", "decomposed_bn"):
        return b.batch_norm(x, fused=kind == "fused_bn")
    return getattr(b, kind)(x)


def _novel_block(b: _Builder) -> None:
    """One block of ``pre_activation``, ``post_activation`` or ``upsample``, drawn from the
    builder's third stream (the main stream's draws, and so the rest of the graph, unchanged)."""
    main, b.rng = b.rng, b.novel
    try:
        x = b.pick()
        getattr(
            b,
            str(b.rng.choice(["pre_activation", "post_activation", "upsample"], p=[0.4, 0.4, 0.2])),
        )(x)
    finally:
        b.rng = main


def build(seed: int, reference: bool = False) -> Case:
    """The random graph of ``seed``, traced as a ConcreteFunction. ``reference``: the same graph
    in float64, from the same constants (rounded to the graph's dtype), batch norms computed as
    ``(x - μ)·γ/√(σ² + ε) + β``."""
    rng = np.random.default_rng(seed)
    layout = "NCHW" if rng.random() < 0.25 else "NHWC"
    dtype = tf.float16 if rng.random() < 0.15 else tf.float32
    round_to = dtype.as_numpy_dtype if reference else None
    dtype = tf.float64 if reference else dtype
    h, w = 6, int(rng.choice([5, 6]))
    c = int(rng.integers(2, 5))
    specs = [(h, w, c)]
    if rng.random() < 0.3:
        specs.append((h, w, int(rng.integers(2, 5))))
    flat_input = rng.random() < 0.15
    steps = int(rng.integers(2, 8))
    b = _Builder(rng, layout, dtype, round_to, variants=np.random.default_rng([seed, 11]))
    b.novel = np.random.default_rng([seed, 19])
    novel_at = int(b.novel.integers(steps)) if b.novel.random() < 0.35 else -1

    def spec4(h, w, c):
        return [None, c, h, w] if layout == "NCHW" else [None, h, w, c]

    signature = [tf.TensorSpec(spec4(*s), dtype, name=f"x{i}") for i, s in enumerate(specs)]
    if flat_input:
        signature.append(tf.TensorSpec([None, int(rng.integers(3, 7))], dtype, name="v"))

    def body(*inputs):
        for value in inputs:
            t = b.wrap(value, "input")
            t.is_input = True
        for step in range(steps):
            if step == novel_at:
                _novel_block(b)
            x = b.pick()
            table = OPS4 if x.rank == 4 else OPS2
            kinds = list(table)
            p = np.asarray([table[k] for k in kinds])
            _step(b, str(rng.choice(kinds, p=p / p.sum())), x)
        outputs = [t for t in b.pool if not t.is_input and (t.uses == 0 or rng.random() < 0.08)]
        if not outputs:
            outputs = [b.conv(b.pool[0])]
        b.log.append("outputs: " + ", ".join(b._ref(t) for t in outputs))
        if any(t.uses for t in outputs):
            b.log.append("  (an intermediate tensor is a function output)")
        if any(t.uses > 1 for t in b.pool):
            b.log.append("  (a tensor has several consumers)")
        return tuple(t.value for t in outputs)

    fn = tf.function(body, autograph=False).get_concrete_function(*signature)
    return Case(seed, fn, layout, dtype, b.batch_norms, b.log)


# ---- the differential check ----------------------------------------------------------------------
def _inputs(case: Case, rng: np.random.Generator, batch: int = 2) -> list[np.ndarray]:
    return [
        rng.normal(0.0, 1.0, [batch] + s.shape.as_list()[1:]).astype(s.dtype.as_numpy_dtype)
        for s in case.fn.structured_input_signature[0]
    ]


def relative_error(want: np.ndarray, got: np.ndarray) -> float:
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    if want.shape != got.shape:
        raise AssertionError(f"shape {got.shape} != {want.shape}")
    if not np.all(np.isfinite(want)):
        raise AssertionError("reference output is not finite")
    scale = np.abs(want).max()
    diff = np.abs(want - got).max() if want.size else 0.0
    if not np.isfinite(diff):
        return float("inf")
    return float(diff / scale) if scale > 0 else float(diff)


def run_original(case: Case, input_seed: int = 0) -> list[np.ndarray]:
    """The original's outputs on ``check``'s inputs (for NCHW through its NHWC twin): run first,
    so that a TensorFlow abort on the generated graph itself is told from one on the rewrite."""
    feeds = _inputs(case, np.random.default_rng(input_seed))
    if case.layout == "NCHW":
        frozen = freeze(case.fn)
        return run_graph_def(nhwc_twin(frozen.graph_def), frozen.inputs, frozen.outputs, feeds)
    return [t.numpy() for t in tf.nest.flatten(case.fn(*feeds))]


def check(case: Case, input_seed: int = 0):
    """Rewrites ``case.fn`` and asserts exactness, a valid GraphDef and a report that adds up.
    Returns ``(folded, worst relative error)``."""
    folded = graphfold.rewrite(case.fn)
    report = folded.report

    with tf.Graph().as_default():
        tf.graph_util.import_graph_def(folded.graph_def, name="")

    names = [e.name for e in report.batch_norms]
    assert sorted(names) == sorted(case.batch_norms), (
        f"report lists batch norms {sorted(names)}, the generator inserted "
        f"{sorted(case.batch_norms)}"
    )
    assert len(report.folded) + len(report.partial) + len(report.not_folded) == len(
        case.batch_norms
    )
    for entry in report.not_folded:
        assert entry.reason, f"{entry.name} is not folded and has no reason"
    for entry in report.partial:
        assert entry.detail and entry.absorbed_by, f"{entry.name}: a partial fold says nothing"

    feeds = _inputs(case, np.random.default_rng(input_seed))
    if case.layout == "NCHW":
        frozen = freeze(case.fn)
        want = run_graph_def(nhwc_twin(frozen.graph_def), frozen.inputs, frozen.outputs, feeds)
        got = run_graph_def(nhwc_twin(folded.graph_def), frozen.inputs, frozen.outputs, feeds)
    else:
        want = [t.numpy() for t in tf.nest.flatten(case.fn(*feeds))]
        got_tensors = tf.nest.flatten(folded(*feeds))
        for a, g in zip(tf.nest.flatten(case.fn.structured_outputs), got_tensors):
            assert a.dtype == g.dtype and a.shape.as_list()[1:] == g.shape.as_list()[1:]
        got = [t.numpy() for t in got_tensors]
    assert len(want) == len(got)
    limit = TOLERANCE[case.dtype]
    errors = [relative_error(a, g) for a, g in zip(want, got)]
    if max(errors) > limit:
        # An output much smaller than the values it is computed from (a cancellation) differs by
        # a few ulps of those values. Judge by accuracy instead: against the same graph in
        # float64, the rewrite may be at most twice (+ a floor) as far off as the original.
        floor = ACCURACY_FLOOR[case.dtype]
        for i, (r, a, g) in enumerate(zip(_reference_outputs(case, feeds), want, got)):
            original, rewritten = relative_error(r, a), relative_error(r, g)
            assert rewritten <= 2 * original + floor, (
                f"output {i}: relative error {rewritten:.3g} against the float64 reference, "
                f"the original's is {original:.3g} (and {errors[i]:.3g} between the two)"
            )
        return folded, max(errors)
    for i, err in enumerate(errors):
        assert err <= limit, f"output {i}: relative error {err:.3g} > {limit:.3g}"
    return folded, max(errors)


def _reference_outputs(case: Case, feeds) -> list[np.ndarray]:
    """The outputs of ``case``'s graph built in float64 from the same constants."""
    reference = build(case.seed, reference=True)
    frozen = freeze(reference.fn)
    graph_def = nhwc_twin(frozen.graph_def) if case.layout == "NCHW" else frozen.graph_def
    return run_graph_def(
        graph_def, frozen.inputs, frozen.outputs, [f.astype(np.float64) for f in feeds]
    )


# ---- the same graph through optimize_graph_def, fetching layers, biases and batch norms ----------
FETCHABLE = (
    "Conv2D",
    "DepthwiseConv2dNative",
    "MatMul",
    "BiasAdd",
    "FusedBatchNormV3",
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "RealDiv",
)


def pick_fetches(graph_def, rng: np.random.Generator) -> list[str]:
    """1-4 random layer, bias and batch-norm nodes (output 0) of a frozen graph."""
    names = [n.name for n in graph_def.node if n.op in FETCHABLE]
    if not names:
        return []
    k = min(len(names), int(rng.integers(1, 5)))
    return sorted(str(n) for n in rng.choice(names, size=k, replace=False))


def check_fetches(
    case: Case, input_seed: int = 0, phase=lambda name: None
) -> tuple[list[str], float]:
    """Calls ``optimize_graph_def`` on ``case``'s frozen graph directly, asking for 1-4 layer,
    bias and batch-norm nodes besides (or instead of) the function's outputs, with the frozen
    shapes or none (then inferred): every requested name must compute what it computed before
    (same tolerance and float64 fallback as ``check``), and the report must list every batch
    norm. Returns the fetched names and the worst relative error. ``phase("ORIGINAL")`` is
    called before the original graph runs with those outputs (TensorFlow may abort on it: not a
    rewrite's fault), ``phase("REWRITE")`` before the rewrite."""
    rng = np.random.default_rng([case.seed, input_seed, 99])
    frozen = freeze(case.fn)
    fetches = pick_fetches(frozen.graph_def, rng)
    outputs = fetches + (list(frozen.outputs) if rng.random() < 0.5 or not fetches else [])
    shapes = frozen.shapes if rng.random() < 0.5 else None
    feeds = _inputs(case, np.random.default_rng(input_seed))
    prepare = nhwc_twin if case.layout == "NCHW" else (lambda g: g)
    phase("ORIGINAL")
    want = run_graph_def(prepare(frozen.graph_def), frozen.inputs, outputs, feeds)
    phase("REWRITE")
    optimized, report = graphfold.optimize_graph_def(
        frozen.graph_def, frozen.inputs, outputs, shapes
    )
    names = [e.name for e in report.batch_norms]
    needed = _ancestors(frozen.graph_def, outputs)
    wanted = [b for b in case.batch_norms if any(n == b or n.startswith(b + "/") for n in needed)]
    assert sorted(names) == sorted(wanted), (
        f"report lists {sorted(names)}, the requested outputs need {sorted(wanted)}"
    )
    for entry in report.not_folded:
        assert entry.reason, f"{entry.name} is not folded and has no reason"

    got = run_graph_def(prepare(optimized), frozen.inputs, outputs, feeds)
    limit = TOLERANCE[case.dtype]
    errors = [relative_error(a, g) for a, g in zip(want, got)]
    if max(errors) > limit:
        reference = freeze(build(case.seed, reference=True).fn)
        exact = run_graph_def(
            prepare(reference.graph_def),
            reference.inputs,
            outputs,
            [f.astype(np.float64) for f in feeds],
        )
        floor = ACCURACY_FLOOR[case.dtype]
        for name, r, a, g, err in zip(outputs, exact, want, got, errors):
            original, rewritten = relative_error(r, a), relative_error(r, g)
            assert rewritten <= 2 * original + floor, (
                f"fetched {name}: relative error {rewritten:.3g} against the float64 "
                f"reference, the original's is {original:.3g} (and {err:.3g} between the two)"
            )
    return outputs, max(errors)


def _ancestors(graph_def, outputs: list[str]) -> set[str]:
    """The nodes that the tensors ``outputs`` depend on (themselves included)."""
    inputs = {n.name: [t.lstrip("^").split(":")[0] for t in n.input] for n in graph_def.node}
    seen, stack = set(), [t.split(":")[0] for t in outputs]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(inputs.get(name, []))
    return seen
