"""Issue 17's models, optimized and then served as TF Serving serves them, against the original.

    python tools/check_serving_models.py [--models ResNet50,CSPNet,HGNetV2]
        [--weights variables,constants] [--size 224] [--cache DIR] [--json F]
    python tools/check_serving_models.py --quirk [--cache DIR]

For each model: a Keras 3 ``model.export()`` (``weights=None``, random batch-norm statistics and
biases, built in a child process), ``graphfold optimize SRC DST --weights W`` (its last line: what
it folded and its own verification), then ``tools/check_serving.py SRC DST`` (every signature,
batch 2, unknown height and width ``--size``): the served optimized model against the served
original, and the same through ``tf.saved_model.load``. Prints one Markdown table, with the
batch-norm ops (``FusedBatchNorm*``, the ``Rsqrt`` of a decomposed one) of the written graphs,
SRC -> DST (``bench_serving.census``): a DST that kept them was not folded.

  ResNet50  keras.applications.ResNet50 (``bench_cli``'s export, 224 x 224);
  CSPNet    keras-hub CSPNetBackbone, the small cspresnext50-like config of
            ``tools/check_cspnet.py`` (LeakyReLU 0.01 after the residual adds: the pattern
            TensorFlow 2.21's remapper miscomputes once the batch norm is folded away);
  HGNetV2   keras-hub HGNetV2Backbone, a small config with learnable affine blocks (scalar
            variables; their scales randomised too) and light-weight conv blocks.

keras-hub is not a dependency of graphfold: without it the keras-hub models are skipped.

``--quirk``: TensorFlow's LeakyRelu fusion (``graphfold/fold/tf_quirks.py``) on each path: its
reproduction as a SavedModel (weights as constants or variables; batch unknown or fixed, height
and width fixed or unknown), served and loaded, against eager.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bench_cli  # noqa: E402
import bench_serving  # noqa: E402
import check_cspnet  # noqa: E402
import check_serving  # noqa: E402

MODELS = "ResNet50,CSPNet,HGNetV2"
HGNETV2 = dict(
    depths=[1, 1, 2],
    embedding_size=16,
    hidden_sizes=[32, 64, 128],
    stem_channels=[3, 16, 16],
    hidden_act="relu",
    use_learnable_affine_block=True,
    stackwise_stage_filters=[(16, 16, 32, 1, 2, 3), (32, 24, 64, 1, 2, 3), (64, 32, 128, 2, 2, 5)],
    apply_downsample=[False, True, True],
    use_lightweight_conv_block=[False, True, True],
)


# ---- the exports (in a child process) ------------------------------------------------------------
def _build_keras_hub(name: str, path: str) -> None:
    import keras_hub
    import numpy as np

    from graphfold import examples

    if name == "CSPNet":
        model = check_cspnet.cspnet(keras_hub, "cspresnext50")
    else:
        model = keras_hub.models.HGNetV2Backbone(**HGNETV2)
    rng = np.random.default_rng(0)
    examples.randomise(model, rng)
    scales = [v for v in model.weights if v.path.endswith("/scale") and v.shape == ()]
    for variable in scales:  # learnable affine blocks (bias: randomise)
        variable.assign(np.float32(rng.uniform(0.5, 1.5) * rng.choice([-1, 1])))
    if name == "HGNetV2" and not scales:
        raise SystemExit("HGNetV2: no learnable affine scale found to randomise")
    model.export(path, verbose=False)


def ensure_export(cache: str, name: str) -> str | None:
    """The export of ``name`` under ``cache`` (built once); None when keras-hub is missing."""
    if name == "ResNet50":
        return bench_cli.ensure_model(cache, name)
    path = os.path.join(cache, name)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    code = (
        f"import sys; sys.path.insert(0, {HERE!r}); import check_serving_models as m; "
        f"m._build_keras_hub({name!r}, {path!r})"
    )
    built = subprocess.run(
        [sys.executable, "-c", code], env=bench_cli.ENV, capture_output=True, text=True
    )
    if built.returncode != 0:
        if "No module named 'keras_hub'" in built.stderr:
            return None
        raise SystemExit(f"building {name} failed:\n{built.stderr[-2000:]}")
    return path


def input_shapes(export: str, size: int) -> list[str]:
    """``--input-shape`` arguments: batch 2, every other unknown dimension ``size`` (height and
    width of an image input)."""
    shapes = {}
    for signature in check_serving.signature_defs(export).values():
        for key, info in signature.inputs.items():
            dims = [d.size for d in info.tensor_shape.dim]
            if any(d < 0 for d in dims[1:]):
                shapes[key] = [2] + [size if d < 0 else d for d in dims[1:]]
    return [f"{k}={','.join(map(str, s))}" for k, s in sorted(shapes.items())]


def _signature(body, held):
    return lambda x, sc: {"y": body(x, sc, *held)}


# ---- the LeakyRelu fusion on each path ----------------------------------------------------------
def quirk_paths(cache: str) -> list[str]:
    """Rows ``weights | input shape | served | loaded`` of the quirk's reproduction (relative
    error against eager; the live ``tf.function`` first)."""
    import numpy as np
    import tensorflow as tf

    from graphfold.convert.verify import compare

    rng = np.random.default_rng(0)
    x, sc = (rng.normal(size=(2, 8, 8, 16)).astype(np.float32) for _ in range(2))
    module = tf.Module()
    module.w = tf.Variable(rng.normal(size=(1, 1, 16, 16)).astype(np.float32) / 4)
    module.b = tf.Variable(rng.normal(size=16).astype(np.float32))
    constants = (tf.constant(module.w.numpy()), tf.constant(module.b.numpy()))

    def body(v, s, w, b):
        return tf.nn.leaky_relu(tf.nn.bias_add(tf.nn.conv2d(v, w, 1, "VALID"), b) + s, alpha=0.01)

    want = body(x, sc, *constants).numpy()
    error = lambda got: compare(want, got)[1]  # noqa: E731
    live = tf.function(body)(x, sc, *constants).numpy()
    rows = [f"| live tf.function (not saved) | 2x8x8x16 | – | {error(live):.2g} |"]
    binary, how = bench_serving.harness(os.path.join(cache, "bin"))
    if binary is None:
        return rows + [f"not served: {how}"]
    for weights in ("constants", "variables"):
        for shape in ([None, 8, 8, 16], [2, 8, 8, 16], [None, None, None, 16]):
            spec = [tf.TensorSpec(shape, tf.float32, name=n) for n in ("x", "sc")]
            held = constants if weights == "constants" else (module.w, module.b)
            serve = tf.function(_signature(body, held), input_signature=spec)
            path = os.path.join(cache, "quirk", f"{weights}-{'x'.join(map(str, shape))}")
            tf.saved_model.save(module, path, signatures={"serving_default": serve})
            check_serving.write_tensors(path + ".in", {"x": x, "sc": sc})
            served = check_serving.served(
                binary, path, "serving_default", path + ".in", path + ".out", None
            )["y"]
            loaded = tf.saved_model.load(path).signatures["serving_default"](x=x, sc=sc)["y"]
            rows.append(
                f"| {weights} | {'x'.join(str(d) if d else '?' for d in shape)} | "
                f"{error(served):.2g} | {error(loaded.numpy()):.2g} |"
            )
    return rows


# ---- one model -----------------------------------------------------------------------------------
def optimize(export: str, dst: str, weights: str, shapes: list[str]) -> dict:
    """``graphfold optimize`` and its last line, exit status and seconds."""
    argv = [
        sys.executable,
        "-m",
        "graphfold",
        "optimize",
        export,
        dst,
        "--overwrite",
        "--weights",
        weights,
    ] + [a for s in shapes for a in ("--input-shape", s)]
    start = time.perf_counter()
    run = subprocess.run(argv, env=bench_cli.ENV, capture_output=True, text=True)
    lines = [
        line
        for line in run.stdout.splitlines() + run.stderr.splitlines()
        if line.startswith(("wrote", "graphfold:", "error", "FAILED", "NOT"))
    ]
    return dict(
        exit=run.returncode,
        seconds=round(time.perf_counter() - start, 1),
        line=lines[-1] if lines else (run.stdout + run.stderr).strip()[-300:],
    )


def served_check(export: str, dst: str, shapes: list[str], cache: str, workdir: str) -> dict:
    """``check_serving.py`` in a child process; its JSON document and exit status."""
    report = os.path.join(workdir, "check.json")
    argv = [
        sys.executable,
        os.path.join(HERE, "check_serving.py"),
        export,
        dst,
        "--cache",
        cache,
        "--json",
        report,
    ] + [f"--input-shape={s}" for s in shapes]
    run = subprocess.run(argv, env=bench_cli.ENV, capture_output=True, text=True)
    with open(report) as f:
        document = json.load(f)
    document["exit"] = run.returncode
    document["output"] = run.stdout
    return document


def _largest(document: dict, field: str) -> float | None:
    values = []
    for signature in document.get("signatures", {}).values():
        if field == "served":
            values += [r["max_rel"] for r in signature.get("outputs", [])]
        elif field == "loaded":
            values += list(signature.get("loaded", {}).values())
        else:
            values.append(signature.get("served_src_vs_loaded_src"))
    values = [v for v in values if v is not None]
    return max(values) if values else None


def row(name: str, weights: str, optimized: dict, document: dict) -> str:
    figure = lambda v: "–" if v is None else f"{v:.2g}"  # noqa: E731
    verdict = {"ok": "match", "failed": "DIFFER", "not checked": "not checked"}.get(
        document.get("status"), document.get("status")
    )
    return (
        f"| {name} | {weights} | {optimized['line']} (exit {optimized['exit']}) | "
        f"{optimized['batch_norm_ops']} | "
        f"{figure(_largest(document, 'served'))} | {figure(_largest(document, 'loaded'))} | "
        f"{figure(_largest(document, 'floor'))} | {verdict} (exit {document['exit']}) |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--weights", default="variables,constants")
    parser.add_argument("--size", type=int, default=224, help="unknown height and width")
    parser.add_argument(
        "--cache", default=os.path.join(tempfile.gettempdir(), "graphfold-check-serving")
    )
    parser.add_argument("--json", help="write every result here")
    parser.add_argument(
        "--quirk",
        action="store_true",
        help="TensorFlow's LeakyRelu fusion on each path instead of the models",
    )
    args = parser.parse_args(argv)
    if args.quirk:
        print("| weights | input shape | served rel err | loaded rel err |\n|---|---|---|---|")
        print("\n".join(quirk_paths(args.cache)))
        return 0
    harness_cache = os.path.join(args.cache, "bin")
    rows, results, failed = [], {}, False
    for name in [m for m in args.models.split(",") if m]:
        export = ensure_export(args.cache, name)
        if export is None:
            print(f"{name}: keras-hub is not installed: skipped", flush=True)
            continue
        shapes = input_shapes(export, args.size)
        for weights in [w for w in args.weights.split(",") if w]:
            dst = os.path.join(args.cache, f"{name}-{weights}")
            optimized = optimize(export, dst, weights, shapes)
            optimized["batch_norm_ops"] = (  # in the written graphs: SRC -> DST
                f"{bench_serving.census(export)['batch_norm_ops']} -> "
                f"{bench_serving.census(dst)['batch_norm_ops']}"
                if optimized["exit"] == 0
                else "–"
            )
            print(f"{name} --weights {weights}: {optimized['line']}", flush=True)
            with tempfile.TemporaryDirectory() as workdir:
                document = (
                    served_check(export, dst, shapes, harness_cache, workdir)
                    if optimized["exit"] == 0
                    else dict(status="not optimized", exit=None)
                )
            print(document.get("output", ""), flush=True)
            results[f"{name} {weights}"] = dict(optimize=optimized, served=document)
            rows.append(row(name, weights, optimized, document))
            failed = failed or optimized["exit"] != 0 or document.get("exit") != 0
    print(
        "| model | --weights | graphfold optimize says | batch-norm ops | served max rel | "
        "loaded max rel | served vs loaded original | served outputs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), results=results),
                f,
                indent=1,
                default=str,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
