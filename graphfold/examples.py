"""Example models for the demo, the tools and the tests, with randomised batch-norm statistics.

Default initialisation (γ=1, β=0, μ=0, σ²=1, zero biases) makes every batch norm nearly the
identity and hides folding bugs, so every example gets random statistics and biases.
"""

from __future__ import annotations

import numpy as np

APPLICATIONS = {
    "ResNet50": 224,
    "MobileNetV2": 224,
    "MobileNetV3Small": 224,
    "MobileNetV3Large": 224,
    "EfficientNetB0": 224,
    "InceptionV3": 299,
    "InceptionResNetV2": 299,
    "DenseNet121": 224,
    "NASNetMobile": 224,
}
# Pre-activation networks (BN → ReLU → conv), where partial folds matter: by name, not in the
# default set of the fold table.
PRE_ACTIVATION = {"ResNet50V2": 224, "DenseNet169": 224}


def keras_module(legacy: bool):
    """``tf_keras`` (Keras 2, emits FusedBatchNormV3) or Keras 3."""
    if legacy:
        import tf_keras

        return tf_keras
    import keras

    return keras


def all_layers(model) -> list:
    """Every layer inside ``model``, however deeply nested (the sublayers of custom layers, as
    keras-hub and the TF Model Garden build them, not only ``model.layers``), each once."""
    flatten = getattr(model, "_flatten_layers", None)  # Keras 3 and tf-keras alike
    if flatten is not None:
        return [layer for layer in flatten(include_self=False, recursive=True)]
    found: list = []
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if any(layer is seen for seen in found):
            continue
        found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def randomise(model, rng: np.random.Generator, negative_gamma: float = 0.3) -> int:
    """Random BN statistics (γ in ±[0.5, 1.5] with a share ``negative_gamma`` of negatives,
    β, μ normal, σ² in [0.3, 2]) and random biases in every layer however deeply nested;
    returns the number of BN layers."""
    count = 0
    for layer in all_layers(model):
        weights = layer.get_weights()
        if not weights:
            continue
        names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
        # a container's weights include its sublayers' (visited on their own): only its own
        inner = {id(v) for sub in all_layers(layer) for v in sub.weights}
        names = [n if id(v) not in inner else "" for n, v in zip(names, layer.weights)]
        if type(layer).__name__.endswith("BatchNormalization"):
            count += 1
            new = []
            for name, w in zip(names, weights):
                if "gamma" in name:
                    sign = np.where(rng.random(w.shape) < negative_gamma, -1.0, 1.0)
                    value = rng.uniform(0.5, 1.5, w.shape) * sign
                elif "variance" in name:
                    value = rng.uniform(0.3, 2.0, w.shape)
                else:  # beta, moving_mean
                    value = rng.normal(0.0, 0.5, w.shape)
                new.append(value.astype(w.dtype))
            layer.set_weights(new)
        elif any("bias" in n for n in names):
            layer.set_weights(
                [
                    rng.normal(0.0, 0.5, w.shape).astype(w.dtype) if "bias" in n else w
                    for n, w in zip(names, weights)
                ]
            )
    return count


def application(name: str, legacy: bool = False, seed: int = 0, negative_gamma: float = 0.3):
    """A ``keras.applications`` model (``weights=None``, no softmax; ``APPLICATIONS`` or
    ``PRE_ACTIVATION``), randomised (``negative_gamma``: the share of negative γ); returns
    ``(model, input_size, number of BN layers)``."""
    keras = keras_module(legacy)
    keras.utils.set_random_seed(seed)  # kernels too: the same model on every run
    size = {**APPLICATIONS, **PRE_ACTIVATION}[name]
    kwargs = dict(weights=None, input_shape=(size, size, 3))
    model = getattr(keras.applications, name)(classifier_activation=None, **kwargs)
    count = randomise(model, np.random.default_rng(seed), negative_gamma)
    return model, size, count


def concrete(model, shape, dtype="float32", name="x"):
    """The inference-mode ConcreteFunction of a Keras model, batch dimension unknown."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    return fn.get_concrete_function(tf.TensorSpec([None, *shape], dtype, name=name))


# ---- small models built on the layers keras.applications lacks ----------------------------------
def _unet(K):
    """A small U-Net: two encoder stages, Conv2DTranspose decoders with skip concatenations."""
    L = K.layers

    def block(x, filters):
        return L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 3, padding="same")(x)))

    inp = K.Input((32, 32, 3))
    e1 = block(inp, 8)
    e2 = block(L.MaxPooling2D()(e1), 16)
    mid = block(L.MaxPooling2D()(e2), 32)
    u2 = L.ReLU()(L.BatchNormalization()(L.Conv2DTranspose(16, 2, strides=2)(mid)))
    d2 = block(L.Concatenate()([u2, e2]), 16)
    u1 = L.ReLU()(L.BatchNormalization()(L.Conv2DTranspose(8, 3, strides=2, padding="same")(d2)))
    d1 = block(L.Concatenate()([u1, e1]), 8)
    return K.Model(inp, L.Conv2D(1, 1)(d1), name="unet")


def _conv3d_net(K):
    """A 3-D encoder-decoder: Conv3D, a strided Conv3D, a Conv3DTranspose, each with a BN."""
    L = K.layers
    inp = K.Input((8, 16, 16, 1))
    x = L.ReLU()(L.BatchNormalization()(L.Conv3D(8, 3, padding="same")(inp)))
    x = L.ReLU()(L.BatchNormalization()(L.Conv3D(16, 3, strides=2, padding="same")(x)))
    x = L.ReLU()(L.BatchNormalization()(L.Conv3DTranspose(8, 3, strides=2, padding="same")(x)))
    x = L.BatchNormalization()(L.Conv3D(4, 1)(x))
    return K.Model(inp, x, name="conv3d_net")


def _grouped_net(K):
    """ResNeXt-style blocks: 1x1 -> grouped 3x3 (4 groups) -> 1x1, each with a BN, residual."""
    L = K.layers

    def bn(x):
        return L.BatchNormalization()(x)

    inp = K.Input((32, 32, 3))
    x = L.ReLU()(bn(L.Conv2D(16, 3, padding="same")(inp)))
    for _ in range(2):
        y = L.ReLU()(bn(L.Conv2D(16, 1)(x)))
        y = L.ReLU()(bn(L.Conv2D(16, 3, padding="same", groups=4)(y)))
        x = L.ReLU()(L.Add()([x, bn(L.Conv2D(16, 1)(y))]))
    x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    return K.Model(inp, x, name="grouped_net")


SMALL_MODELS = {
    "UNet": (_unet, (32, 32, 3)),
    "Conv3DNet": (_conv3d_net, (8, 16, 16, 1)),
    "GroupedNet": (_grouped_net, (32, 32, 3)),
}


def small_model(name: str, legacy: bool = False, seed: int = 0):
    """One of ``SMALL_MODELS``, randomised; returns ``(model, input shape, number of BN
    layers)``."""
    keras = keras_module(legacy)
    keras.utils.set_random_seed(seed)
    build, shape = SMALL_MODELS[name]
    model = build(keras)
    return model, shape, randomise(model, np.random.default_rng(seed))
