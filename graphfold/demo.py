"""``graphfold demo``: build a small model, save it, optimize it, verify it, time both.

The model is a small residual CNN in Keras 3: a strided stem, one residual block, a depthwise-
separable block and a dense head, with 7 batch norms (6 after a layer, 1 before one) whose
statistics (γ, β, μ, σ²) and every bias are random, so that folding them is a real test.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from graphfold import examples
from graphfold.errors import EXIT_OK, EXIT_VERIFY, BadInput, VerificationFailed
from graphfold.render import render_reports, render_verification

INPUT_SHAPE = (64, 64, 3)
BATCH = 8
CALLS = 50


def build_model(seed: int = 0, input_shape: tuple = INPUT_SHAPE):
    """The demo model: Conv2D/DepthwiseConv2D/Dense layers, 7 BatchNormalization layers with
    random statistics, and random biases."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)

    y = layers.Conv2D(16, 3, padding="same", name="res_conv1")(x)
    y = layers.BatchNormalization(name="res_bn1")(y)
    y = layers.ReLU(name="res_relu1")(y)
    y = layers.Conv2D(16, 3, padding="same", name="res_conv2")(y)
    y = layers.BatchNormalization(name="res_bn2")(y)
    x = layers.Add(name="res_add")([x, y])
    x = layers.ReLU(name="res_relu2")(x)

    x = layers.DepthwiseConv2D(3, padding="same", name="dw_conv")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(name="dw_relu")(x)
    x = layers.Conv2D(32, 1, name="pw_conv")(x)
    x = layers.BatchNormalization(name="pw_bn")(x)
    x = layers.ReLU(name="pw_relu")(x)

    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.BatchNormalization(name="pool_bn")(x)      # before a layer: folds backward
    x = layers.Dense(32, name="fc1")(x)
    x = layers.BatchNormalization(name="fc1_bn")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    outputs = layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="graphfold_demo")
    examples.randomise(model, np.random.default_rng(seed))
    return model


def call_times_ms(fn, inputs: dict, calls: int, warmup: int = 3) -> list[float]:
    """Wall time of each of ``calls`` calls ``fn(**inputs)``, in milliseconds, after warm-up."""
    for _ in range(warmup):
        fn(**inputs)
    times = []
    for _ in range(calls):
        clock = time.perf_counter()
        outputs = fn(**inputs)
        for value in (outputs.values() if isinstance(outputs, dict) else [outputs]):
            value.numpy()
        times.append((time.perf_counter() - clock) * 1e3)
    return times


def compare_latency(before, after, inputs: dict, calls: int = CALLS, rounds: int = 5):
    """Median latency (ms) of ``before`` and ``after`` over ``calls`` calls each, in interleaved
    rounds so that a noisy neighbour slows both alike."""
    times_before, times_after = [], []
    for i in range(rounds):
        n = calls // rounds + (i < calls % rounds)
        times_before += call_times_ms(before, inputs, n)
        times_after += call_times_ms(after, inputs, n)
    return statistics.median(times_before), statistics.median(times_after)


def require_runnable(path: str, keys: list[str], tags=("serve",), allow_ops=()) -> None:
    """Raises ``BadInput`` unless the SavedModel ``path`` can be loaded and signatures ``keys``
    run without running an op reaching outside the graph that ``allow_ops`` does not allow
    (``graphfold.scan``): the gate before the demo's timing."""
    from graphfold import scan
    from graphfold.options import Options
    from graphfold.saved_model import meta_graph_for, read_saved_model
    allowed = Options(allow_ops=allow_ops).allow_ops
    found = scan.scan_meta_graph(meta_graph_for(read_saved_model(path), path, tags), keys)
    scan.check_loading(found, allowed, path)
    held = scan.held_back([f for key in keys for f in found.signatures[key]], allowed)
    if held:
        raise BadInput(f"{path}: {scan.not_run_reason(held)}")


def _prepare(out: str | None) -> str:
    if out is None:
        return tempfile.mkdtemp(prefix="graphfold-demo-")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    original = os.path.join(out, "original")
    if os.path.lexists(original):
        if not os.path.isfile(os.path.join(original, "saved_model.pb")):
            raise BadInput(f"--out {out}: {original} exists and is not a SavedModel; "
                           f"refusing to replace it")
        shutil.rmtree(original)
    return out


def run_demo(out: str | None, console) -> int:
    """The ``graphfold demo`` command; returns the exit code."""
    import tensorflow as tf

    from graphfold.saved_model import optimize_saved_model

    out = _prepare(out)
    original, optimized = os.path.join(out, "original"), os.path.join(out, "optimized")
    console.progress("building the demo model (Keras 3: residual CNN with Conv2D, "
                     "DepthwiseConv2D and Dense layers, 7 batch norms with random statistics)")
    model = build_model()
    console.progress(f"saving it with model.export(): {original}")
    model.export(original, verbose=False)

    failure = None
    try:
        result = optimize_saved_model(original, optimized, overwrite=True, batch=BATCH,
                                      progress=console.progress)
    except VerificationFailed as exc:
        result, failure = exc.result, exc

    console.print(f"graphfold demo: {original} -> {optimized}")
    console.print()
    render_reports(result, console)
    render_verification(result, console)
    document = {"command": "demo", "status": "ok" if failure is None else
                "verification_failed", **result.to_dict()}
    if failure is not None:
        console.error(str(failure))
        document["exit_code"] = EXIT_VERIFY
        console.json(document)
        return EXIT_VERIFY

    console.progress(f"timing both (serving_default, batch {BATCH}, median of {CALLS} calls)")
    key = "serving_default"
    for path in (original, optimized):      # the demo's own model: clean, but gated all the same
        require_runnable(path, [key])
    before = tf.saved_model.load(original).signatures[key]
    after = tf.saved_model.load(optimized).signatures[key]
    rng = np.random.default_rng(1)
    inputs = {"image": tf.constant(rng.standard_normal((BATCH,) + INPUT_SHAPE), tf.float32)}
    ms_before, ms_after = compare_latency(before, after, inputs)
    console.print(f"latency of '{key}' (batch {BATCH}, median of {CALLS} calls):")
    console.print(f"  original   {ms_before:8.3f} ms")
    ratio = ms_before / ms_after
    change = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    console.print(f"  optimized  {ms_after:8.3f} ms   ({change})")
    console.print()
    console.print(f"try: saved_model_cli show --all --dir {optimized}")
    document.update(exit_code=EXIT_OK, latency_ms={"original": ms_before, "optimized": ms_after,
                                                   "batch": BATCH, "calls": CALLS})
    document["seconds"]["total"] = console.elapsed()
    console.json(document)
    return EXIT_OK
