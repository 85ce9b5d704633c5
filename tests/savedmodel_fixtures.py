"""Small SavedModels shared by test_saved_model.py and test_cli.py, built once per session.

Every batch norm has random statistics and every layer a random bias.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf

_CACHE: dict[str, str] = {}


def get(name: str, tmp_path_factory) -> str:
    """The path of SavedModel ``name`` (built on first use, then shared)."""
    if name not in _CACHE:
        root = tmp_path_factory.mktemp(f"src_{name}")
        path = str(root / name)
        BUILDERS[name](path)
        _CACHE[name] = path
    return _CACHE[name]


def tree_hash(path: str) -> str:
    """sha256 over every file name and byte under ``path`` (and the directory layout)."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        digest.update(os.path.relpath(directory, path).encode() + b"/\0")
        for name in sorted(files):
            full = os.path.join(directory, name)
            digest.update(name.encode() + b"\0")
            with open(full, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def rel_err(want, got) -> float:
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    return float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-30))


# ---- builders -------------------------------------------------------------------------------


def build_keras3(path: str) -> None:
    """Keras 3 ``model.export``: the demo's residual CNN on 16x16 inputs (7 batch norms)."""
    from graphfold.cli.demo import build_model

    build_model(seed=3, input_shape=(16, 16, 3)).export(path, verbose=False)


def _tf_keras_model():
    import tf_keras

    rng = np.random.default_rng(4)
    inputs = tf_keras.Input((8, 8, 3), name="pixels")
    x = tf_keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.ReLU()(x)
    x = tf_keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    x = tf_keras.layers.Dense(5)(x)
    x = tf_keras.layers.BatchNormalization()(x)
    model = tf_keras.Model(inputs, x)
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape) if i in (0, 3) else rng.normal(0, 0.3, w.shape)
                    for i, w in enumerate(layer.get_weights())
                ]
            )
        elif getattr(layer, "bias", None) is not None:
            weights = layer.get_weights()
            weights[-1] = rng.normal(0, 0.2, weights[-1].shape)
            layer.set_weights(weights)
    return model


def build_tf_keras(path: str) -> None:
    """tf-keras ``model.save(path, save_format="tf")``."""
    _tf_keras_model().save(path, save_format="tf")


def build_tf_keras_module(path: str) -> None:
    """tf-keras model through ``tf.saved_model.save`` (its default serving signature)."""
    tf.saved_model.save(_tf_keras_model(), path)


class TwoSignatures(tf.Module):
    """``predict``: float + int inputs, a dict of outputs; ``single``: one unnamed output."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(5)
        self.w = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
        self.b = tf.Variable(rng.normal(size=4).astype("float32"))
        self.gamma, self.mean = (
            tf.Variable(rng.uniform(0.5, 1.5, 4).astype("float32")) for _ in range(2)
        )
        self.beta, self.var = (
            tf.Variable(v.astype("float32"))
            for v in (rng.normal(0, 0.3, 4), rng.uniform(0.5, 2.0, 4))
        )
        self.dense = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))

    def _features(self, x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, self.w, 1, "SAME"), self.b)
        y = tf.compat.v1.nn.fused_batch_norm(
            y, self.gamma, self.beta, self.mean, self.var, is_training=False
        )[0]
        return tf.nn.relu(y)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 6, 6, 2], tf.float32, name="x"),
            tf.TensorSpec([None], tf.int32, name="k"),
        ]
    )
    def predict(self, x, k):
        pooled = tf.reduce_mean(self._features(x), axis=[1, 2])
        logits = tf.matmul(pooled, self.dense)
        return {
            "logits": logits * tf.cast(k, tf.float32)[:, None],
            "features": pooled,
            "count": k + 1,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], tf.float32, name="image")])
    def single(self, image):
        return self._features(image)


def build_two_signatures(path: str) -> None:
    module = TwoSignatures()
    tf.saved_model.save(
        module, path, signatures={"predict": module.predict, "single": module.single}
    )


class TableAndTraining(tf.Module):
    """``lookup``: string input through a vocabulary-file lookup table (an asset);
    ``train``: a fused batch norm in training mode; ``train_keras``: a Keras 3 one (which
    assigns to its moving statistics); ``serving_default``: a foldable one."""

    def __init__(self, vocab_file: str):
        super().__init__()
        rng = np.random.default_rng(6)
        self.w = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
        self.gamma = tf.Variable(rng.uniform(0.5, 1.5, 4).astype("float32"))
        self.beta = tf.Variable(rng.normal(0, 0.3, 4).astype("float32"))
        self.mean = tf.Variable(rng.normal(0, 0.3, 4).astype("float32"))
        self.var = tf.Variable(rng.uniform(0.5, 2.0, 4).astype("float32"))
        self.vocab = tf.saved_model.Asset(vocab_file)
        initializer = tf.lookup.TextFileInitializer(
            self.vocab,
            tf.string,
            tf.lookup.TextFileIndex.WHOLE_LINE,
            tf.int64,
            tf.lookup.TextFileIndex.LINE_NUMBER,
        )
        self.table = tf.lookup.StaticHashTable(initializer, default_value=-1)
        import keras

        self.keras_bn = keras.layers.BatchNormalization()
        self.keras_bn.build((None, 3))
        self.keras_bn.set_weights(
            [
                rng.uniform(0.5, 1.5, 3),
                rng.normal(0, 0.3, 3),
                rng.normal(0, 0.3, 3),
                rng.uniform(0.5, 2.0, 3),
            ]
        )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="words")])
    def lookup(self, words):
        return {"ids": self.table.lookup(words)}

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 2], tf.float32, name="x")])
    def train(self, x):
        y = tf.nn.conv2d(x, self.w, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(y, self.gamma, self.beta, is_training=True)[0]

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="v")])
    def train_keras(self, v):
        """A Keras 3 batch norm in training mode: it also updates its moving statistics."""
        return self.keras_bn(v, training=True)

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 2], tf.float32, name="x")])
    def infer(self, x):
        y = tf.nn.conv2d(x, self.w, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(
            y, self.gamma, self.beta, self.mean, self.var, is_training=False
        )[0]


def build_table(path: str) -> None:
    vocab = os.path.join(os.path.dirname(path), "vocab.txt")
    with open(vocab, "w") as f:
        f.write("alpha\nbeta\ngamma\n")
    module = TableAndTraining(vocab)
    tf.saved_model.save(
        module,
        path,
        signatures={
            "lookup": module.lookup,
            "train": module.train,
            "train_keras": module.train_keras,
            "serving_default": module.infer,
        },
    )
    os.remove(vocab)  # the SavedModel's own assets/ copy is all that is left


def build_no_signatures(path: str) -> None:
    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([], tf.float32)])
    tf.saved_model.save(module, path, signatures={})


BUILDERS = {
    "keras3": build_keras3,
    "tf_keras": build_tf_keras,
    "tf_keras_module": build_tf_keras_module,
    "two_signatures": build_two_signatures,
    "table": build_table,
    "no_signatures": build_no_signatures,
}


# ---- running a SavedModel -------------------------------------------------------------------


def random_feeds(path: str, key: str, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """NumPy inputs for signature ``key`` of the SavedModel at ``path``."""
    from graphfold.convert.verify import input_specs, random_inputs

    loaded = tf.saved_model.load(path)
    specs = input_specs(loaded.signatures[key])
    return {k: v.numpy() for k, v in random_inputs(specs, batch=batch, seed=seed).items()}


def run_tf2(path: str, key: str, feeds: dict) -> dict[str, np.ndarray]:
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures[key](**{k: tf.constant(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def run_tf1(path: str, key: str, feeds: dict, tags=("serve",)) -> dict[str, np.ndarray]:
    """Through the TF1 session loader: the path TF Serving's C++ loader takes."""
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, list(tags), path)
        signature = meta.signature_def[key]
        fetches = {k: v.name for k, v in signature.outputs.items()}
        return session.run(fetches, {signature.inputs[k].name: v for k, v in feeds.items()})


def signature_defs(path: str, tags=("serve",)) -> dict:
    """key -> (method name, {input: (dtype, shape)}, {output: (dtype, shape)}), for the
    user's signatures (not ``__saved_model_init_op``)."""
    from graphfold.serving.saved_model import INTERNAL_SIGNATURES, meta_graph_for, read_saved_model

    meta = meta_graph_for(read_saved_model(path), path, tags)

    def describe(infos):
        return {
            k: (v.dtype, tuple(d.size for d in v.tensor_shape.dim), v.tensor_shape.unknown_rank)
            for k, v in infos.items()
        }

    return {
        key: (sig.method_name, describe(sig.inputs), describe(sig.outputs))
        for key, sig in meta.signature_def.items()
        if key not in INTERNAL_SIGNATURES
    }


def build_tf1(path: str) -> None:
    """A TF1 ``SavedModelBuilder`` model: tag-set {serve, gpu}, a Predict and a Classify
    signature over a conv + fused batch norm held in variables."""
    rng = np.random.default_rng(9)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 2], name="x")
        w = tf.compat.v1.get_variable(
            "w", initializer=rng.normal(size=(3, 3, 2, 4)).astype("float32")
        )
        gamma, var = (
            tf.compat.v1.get_variable(n, initializer=rng.uniform(0.5, 1.5, 4).astype("float32"))
            for n in ("gamma", "var")
        )
        beta, mean = (
            tf.compat.v1.get_variable(n, initializer=rng.normal(0, 0.3, 4).astype("float32"))
            for n in ("beta", "mean")
        )
        y = tf.compat.v1.nn.fused_batch_norm(
            tf.nn.conv2d(x, w, 1, "SAME"), gamma, beta, mean, var, is_training=False
        )[0]
        scores = tf.reduce_mean(y, [1, 2])
        session.run(tf.compat.v1.global_variables_initializer())
        info = tf.compat.v1.saved_model.build_tensor_info
        builder = tf.compat.v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(
            session,
            ["serve", "gpu"],
            signature_def_map={
                "serving_default": tf.compat.v1.saved_model.predict_signature_def(
                    {"x": x}, {"scores": scores}
                ),
                "classify": tf.compat.v1.saved_model.build_signature_def(
                    {"x": info(x)}, {"scores": info(scores)}, "tensorflow/serving/classify"
                ),
            },
        )
        builder.save()


BUILDERS["tf1"] = build_tf1


# ---- serving pipelines: image bytes, warm-up records, extra files, several MetaGraphs --------

EXTRA_FILES = {  # written beside the graph by "the pipeline": graphfold must keep them as they are
    "assets.extra/notes.txt": b"exported by the test pipeline\n",
    "model_card.md": b"# jpeg classifier\n",
    "extra/nested/blob.bin": bytes(range(256)) * 3,
}
EMPTY_DIR = "extra/empty"


def jpeg_bytes(seed: int, size=(12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
    return tf.io.encode_jpeg(image, quality=95).numpy()


def warmup_record(signature: str, inputs: dict) -> bytes:
    """A serialized PredictionLog (predict_log) as TF Serving's warm-up file holds it."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "jpeg"
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    ).SerializeToString()


def write_tfrecord(path: str, records: list[bytes]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


class JpegClassifier(tf.Module):
    """``serving_default``: encoded JPEG bytes, decoded and resized inside the signature, as
    image services do; ``pixels``: the same network on float pixels."""

    def __init__(self, labels_file: str):
        super().__init__()
        rng = np.random.default_rng(11)
        self.w = tf.Variable(rng.normal(size=(3, 3, 3, 4)).astype("float32"))
        self.b = tf.Variable(rng.normal(0, 0.2, 4).astype("float32"))
        self.gamma, self.var = (
            tf.Variable(rng.uniform(0.5, 1.5, 4).astype("float32")) for _ in range(2)
        )
        self.beta, self.mean = (
            tf.Variable(rng.normal(0, 0.3, 4).astype("float32")) for _ in range(2)
        )
        self.dense = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))
        self.labels = tf.saved_model.Asset(labels_file)

    def _scores(self, pixels):
        y = tf.nn.bias_add(tf.nn.conv2d(pixels, self.w, 1, "SAME"), self.b)
        y = tf.compat.v1.nn.fused_batch_norm(
            y, self.gamma, self.beta, self.mean, self.var, is_training=False
        )[0]
        return tf.matmul(tf.reduce_mean(tf.nn.relu(y), axis=[1, 2]), self.dense)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            image = tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32) / 255.0
            return tf.image.resize(image, [8, 8])

        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
        return {"scores": self._scores(pixels)}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="pixels")])
    def serve_pixels(self, pixels):
        return {"scores": self._scores(pixels)}


def build_jpeg(path: str) -> None:
    """The JPEG classifier with two warm-up records for ``serving_default``, an asset, files in
    assets.extra/ and elsewhere, and an empty folder."""
    labels = os.path.join(os.path.dirname(path), "labels.txt")
    with open(labels, "w") as f:
        f.write("cat\ndog\nbird\n")
    module = JpegClassifier(labels)
    tf.saved_model.save(
        module,
        path,
        signatures={"serving_default": module.serve_bytes, "pixels": module.serve_pixels},
    )
    os.remove(labels)
    write_tfrecord(
        os.path.join(path, "assets.extra", "tf_serving_warmup_requests"),
        [
            warmup_record(
                "serving_default", {"image_bytes": np.array([jpeg_bytes(1), jpeg_bytes(2)])}
            ),
            warmup_record("", {"image_bytes": np.array([jpeg_bytes(3)])}),  # "" = serving_default
        ],
    )
    for rel, data in EXTRA_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(path, EMPTY_DIR))


def build_two_meta_graphs(path: str) -> None:
    """A TF1 builder model with two MetaGraphs: tag-sets {serve} and {train}."""
    rng = np.random.default_rng(12)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        w = tf.compat.v1.get_variable(
            "w", initializer=rng.normal(size=(1, 1, 2, 3)).astype("float32")
        )
        scale, var = (
            tf.compat.v1.get_variable(n, initializer=rng.uniform(0.5, 1.5, 3).astype("float32"))
            for n in ("scale", "var")
        )
        offset, mean = (
            tf.compat.v1.get_variable(n, initializer=rng.normal(0, 0.3, 3).astype("float32"))
            for n in ("offset", "mean")
        )
        y = tf.compat.v1.nn.fused_batch_norm(
            tf.nn.conv2d(x, w, 1, "SAME"), scale, offset, mean, var, is_training=False
        )[0]
        session.run(tf.compat.v1.global_variables_initializer())
        signature = {
            "serving_default": tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        }
        builder = tf.compat.v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signature)
        builder.add_meta_graph(["train"], signature_def_map=signature)
        builder.save()


BUILDERS["jpeg"] = build_jpeg
BUILDERS["two_meta_graphs"] = build_two_meta_graphs
