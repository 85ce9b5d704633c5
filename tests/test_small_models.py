"""The small models of ``graphfold.examples.SMALL_MODELS`` (U-Net, 3-D conv net, grouped-conv
net): every batch norm folds, exactly, into the layer kind the model puts next to it."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from graphfold import examples

from helpers import assert_no_batch_norm, check_rewrite

# model -> {op that absorbs: how many batch norms} (the rest go into Conv2D / Conv3D)
EXPECTED = {
    "UNet": {"Conv2DBackpropInput": 2, "Conv2D": 5},
    "Conv3DNet": {"Conv3DBackpropInputV2": 1, "Conv3D": 3},
    "GroupedNet": {"Conv2D": 7},
}


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "tf_keras"])
@pytest.mark.parametrize("name", list(examples.SMALL_MODELS))
def test_small_model_folds_every_batch_norm(name, legacy):
    pytest.importorskip("tf_keras" if legacy else "keras")
    model, shape, count = examples.small_model(name, legacy, seed=3)
    folded = check_rewrite(examples.concrete(model, shape), np.random.default_rng(3))
    report = folded.report
    assert len(report.batch_norms) == count and len(report.folded) == count, str(report)
    assert_no_batch_norm(folded.graph_def)
    nodes = {n.name: n for n in folded.graph_def.node}
    absorbed = collections.Counter(nodes[e.absorbed_by[0]].op for e in report.folded)
    assert dict(absorbed) == EXPECTED[name], (dict(absorbed), str(report))
    assert all(e.direction == "forward" for e in report.folded)
    if name == "GroupedNet":  # the grouped 3x3 convs absorbed theirs (filter C_in/4)
        grouped = [
            e
            for e in report.folded
            if nodes[e.absorbed_by[0]].op == "Conv2D"
            and _in_channels(nodes, nodes[e.absorbed_by[0]]) == 4
        ]
        assert len(grouped) == 2, str(report)


def _in_channels(nodes, conv) -> int:
    import tensorflow as tf

    tensor = conv.input[1]
    while nodes[tensor.split(":")[0]].op != "Const":
        tensor = nodes[tensor.split(":")[0]].input[0]
    return tf.make_ndarray(nodes[tensor.split(":")[0]].attr["value"].tensor).shape[2]


def test_grouped_net_as_a_saved_model(tmp_path):
    """Through a Keras 3 export the grouped convs' nested calls hide the shapes of what follows
    them from TensorFlow; once inlined, shape inference sees through: all 7 batch norms fold."""
    import graphfold

    model, _, count = examples.small_model("GroupedNet", legacy=False, seed=4)
    model.export(str(tmp_path / "src"), verbose=False)
    result = graphfold.optimize_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    report = result["serving_default"]
    assert len(report.batch_norms) == count and len(report.folded) == count, str(report)
    assert "StatefulPartitionedCall" not in report.ops_after
    assert all(check.status == "ok" for check in result.verification.values())


def test_freeze_only_freezes_and_folds_nothing():
    """``rewrite.freeze_only``, the "frozen, not folded" of ``graphfold demo`` and
    tools/bench_serving.py: the same outputs, the weights constants, every batch norm still
    computed (what freezing alone gives), where ``rewrite`` folds them all."""
    from graphfold.convert.rewrite import freeze_only, rewrite

    from helpers import assert_close, batch_norm_census, random_inputs

    rng = np.random.default_rng(5)
    model, shape, count = examples.small_model("UNet", False, seed=5)
    fn = examples.concrete(model, shape)
    frozen = freeze_only(fn)
    assert batch_norm_census(frozen.graph_def) == count
    assert not frozen.report.batch_norms
    assert not frozen.function.variables
    ops = {op.type for op in frozen.function.graph.get_operations()}
    assert not ops & {"ReadVariableOp", "VarHandleOp"}, ops
    assert_close(fn, frozen, random_inputs(fn, rng))
    assert batch_norm_census(rewrite(fn).graph_def) == 0
