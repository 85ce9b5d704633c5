"""``graphfold demo``: build a small model, save it, optimize it, verify it, time it.

The timing tells freezing's share of the speed-up from folding's: the original, the same
function frozen with nothing folded (``rewrite.freeze_only``), and the optimized model, called
in interleaved rounds.

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
from graphfold.cli.render import render_reports, render_verification
from graphfold.errors import EXIT_OK, EXIT_VERIFY, BadInput, VerificationFailed

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
    x = layers.BatchNormalization(name="pool_bn")(x)  # before a layer: folds backward
    x = layers.Dense(32, name="fc1")(x)
    x = layers.BatchNormalization(name="fc1_bn")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    outputs = layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="graphfold_demo")
    examples.randomise(model, np.random.default_rng(seed))
    return model


def call_ms(fn, inputs: dict) -> float:
    """Wall time of one call ``fn(**inputs)`` (outputs fetched), in milliseconds."""
    clock = time.perf_counter()
    outputs = fn(**inputs)
    for value in outputs.values() if isinstance(outputs, dict) else [outputs]:
        value.numpy()
    return (time.perf_counter() - clock) * 1e3


def compare_latency(
    functions: dict, inputs: dict, calls: int = CALLS, warmup: int = 3, seed: int = 0
) -> dict[str, float]:
    """Median latency (ms) of each of ``functions`` (name -> callable) over ``calls`` rounds of
    one call of each, in a new random order each round, so that a noisy neighbour slows them
    alike."""
    for fn in functions.values():
        for _ in range(warmup):
            call_ms(fn, inputs)
    times: dict[str, list[float]] = {name: [] for name in functions}
    rng = np.random.default_rng(seed)
    for _ in range(calls):
        for name in rng.permutation(list(functions)):
            times[name].append(call_ms(functions[name], inputs))
    return {name: statistics.median(t) for name, t in times.items()}


def _speedup(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def render_latency(key: str, ms: dict[str, float], console) -> None:
    """The three medians, and the speed-up split into freezing's share and folding's:
    original/optimized = (original/frozen) x (frozen/optimized)."""
    console.print(f"latency of '{key}' (batch {BATCH}, median of {CALLS} interleaved calls):")
    console.print(f"  original             {ms['original']:8.3f} ms")
    console.print(
        f"  frozen, not folded   {ms['frozen']:8.3f} ms   "
        f"({_speedup(ms['original'] / ms['frozen'])}: what freezing alone gives)"
    )
    console.print(
        f"  optimized            {ms['optimized']:8.3f} ms   "
        f"({_speedup(ms['original'] / ms['optimized'])}: "
        f"{ms['original'] / ms['frozen']:.2f}x from freezing, then "
        f"{ms['frozen'] / ms['optimized']:.2f}x from folding)"
    )


def require_runnable(path: str, keys: list[str], tags=("serve",), allow_ops=()) -> None:
    """Raises ``BadInput`` unless the SavedModel ``path`` can be loaded and signatures ``keys``
    run without running an op reaching outside the graph that ``allow_ops`` does not allow
    (``graphfold.convert.scan``): the gate before the demo's timing."""
    from graphfold.convert import scan
    from graphfold.options import Options
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model

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
            raise BadInput(
                f"--out {out}: {original} exists and is not a SavedModel; refusing to replace it"
            )
        shutil.rmtree(original)
    return out


def _time_three_ways(original: str, optimized: str, key: str, console) -> dict[str, float]:
    """Milliseconds per call of ``key``: the original, the original frozen with nothing folded
    (freezing's share of the speed-up) and the optimized model, interleaved rounds."""
    import tensorflow as tf

    from graphfold.convert.rewrite import freeze_only
    from graphfold.progress import StageStarted

    console.progress(
        StageStarted(
            "time",
            f"the original, the frozen original (nothing folded) "
            f"and the optimized model (serving_default, batch "
            f"{BATCH}, {CALLS} rounds)",
        )
    )
    for path in (original, optimized):  # the demo's own model: clean, but gated all the same
        require_runnable(path, [key])
    loaded = {
        name: tf.saved_model.load(path)
        for name, path in (("original", original), ("optimized", optimized))
    }
    functions = {name: model.signatures[key] for name, model in loaded.items()}
    functions["frozen"] = freeze_only(functions["original"])
    rng = np.random.default_rng(1)
    inputs = {"image": tf.constant(rng.standard_normal((BATCH,) + INPUT_SHAPE), tf.float32)}
    return compare_latency(functions, inputs)


def run_demo(out: str | None, console) -> int:
    """The ``graphfold demo`` command; returns the exit code."""
    from graphfold.progress import StageStarted
    from graphfold.serving.saved_model import optimize_saved_model

    out = _prepare(out)
    original, optimized = os.path.join(out, "original"), os.path.join(out, "optimized")
    console.progress(
        StageStarted(
            "build",
            "the demo model (Keras 3: residual CNN with Conv2D, "
            "DepthwiseConv2D and Dense layers, 7 batch norms with random "
            "statistics)",
        )
    )
    model = build_model()
    console.progress(StageStarted("save", f"it with model.export(): {original}"))
    model.export(original, verbose=False)

    failure = None
    try:
        result = optimize_saved_model(
            original, optimized, overwrite=True, batch=BATCH, progress=console.progress
        )
    except VerificationFailed as exc:
        result, failure = exc.result, exc

    console.print(f"graphfold demo: {original} -> {optimized}")
    console.print()
    render_reports(result, console)
    render_verification(result, console)
    document = {
        "command": "demo",
        "status": "ok" if failure is None else "verification_failed",
        **result.to_dict(),
    }
    if failure is not None:
        console.error(str(failure))
        document["exit_code"] = EXIT_VERIFY
        console.json(document)
        return EXIT_VERIFY

    key = "serving_default"
    ms = _time_three_ways(original, optimized, key, console)
    render_latency(key, ms, console)
    console.print()
    console.print(f"try: saved_model_cli show --all --dir {optimized}")
    document.update(exit_code=EXIT_OK, latency_ms={**ms, "batch": BATCH, "calls": CALLS})
    document["seconds"]["total"] = console.elapsed()
    console.json(document)
    return EXIT_OK
