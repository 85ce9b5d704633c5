import numpy as np
import tensorflow as tf

import graphfold


def test_conv_bn_folds_forward_and_stays_exact():
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
    gamma, beta, mean, var = (rng.uniform(0.5, 1.5, 4).astype("float32") for _ in range(4))

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], name="x")])
    def fn(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(y, gamma, beta, mean, var, is_training=False)[0]

    folded = graphfold.rewrite(fn)
    x = rng.normal(size=(2, 6, 6, 2)).astype("float32")
    want, got = fn(x).numpy(), folded(x).numpy()
    assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()
    assert len(folded.report.folded) == 1
    assert "FusedBatchNormV3" not in folded.report.ops_after
