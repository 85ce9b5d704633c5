"""Rewrite time: graphfold's stages on real models, and how they scale with the graph's size.

    python tools/bench_rewrite.py [--models ResNet50,...] [--frameworks keras3,tf-keras]
        [--repeats 3] [--size N] [--keras-folder DenseNet121|all|none]
        [--sizes 1000,5000,20000,50000] [--scaling-repeats 3] [--verify-up-to 5000]
        [--profile N] [--out F.md]

1. Models: ``graphfold.rewrite(fn)`` on keras.applications models (random BN statistics), the
   median over ``--repeats`` runs of each stage's seconds (``report.seconds``: freeze, normalize,
   plan, apply, import); "own" is normalize + plan + apply, graphfold's own work (freeze and
   import are TensorFlow's). For tf-keras models named by ``--keras-folder``, the Keras-level
   folder (PyPI ``tensorflow-batchnorm-folding``, when installed) is timed in the same run.
2. Scaling: synthetic frozen graphs built directly as GraphDefs (residual stacks of conv+BN
   blocks, the BNs alternately fused and decomposed like Keras 3's, every fourth block with an
   extra BN after the residual Relu, which cannot fold) of about each ``--sizes`` nodes, fed to
   ``graphfold.optimize_graph_def``: seconds per stage, microseconds per node and its ratio to
   the smallest size (linear growth keeps it near 1), the size of the GraphDef, and in a second
   run (tracemalloc slows Python down) the peak of Python's allocations during the rewrite and
   how far the process' resident set grew above where it started (sampled: it also counts the
   protobuf messages and NumPy buffers tracemalloc does not see).

``--profile N`` prints, on stderr, the N functions with the most own time (cProfile) in
graphfold's stages for each model.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import threading
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402
from graphfold.convert.freeze import freeze  # noqa: E402
from graphfold.convert.function import import_graph  # noqa: E402

import benchlib  # noqa: E402

MODELS = "ResNet50,MobileNetV2,EfficientNetB0,DenseNet121"
STAGES = ("freeze", "normalize", "plan", "apply", "import")
OWN = ("normalize", "plan", "apply")
MODEL_COLUMNS = [
    "model",
    "framework",
    "nodes",
    "BNs folded",
    *STAGES,
    "own",
    "total",
    "keras folder",
    "speed-up",
]
SCALING_COLUMNS = [
    "nodes",
    "blocks",
    "BNs folded",
    *OWN,
    "own",
    "µs/node",
    "vs smallest",
    "GraphDef MiB",
    "tracemalloc peak MiB",
    "RSS growth MiB",
    "max rel err",
]


def _table_header(columns) -> str:
    return "| " + " | ".join(columns) + " |\n" + "|" + "---|" * len(columns)


def _s(value) -> str:
    return "–" if value is None else f"{value:.3f}"


# ---- 1. models ----------------------------------------------------------------------------------
def model_row(
    name: str, legacy: bool, repeats: int, size: int | None, keras_folder: bool, profile: int
) -> dict:
    model, size, _ = benchlib.build(name, legacy, size)
    fn = examples.concrete(model, (size, size, 3))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        folded = graphfold.rewrite(fn, verify=False)  # the fold alone (its check: ~2 calls)
        total = time.perf_counter() - start
        runs.append(dict(folded.report.seconds, total=total))
    med = {k: benchlib.median([r.get(k, 0.0) for r in runs]) for k in (*STAGES, "total")}
    med["own"] = benchlib.median([sum(r.get(k, 0.0) for k in OWN) for r in runs])
    report = folded.report
    row = dict(
        model=name,
        framework="tf-keras" if legacy else "keras3",
        nodes=sum(report.ops_before.values()),
        folded=f"{len(report.folded)}/{len(report.batch_norms)}",
        seconds=med,
        keras_folder=None,
    )
    if keras_folder and legacy and benchlib.keras_folder() is not None:
        start = time.perf_counter()
        result = benchlib.keras_fold(model)
        if result is not None:
            row["keras_folder"] = time.perf_counter() - start
    if profile:
        frozen = freeze(fn)
        profiler = cProfile.Profile()
        profiler.enable()
        graphfold.optimize_graph_def(frozen.graph_def, frozen.inputs, frozen.outputs, frozen.shapes)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(profile)
        print(
            f"## profile of normalize+plan+apply, {name} ({row['framework']})\n{out.getvalue()}",
            file=sys.stderr,
        )
    return row


def model_markdown(r: dict) -> str:
    sec = r["seconds"]
    folder = r["keras_folder"]
    speedup = "–" if folder is None else f"{folder / sec['total']:.1f}×"
    cells = [r["model"], r["framework"], str(r["nodes"]), r["folded"]]
    cells += [_s(sec[k]) for k in STAGES] + [_s(sec["own"]), _s(sec["total"]), _s(folder), speedup]
    return "| " + " | ".join(cells) + " |"


# ---- 2. synthetic graphs ------------------------------------------------------------------------
class _Builder:
    """A frozen-looking GraphDef (weights and BN parameters read through ``Identity``, as
    ``convert_variables_to_constants_v2`` leaves them) and the static shape of every tensor."""

    def __init__(self, rng: np.random.Generator, height: int, channels: int):
        self.g = graph_pb2.GraphDef()
        self.shapes: dict[str, tuple | None] = {}
        self.rng = rng
        self.hw = height
        self.c = channels
        self.bns = 0

    def node(self, name, op, inputs=(), shape=None, **attrs):
        node = self.g.node.add(name=name, op=op, input=list(inputs))
        for key, value in attrs.items():
            if isinstance(value, tf.DType):
                node.attr[key].type = value.as_datatype_enum
            elif isinstance(value, bool):
                node.attr[key].b = value
            elif isinstance(value, float):
                node.attr[key].f = value
            elif isinstance(value, bytes):
                node.attr[key].s = value
            elif isinstance(value, list):
                node.attr[key].list.i.extend(value)
            else:
                raise TypeError(key)
        if op != "Const":
            self.shapes[name] = shape
        return name

    def const(self, name, value):
        node = self.g.node.add(name=name, op="Const")
        value = np.asarray(value)
        dtype = tf.as_dtype(value.dtype)
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        return name

    def variable(self, name, value):
        """A former variable: a Const read through an Identity."""
        const = self.const(f"{name}/resource", value.astype(np.float32))
        return self.node(
            f"{name}/ReadVariableOp", "Identity", [const], np.shape(value), T=tf.float32
        )

    def act(self):
        return (None, self.hw, self.hw, self.c)

    def conv(self, p, x):
        c = self.c
        w = self.variable(f"{p}/kernel", self.rng.normal(0, 0.3 / np.sqrt(9 * c), (3, 3, c, c)))
        return self.node(
            f"{p}/Conv2D",
            "Conv2D",
            [x, w],
            self.act(),
            T=tf.float32,
            strides=[1, 1, 1, 1],
            padding=b"SAME",
            data_format=b"NHWC",
            dilations=[1, 1, 1, 1],
            use_cudnn_on_gpu=True,
        )

    def _bn_params(self, p):
        c = self.c
        gamma = self.variable(f"{p}/gamma", self.rng.uniform(0.5, 1.5, c))
        beta = self.variable(f"{p}/beta", self.rng.normal(0, 0.5, c))
        mean = self.variable(f"{p}/moving_mean", self.rng.normal(0, 0.5, c))
        var = self.variable(f"{p}/moving_variance", self.rng.uniform(0.3, 2.0, c))
        return gamma, beta, mean, var

    def fused_bn(self, p, x):
        self.bns += 1
        gamma, beta, mean, var = self._bn_params(p)
        name = self.node(
            f"{p}/FusedBatchNormV3",
            "FusedBatchNormV3",
            [x, gamma, beta, mean, var],
            self.act(),
            T=tf.float32,
            U=tf.float32,
            epsilon=1e-3,
            data_format=b"NHWC",
            is_training=False,
            exponential_avg_factor=1.0,
        )
        for i in range(1, 6):
            self.shapes[f"{name}:{i}"] = (self.c,) if i < 5 else None
        return name

    def decomposed_bn(self, p, x):
        """Keras 3's frozen batch norm: ``x * inv + (beta - mean * inv)`` under ``batchnorm/``."""
        self.bns += 1
        gamma, beta, mean, var = self._bn_params(p)
        c, s, f = (self.c,), f"{p}/batchnorm", tf.float32
        eps = self.const(f"{s}/add/y", np.float32(1e-3))
        add = self.node(f"{s}/add", "AddV2", [var, eps], c, T=f)
        rsqrt = self.node(f"{s}/Rsqrt", "Rsqrt", [add], c, T=f)
        mul = self.node(f"{s}/mul", "Mul", [rsqrt, gamma], c, T=f)
        mul_1 = self.node(f"{s}/mul_1", "Mul", [x, mul], self.act(), T=f)
        mul_2 = self.node(f"{s}/mul_2", "Mul", [mean, mul], c, T=f)
        sub = self.node(f"{s}/sub", "Sub", [beta, mul_2], c, T=f)
        return self.node(f"{s}/add_1", "AddV2", [mul_1, sub], self.act(), T=f)

    def block(self, i, x):
        bn = self.fused_bn if i % 2 == 0 else self.decomposed_bn
        p = f"block{i}"
        y = self.node(
            f"{p}/relu1",
            "Relu",
            [bn(f"{p}/bn1", self.conv(f"{p}/conv1", x))],
            self.act(),
            T=tf.float32,
        )
        y = bn(f"{p}/bn2", self.conv(f"{p}/conv2", y))
        y = self.node(f"{p}/add", "AddV2", [x, y], self.act(), T=tf.float32)
        y = self.node(f"{p}/relu2", "Relu", [y], self.act(), T=tf.float32)
        if i % 4 == 3:
            y = self.fused_bn(f"{p}/bn3", y)  # after the Relu: cannot fold exactly
        return y


NODES_PER_BLOCK = 36.25  # (27 + 41) / 2 + 9 / 4, see _Builder.block


def synthetic(nodes: int, seed: int = 0, height: int = 8, channels: int = 8, classes: int = 10):
    """A residual conv+BN stack of about ``nodes`` nodes: ``(graph_def, inputs, outputs, shapes,
    blocks, batch norms)``."""
    b = _Builder(np.random.default_rng(seed), height, channels)
    x = b.node("x", "Placeholder", [], b.act(), dtype=tf.float32)
    b.g.node[-1].attr["shape"].shape.CopyFrom(
        tf.TensorShape([None, height, height, channels]).as_proto()
    )
    blocks = max(1, round((nodes - 12) / NODES_PER_BLOCK))
    for i in range(blocks):
        x = b.block(i, x)
    axes = b.const("head/Mean/reduction_indices", np.array([1, 2], np.int32))
    pooled = b.node(
        "head/Mean",
        "Mean",
        [x, axes],
        (None, channels),
        T=tf.float32,
        Tidx=tf.int32,
        keep_dims=False,
    )
    w = b.variable("head/dense/kernel", b.rng.normal(0, 0.3, (channels, classes)))
    bias = b.variable("head/dense/bias", b.rng.normal(0, 0.3, classes))
    y = b.node(
        "head/MatMul",
        "MatMul",
        [pooled, w],
        (None, classes),
        T=tf.float32,
        transpose_a=False,
        transpose_b=False,
    )
    y = b.node("logits", "BiasAdd", [y, bias], (None, classes), T=tf.float32, data_format=b"NHWC")
    return b.g, ["x"], [y], b.shapes, blocks, b.bns


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return None


class _PeakRss:
    """The largest resident set size over the start, sampled every few milliseconds by a thread
    (Linux; ``None`` elsewhere). It counts what tracemalloc does not see: the protobuf messages
    (upb allocates outside Python's allocator) and NumPy's buffers."""

    def __enter__(self):
        self.start = _rss_mib()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.start is not None:
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib() or 0.0)

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_mib() or 0.0)

    @property
    def growth(self) -> float | None:
        return None if self.start is None else self.peak - self.start


def scaling_row(nodes: int, repeats: int, verify_up_to: int) -> dict:
    graph_def, inputs, outputs, shapes, blocks, bns = synthetic(nodes)
    runs = []
    for _ in range(repeats):
        seconds = {}
        optimized, report = graphfold.optimize_graph_def(
            graph_def, inputs, outputs, shapes, seconds
        )
        runs.append(seconds)
        del optimized
    med = {k: benchlib.median([r[k] for r in runs]) for k in OWN}
    own = benchlib.median([sum(r[k] for k in OWN) for r in runs])
    tracemalloc.start()
    tracemalloc.reset_peak()
    with _PeakRss() as rss:
        optimized, report = graphfold.optimize_graph_def(graph_def, inputs, outputs, shapes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    error = None
    if len(graph_def.node) <= verify_up_to:
        x = np.random.default_rng(1).normal(size=(2, 8, 8, 8)).astype(np.float32)
        want = import_graph(graph_def, inputs, outputs)(tf.constant(x))[0].numpy()
        got = import_graph(optimized, inputs, outputs)(tf.constant(x))[0].numpy()
        error = float(np.abs(want - got).max() / (np.abs(want).max() or 1.0))
    return dict(
        nodes=len(graph_def.node),
        blocks=blocks,
        folded=f"{len(report.folded)}/{len(report.batch_norms)}",
        seconds=med,
        own=own,
        per_node=own / len(graph_def.node),
        tracemalloc=peak / 2**20,
        rss=rss.growth,
        graph_mib=graph_def.ByteSize() / 2**20,
        error=error,
    )


def scaling_markdown(r: dict, first: dict) -> str:
    cells = [str(r["nodes"]), str(r["blocks"]), r["folded"]]
    cells += [_s(r["seconds"][k]) for k in OWN] + [_s(r["own"])]
    cells += [
        f"{r['per_node'] * 1e6:.1f}",
        f"{r['per_node'] / first['per_node']:.2f}",
        f"{r['graph_mib']:.1f}",
        f"{r['tracemalloc']:.1f}",
        "–" if r["rss"] is None else f"{r['rss']:.1f}",
        "–" if r["error"] is None else f"{r['error']:.0e}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated; '' for none")
    parser.add_argument("--frameworks", default="keras3,tf-keras")
    parser.add_argument("--repeats", type=int, default=3, help="rewrites per model")
    parser.add_argument("--size", type=int, help="input size instead of the model's own")
    parser.add_argument(
        "--keras-folder",
        default="DenseNet121",
        help="tf-keras models to time the Keras-level folder on: names, 'all' or 'none'",
    )
    parser.add_argument(
        "--sizes",
        default="1000,5000,20000,50000",
        help="synthetic graph sizes (nodes); '' for none",
    )
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument(
        "--verify-up-to",
        type=int,
        default=6000,
        help="compare outputs before/after on synthetic graphs this small",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--out", help="also write the tables (Markdown) to this file")
    args = parser.parse_args(argv)

    lines = [f"# {benchlib.machine()}"]
    print(lines[0], flush=True)
    models = [m for m in args.models.split(",") if m]
    if models:
        folder = {"all": models, "none": []}.get(args.keras_folder, args.keras_folder.split(","))
        installed = benchlib.keras_folder() is not None
        lines += [
            "",
            f"Seconds per stage, median of {args.repeats} rewrites; own = normalize + "
            f"plan + apply; keras folder: tensorflow-batchnorm-folding "
            f"({'installed' if installed else 'not installed'}), one run.",
            "",
            _table_header(MODEL_COLUMNS),
        ]
        print("\n".join(lines[-4:]), flush=True)
        for framework in args.frameworks.split(","):
            legacy = benchlib.FRAMEWORKS[framework]
            for name in models:
                r = model_row(name, legacy, args.repeats, args.size, name in folder, args.profile)
                lines.append(model_markdown(r))
                print(lines[-1], flush=True)
                examples.keras_module(legacy).backend.clear_session()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        lines += [
            "",
            f"Synthetic residual conv+BN stacks: graphfold.optimize_graph_def, median of "
            f"{args.scaling_repeats} runs.",
            "",
            _table_header(SCALING_COLUMNS),
        ]
        print("\n".join(lines[-4:]), flush=True)
        graphfold.optimize_graph_def(*synthetic(300)[:4])  # warm-up, not timed
        first = None
        for size in sizes:
            r = scaling_row(size, args.scaling_repeats, args.verify_up_to)
            first = first or r
            lines.append(scaling_markdown(r, first))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
