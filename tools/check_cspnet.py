"""keras-hub CSPNetBackbone (issue 17): folded, then run as TensorFlow runs it, against it.

    python tools/check_cspnet.py [--config cspresnext50|cspresnet50] [--size 224]

A small cspresnext50-like backbone (the architecture of keras-hub's ``csp_resnext_50`` preset,
fewer blocks and filters), ``weights=None`` with random batch-norm statistics, LeakyReLU(0.01)
after every residual add: the pattern TensorFlow 2.21 miscomputes once a fold removes the batch
norm between the convolution and the add (``graphfold/fold/tf_quirks.py``). Prints the folded
function's relative error against the original (both ``tf.function``, Grappler included), the
freeze-only noise floor, and rewrite's own check. keras-hub is not a dependency of graphfold:
this script needs it installed (the test suite does not).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "cspresnext50": dict(
        stackwise_num_filters=[32, 64, 128],
        bottle_ratio=[1.0],
        block_ratio=[0.5],
        expand_ratio=[1.0],
        groups=8,
    ),
    "cspresnet50": dict(
        stackwise_num_filters=[32, 64, 128],
        bottle_ratio=[0.5],
        block_ratio=[1.0],
        expand_ratio=[2.0],
        groups=1,
    ),
}


def cspnet(keras_hub, config: str):
    """The small cspresnext50-like (or cspresnet50-like) backbone, ``weights=None``."""
    return keras_hub.models.CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=7,
        stem_strides=4,
        stackwise_depth=[2, 2, 2],
        stackwise_strides=[1, 2, 2],
        block_type="bottleneck_block",
        stage_type="csp",
        stem_pooling="max",
        stem_padding="valid",
        cross_linear=True,
        **CONFIGS[config],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cspresnext50")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    try:
        import keras_hub
    except ImportError:
        print("keras-hub is not installed: nothing to check")
        return 0
    import numpy as np
    import tensorflow as tf

    import graphfold
    from graphfold import examples
    from graphfold.convert import noise
    from graphfold.convert.verify import compare

    backbone = cspnet(keras_hub, args.config)
    examples.randomise(backbone, np.random.default_rng(0))
    fn = tf.function(lambda x: backbone(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, args.size, args.size, 3], tf.float32, name="x")
    )
    folded = graphfold.rewrite(fn)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, args.size, args.size, 3)), tf.float32)
    error = compare(fn(x).numpy(), folded(x).numpy())[1]
    floor = compare(fn(x).numpy(), noise.unfolded(fn)(x).numpy())[1]
    report = folded.report
    print(f"keras-hub CSPNetBackbone ({args.config}-like): {report.summary()}")
    for note in report.notes:
        print(f"note: {note}")
    print(
        f"rel error {error:.3g} at 2 x {args.size} x {args.size} (freeze-only noise floor "
        f"{floor:.3g}); rewrite's check: {report.verification.line()}"
    )
    return 0 if error <= max(1e-5, 4 * floor) else 1


if __name__ == "__main__":
    sys.exit(main())
