"""Hostile and malformed graphs: the rewrite must not crash, must not run anything, and must either
fold exactly or leave the batch norm with a reason. What each case gets is listed in
docs/reliability.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

import graphfold

from helpers import (
    assert_close,
    bn_params,
    check_rewrite,
    decomposed_bn,
    freeze,
    make,
    nodes_of,
    op_counts,
    weight,
    weight_of,
)
from helpers import fused_bn as bn

EPS = 1e-3


def spec(*shape, dtype=tf.float32):
    return tf.TensorSpec([None, *shape], dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(777)


def same_with_nan(want, got):
    """Outputs equal where finite, NaN where NaN, the same infinities."""
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(want), np.isnan(got))
    np.testing.assert_array_equal(np.isinf(want), np.isinf(got))
    finite = np.isfinite(want)
    np.testing.assert_allclose(
        got[finite],
        want[finite],
        rtol=1e-5,
        atol=1e-5 * max(1.0, np.abs(want[finite]).max(initial=0)),
    )


# ---- unknown ops and control flow ----------------------------------------------------------------
def test_ops_graphfold_does_not_know_block_and_stay_exact(rng):
    """Erf, Sigmoid, Cumsum around batch norms: never passed through, never crash (the dense
    Einsum between them absorbs the first batch norm backward)."""
    w, p1, p2 = weight((3, 3, 3, 4), rng), bn_params(4, rng), bn_params(4, rng)
    e = weight((4, 4), rng)

    def body(x):
        y = bn(tf.math.erf(tf.nn.conv2d(x, w, 1, "SAME")), p1)
        y = tf.einsum("nhwc,cd->nhwd", y, e)
        return tf.math.cumsum(bn(tf.sigmoid(y), p2), axis=1)

    folded = check_rewrite(make(body, spec(5, 5, 3)), rng)
    first, second = folded.report.batch_norms
    assert first.direction == "backward" and "Einsum" in first.absorbed_by[0], first
    assert "Erf" in first.tried["forward"], first
    assert not second.folded and "Sigmoid" in second.reason and "Cumsum" in second.reason


def test_an_op_tensorflow_does_not_know_only_blocks():
    """A GraphDef with an op no TensorFlow build registers (a custom op of another runtime):
    optimize_graph_def works on the protobuf alone, so it must not crash; the BN next to it
    stays, with the op named as the blocker, and the custom node is kept as it was."""
    rng = np.random.default_rng(3)
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)
    fn = make(
        lambda x: bn(tf.identity(tf.nn.conv2d(x, w, 1, "VALID"), name="custom"), p), spec(4, 4, 3)
    )
    frozen = freeze(fn)
    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(frozen.graph_def)
    (custom,) = [n for n in graph_def.node if n.name == "custom"]
    custom.op = "VendorFancyOp"
    custom.attr["mode"].s = b"secret"
    optimized, report = graphfold.optimize_graph_def(
        graph_def, frozen.inputs, frozen.outputs, frozen.shapes
    )
    (entry,) = report.batch_norms
    assert not entry.folded and "VendorFancyOp" in entry.reason
    (kept,) = [n for n in optimized.node if n.name == "custom"]
    assert kept.op == "VendorFancyOp" and kept.attr["mode"].s == b"secret"


def test_control_flow_next_to_batch_norms(rng):
    """A BN feeding a tf.cond, a BN after a tf.while_loop, a BN inside a cond branch: If/While are
    blockers, the bodies are left as they are, the rest folds, outputs stay exact."""
    w1, w2 = weight((3, 3, 3, 4), rng), weight((1, 1, 4, 4), rng)
    p1, p2, p3 = bn_params(4, rng), bn_params(4, rng), bn_params(4, rng)

    def body(x, flag):
        y = bn(tf.nn.conv2d(x, w1, 1, "SAME"), p1)
        y = tf.cond(flag, lambda: tf.nn.conv2d(y, w2, 1, "SAME"), lambda: bn(y, p3))
        i, y = tf.while_loop(lambda i, v: i < 2, lambda i, v: (i + 1, v * 0.5), (0, y))
        return bn(y, p2)

    fn = make(body, spec(5, 5, 3), tf.TensorSpec([], tf.bool))
    folded = graphfold.rewrite(fn)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    for flag in (True, False):
        assert_close(fn, folded, (x, tf.constant(flag)))
    report = folded.report
    # p1 folds into w1; p2 is blocked by the While; p3, inside the cond branch, is listed
    assert len(report.batch_norms) == 3 and len(report.folded) == 1, str(report)
    assert any("If" in e.reason or "While" in e.reason for e in report.not_folded)
    assert any("tf.cond branch" in e.reason for e in report.not_folded), str(report)


# ---- NaN, Inf, negative variance -----------------------------------------------------------------
@pytest.mark.parametrize("form", ["fused", "decomposed"])
@pytest.mark.parametrize(
    "poison", ["nan_mean", "inf_mean", "inf_gamma", "nan_var", "negative_var_below_eps"]
)
def test_non_finite_statistics_are_kept_faithfully(rng, form, poison):
    """A BN whose s or t is not finite is not folded (it would put NaN/Inf into the weights and
    spread it to every output channel); it stays (fused: as it is; decomposed: as one
    multiply-add) and computes exactly what the original does, NaN for NaN."""
    w = weight((3, 3, 3, 4), rng)
    gamma, beta, mean, var = (np.array(v) for v in bn_params(4, rng))
    if poison == "nan_mean":
        mean[1] = np.nan
    elif poison == "inf_mean":
        mean[2] = np.inf
    elif poison == "inf_gamma":
        gamma[0] = np.inf
    elif poison == "nan_var":
        var[3] = np.nan
    else:
        var[1] = -0.5  # var + eps < 0: rsqrt is NaN
    p = (gamma, beta, mean, var)
    norm = bn if form == "fused" else decomposed_bn

    fn = make(lambda x: norm(tf.nn.conv2d(x, w, 1, "SAME"), p), spec(5, 5, 3))
    folded = graphfold.rewrite(fn)
    (entry,) = folded.report.batch_norms
    assert not entry.folded and "finite" in entry.reason
    (conv,) = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_array_equal(weight_of(folded.graph_def, conv), w)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    same_with_nan(fn(x).numpy(), folded(x).numpy())


def test_negative_variance_above_minus_eps_folds_faithfully(rng):
    """var = -eps/2 makes var + eps > 0: TensorFlow's kernel computes a finite rsqrt, and so does
    the fold: folded, and exact."""
    w = weight((3, 3, 3, 4), rng)
    gamma, beta, mean, var = (np.array(v) for v in bn_params(4, rng))
    var[0] = -EPS / 2
    folded = check_rewrite(
        make(lambda x: bn(tf.nn.conv2d(x, w, 1, "SAME"), (gamma, beta, mean, var)), spec(5, 5, 3)),
        rng,
    )
    (entry,) = folded.report.batch_norms
    assert entry.folded


# ---- other dtypes next to batch norms ------------------------------------------------------------
def test_integer_and_string_tensors_next_to_batch_norms(rng):
    """Int and string Add/Mul by constants are not affine maps; they and the BN beside them are
    handled independently, and every output (int, string, float) is what the original gives."""
    w, p = weight((3, 3, 3, 4), rng), bn_params(4, rng)

    def body(x, n, s):
        y = bn(tf.nn.conv2d(x, w, 1, "SAME"), p)
        count = (n * 3 + 2) // 2
        label = s + tf.constant("-suffix")
        mixed = y * tf.cast(tf.reshape(count[:, :1], [-1, 1, 1, 1]), tf.float32)
        return y, count, label, tf.strings.as_string(n), mixed

    fn = make(body, spec(5, 5, 3), spec(4, dtype=tf.int32), spec(dtype=tf.string))
    folded = graphfold.rewrite(fn)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    n = tf.constant(rng.integers(-5, 5, (2, 4)), tf.int32)
    s = tf.constant([b"a", b"b"])
    want, got = fn(x, n, s), folded(x, n, s)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype
        if a.dtype.is_floating:
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert [e.folded for e in folded.report.batch_norms] == [True]  # forward, into the conv


def test_integer_batch_norm_like_chain_is_not_an_affine_map(rng):
    """``n * k + b`` on int32 looks like a decomposed batch norm and is not one."""
    w = weight((4, 3), rng)

    def body(x, n):
        return tf.matmul(x, w), n * tf.constant([2, 3, 4, 5]) + tf.constant([1, 1, 1, 1])

    folded = check_rewrite(make(body, spec(4), spec(4, dtype=tf.int32)), rng)
    assert not folded.report.entries


# ---- huge constants ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fill", "tile", "broadcast"])
def test_constant_math_that_would_be_huge_is_not_evaluated(rng, kind):
    """``tf.fill([2**20, 2**20])`` (4 TiB), a Tile or a broadcasting Mul of the same size, all
    of constants: the normalizer must not try to allocate it (it raised MemoryError; a smaller
    one that fits in RAM would have been materialized). It stays in the graph, unevaluated."""
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)

    def body(x):
        if kind == "fill":
            big = tf.fill([2**20, 2**20], 0.5)
        elif kind == "tile":
            big = tf.tile(tf.constant([[0.5]]), [2**20, 2**20])
        else:
            big = tf.ones([2**20, 1]) * tf.ones([1, 2**20])
        return bn(tf.nn.conv2d(x, w, 1, "VALID"), p) + tf.reduce_max(big), tf.shape(big)

    fn = make(body, spec(4, 4, 3))
    folded = graphfold.rewrite(fn)  # must return, without a MemoryError
    assert folded.report.batch_norms[0].folded
    ops = op_counts(folded.graph_def)
    assert ops[{"fill": "Fill", "tile": "Tile", "broadcast": "Mul"}[kind]] >= 1


def test_float16_fold_that_would_overflow_is_refused(rng):
    """Weights near the float16 maximum times a BN scale > 1 would overflow to inf: refused."""
    w = np.full((1, 1, 2, 2), 30000.0, np.float16)
    gamma = np.asarray([4.0, 4.0], np.float32)
    p = (gamma, np.zeros(2, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32))

    def body(x):
        return bn(tf.nn.conv2d(x, w, 1, "VALID"), p)

    fn = make(body, spec(2, 2, 2, dtype=tf.float16))
    folded = graphfold.rewrite(fn)
    (entry,) = folded.report.batch_norms
    assert not entry.folded and "overflows float16" in entry.reason
    # Kept as the FusedBatchNormV3 it was: as ``conv * s + t`` Grappler's constant folding would
    # push the Mul into the float16 filter at run time and overflow anyway (30000·4 > 65504).
    assert op_counts(folded.graph_def)["FusedBatchNormV3"] == 1
    x = np.full((1, 2, 2, 2), 1e-4, np.float16)
    np.testing.assert_allclose(
        folded(x).numpy().astype(np.float64), fn(x).numpy().astype(np.float64), rtol=2e-3
    )


def test_a_large_weight_folds(rng):
    """A 2048 x 1024 Dense weight (8 MB): folded in float64 and written back, exact."""
    w = weight((2048, 1024), rng)
    p = bn_params(1024, rng)
    folded = check_rewrite(make(lambda x: decomposed_bn(tf.matmul(x, w), p), spec(2048)), rng)
    assert folded.report.batch_norms[0].folded


# ---- stateful ops on constants -------------------------------------------------------------------
def test_write_file_of_constants_is_never_run_by_the_rewrite(rng, tmp_path):
    """``tf.io.write_file`` whose inputs are all constants is a stateful op: folding evaluates only
    allowlisted pure math, so rewriting must not create the file. Calling the folded function
    runs the model's graph, as TF Serving would: then the file appears, as with the original.
    rewrite's own check scans first and runs them only with ``allow_ops`` (issue 21)."""
    target = tmp_path / "pwned.txt"
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)

    def body(x):
        tf.io.write_file(str(target), tf.constant("written"))
        return bn(tf.nn.conv2d(x, w, 1, "VALID"), p)

    fn = make(body, spec(4, 4, 3))
    folded = graphfold.rewrite(fn, verify=False)
    assert not target.exists(), "rewriting ran the WriteFile op"
    assert op_counts(folded.graph_def)["WriteFile"] == 1
    assert folded.report.batch_norms[0].folded
    folded(rng.normal(size=(1, 4, 4, 3)).astype("float32"))
    assert target.read_bytes() == b"written"
    target.unlink()
    checked = graphfold.rewrite(fn)  # the check scans first: it does not run WriteFile
    assert not target.exists(), "rewrite's own check ran the WriteFile op"
    assert checked.report.verification.status == "skipped"
    assert "WriteFile" in checked.report.verification.reason
    graphfold.rewrite(fn, allow_ops=["WriteFile"])  # with consent the check runs the model
    assert target.read_bytes() == b"written"


def test_other_stateful_ops_on_constants_stay(rng, tmp_path):
    """Random ops, an Assert and a Print of constants are stateful: kept as they are, not
    evaluated; the rewrite itself prints nothing and fails no assertion."""
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)
    log = tmp_path / "print.txt"

    def body(x):
        noise = tf.random.uniform([4], seed=1)
        check = tf.debugging.Assert(tf.constant(False), [tf.constant("boom")])
        printed = tf.print("hello", output_stream=f"file://{log}")
        with tf.control_dependencies([check, printed]):
            y = tf.identity(x)
        return bn(tf.nn.conv2d(y, w, 1, "VALID"), p) + noise

    fn = make(body, spec(4, 4, 3))
    folded = graphfold.rewrite(fn)
    ops = op_counts(folded.graph_def)
    assert ops["RandomUniform"] == 1 and ops["Assert"] == 1 and ops["PrintV2"] == 1
    assert not log.exists()
    with pytest.raises(tf.errors.InvalidArgumentError):
        folded(rng.normal(size=(1, 4, 4, 3)).astype("float32"))  # the Assert still fires


def test_evaluators_are_pure_registered_ops():
    """What folding may evaluate is an allowlist (graphfold.fold.constants.EVALUATORS),
    computed with
    NumPy; no op in it is stateful in TensorFlow's registry."""
    from tensorflow.python.framework import op_def_registry

    from graphfold.fold import constants

    for op in constants.EVALUATORS:
        op_def = op_def_registry.get(op)
        assert op_def is not None, f"{op} is not a TensorFlow op"
        assert not op_def.is_stateful, f"{op} is stateful"


def test_a_dangling_input_is_a_clear_error():
    graph_def = graph_pb2.GraphDef()
    node = graph_def.node.add(name="y", op="Identity", input=["missing"])
    node.attr["T"].type = tf.float32.as_datatype_enum
    with pytest.raises(ValueError, match="'y' reads 'missing'"):
        graphfold.optimize_graph_def(graph_def, [], ["y"], {})
