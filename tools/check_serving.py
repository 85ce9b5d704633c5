"""Does the optimized SavedModel serve what the original serves? Both run as TF Serving runs them.

    python tools/check_serving.py SRC DST [--signature K ...] [--batch N]
        [--input-shape KEY=1,224,224,3 ...] [--inputs FILE] [--seed S] [--tolerance T]
        [--config default|no-mem-opt|...] [--cache DIR] [--json F]

TF Serving loads a model with the C++ ``LoadSavedModel`` and runs it with ``Session::Run``:
Grappler optimizes the graph there, under the session's configuration, and TensorFlow's
miscompilations (``graphfold/fold/tf_quirks.py``) show there. For each signature (default: every
signature of SRC), this tool makes seeded random inputs from SRC's SignatureDef, runs SRC and DST
each in a process of its own through ``tools/serving_harness.cc`` (``outputs`` mode; built with
``bench_serving.harness``) on the same inputs, and compares every output as graphfold does
(``graphfold.convert.verify.compare``: max |a-b| and max |a-b| / max |a|, against the tolerance of
``graphfold.convert.tolerance``: by the precision of the output and of SRC's computation, or
``--tolerance``). For comparison it prints the same through ``tf.saved_model.load`` (DST against
SRC) and how far the served original is from the loaded original.

Inputs: floats standard normal, integers in [0, 4), bools fair coins (``verify.random_tensor``);
an unknown first dimension is ``--batch``, any other unknown dimension must be given with
``--input-shape``; string inputs (JPEG bytes) need ``--inputs`` (a ``.npz`` of arrays by input
key, or a tensors file as the harness reads). Exit 0 when every served output matches (or when
the harness cannot be built: "not checked", like bench_serving), 1 when one does not or DST
fails, 2 when the check cannot be made (bad arguments, inputs it will not guess, SRC fails).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bench_serving  # noqa: E402

CACHE = os.path.join(tempfile.gettempdir(), "graphfold-bench-serving", "bin")


class CannotCheck(Exception):
    """Why the check cannot be made (exit 2)."""


# ---- tensors files: what the harness reads and writes --------------------------------------------
def write_tensors(path: str, tensors: dict) -> None:
    """``key -> array`` as records of an 8-byte little-endian length and a serialized
    ``tensorflow.NamedTensorProto``."""
    import tensorflow as tf
    from tensorflow.core.protobuf import named_tensor_pb2

    with open(path, "wb") as f:
        for key, value in tensors.items():
            named = named_tensor_pb2.NamedTensorProto(name=key, tensor=tf.make_tensor_proto(value))
            data = named.SerializeToString()
            f.write(struct.pack("<Q", len(data)) + data)


def read_tensors(path: str) -> dict:
    """``key -> numpy array`` of a tensors file."""
    import tensorflow as tf
    from tensorflow.core.protobuf import named_tensor_pb2

    tensors = {}
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        named = named_tensor_pb2.NamedTensorProto.FromString(data[at + 8 : at + 8 + length])
        tensors[named.name] = tf.make_ndarray(named.tensor)
        at += 8 + length
    return tensors


# ---- the inputs ----------------------------------------------------------------------------------
def signature_defs(path: str) -> dict:
    """Signature key -> SignatureDef of the ``serve`` MetaGraph of the SavedModel at ``path``."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
    except OSError as exc:
        raise CannotCheck(f"{path}: not a SavedModel ({exc.strerror})") from None
    for meta in proto.meta_graphs:
        if set(meta.meta_info_def.tags) == {"serve"}:
            return {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
    raise CannotCheck(f"{path}: no MetaGraph tagged serve (TF Serving's default)")


def input_shape(key: str, info, batch: int, given: dict) -> tuple:
    """The shape of input ``key``: ``given`` (checked against the signature), else the
    signature's with an unknown first dimension set to ``batch``."""
    known = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    if key in given:
        shape = given[key]
        if known is not None and (
            len(shape) != len(known) or any(k >= 0 and k != s for k, s in zip(known, shape))
        ):
            raise CannotCheck(
                f"--input-shape {key}={','.join(map(str, shape))} does not fit "
                f"the signature's {known}"
            )
        return tuple(shape)
    if known is None:
        raise CannotCheck(f"input {key} has an unknown rank: give --input-shape {key}=...")
    shape = [batch if i == 0 and d < 0 else d for i, d in enumerate(known)]
    if any(d < 0 for d in shape):
        example = ",".join(str(d) if d >= 0 else "N" for d in shape)
        raise CannotCheck(
            f"input {key} has unknown dimensions {known}: give their sizes with "
            f"--input-shape {key}={example}"
        )
    return tuple(shape)


def random_feeds(signature, batch: int, shapes: dict, seed: int) -> dict:
    """Seeded random arrays for every input of ``signature`` (``verify.random_tensor``)."""
    import numpy as np
    import tensorflow as tf

    from graphfold.convert.verify import random_tensor

    rng = np.random.default_rng(seed)
    feeds = {}
    for key in sorted(signature.inputs):
        info = signature.inputs[key]
        if info.dtype == tf.string.as_datatype_enum:
            raise CannotCheck(
                f"input {key} is a string (encoded images?): random bytes mean "
                f"nothing to the model; give real inputs with --inputs"
            )
        spec = tf.TensorSpec(None, tf.as_dtype(info.dtype))
        feeds[key] = random_tensor(spec, rng, input_shape(key, info, batch, shapes)).numpy()
    return feeds


def given_feeds(path: str, signature) -> dict:
    """The arrays of ``--inputs`` (``.npz``, or a tensors file) for the inputs of ``signature``."""
    import numpy as np

    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as arrays:
            given = {k: arrays[k] for k in arrays.files}
    else:
        given = read_tensors(path)
    missing = sorted(set(signature.inputs) - set(given))
    if missing:
        raise CannotCheck(f"{path} has no array for input(s) {', '.join(missing)}")
    return {k: given[k] for k in sorted(signature.inputs)}


# ---- running -------------------------------------------------------------------------------------
def served(
    binary: str,
    model: str,
    key: str,
    inputs_file: str,
    out: str,
    config: str | None,
    env: dict | None = None,
) -> dict:
    """The outputs of signature ``key`` of ``model`` run by the harness in a process of its own
    (written to ``out``); raises RuntimeError with the harness' message when it fails."""
    argv = [
        binary,
        "outputs",
        model,
        f"--inputs={inputs_file}",
        f"--out={out}",
        f"--signature={key}",
    ] + ([f"--config={config}"] if config else [])
    run = subprocess.run(
        argv, capture_output=True, text=True, env={**bench_serving.ENV, **(env or {})}
    )
    if run.returncode != 0:
        raise RuntimeError((run.stderr.strip() or f"exit {run.returncode}").splitlines()[-1])
    return read_tensors(out)


_LOADED: dict = {}


def loaded_outputs(model: str, key: str, feeds: dict):
    """``(outputs by key, the signature function)`` through ``tf.saved_model.load``."""
    import tensorflow as tf

    if model not in _LOADED:
        _LOADED[model] = tf.saved_model.load(model)
    fn = _LOADED[model].signatures[key]
    outputs = fn(**{k: tf.constant(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in outputs.items()}, fn


# ---- comparing -----------------------------------------------------------------------------------
def compare_outputs(want: dict, got: dict, tolerance: float | None, computation) -> list[dict]:
    """Per output key of ``want``: max abs / rel error of ``got`` (``verify.compare``), the
    tolerance and why, and what is wrong (None when it matches)."""
    import tensorflow as tf

    from graphfold.convert import tolerance as tolerance_
    from graphfold.convert.verify import compare

    rows = []
    for key in sorted(set(want) | set(got)):
        row = dict(output=key, max_abs=None, max_rel=None, problem=None)
        if key not in got or key not in want:
            row["problem"] = "missing from DST" if key not in got else "not an output of SRC"
            rows.append(row)
            continue
        a, b = want[key], got[key]
        limit, why = (
            (tolerance, "given")
            if tolerance is not None
            else (0.0, "not numbers")
            if a.dtype.kind in "OSUb"
            else tolerance_.default(tf.as_dtype(a.dtype), computation)
        )
        row.update(dtype=str(a.dtype), shape=list(a.shape), tolerance=limit, why=why)
        try:
            row["max_abs"], row["max_rel"] = compare(a, b)
        except ValueError as exc:
            row["problem"] = str(exc)
        if row["problem"] is None and a.dtype != b.dtype:
            row["problem"] = f"dtype {b.dtype} differs from the original's {a.dtype}"
        if row["problem"] is None and not row["max_rel"] <= limit:
            row["problem"] = f"relative error {row['max_rel']:.3g} > tolerance {limit:g} ({why})"
        rows.append(row)
    return rows


def largest(rows: list[dict]) -> float | None:
    values = [r["max_rel"] for r in rows if r["max_rel"] is not None]
    return max(values) if values else None


def check_signature(
    binary: str, args, key: str, signature, workdir: str, config: str | None
) -> dict:
    """Served SRC against served DST on the same inputs; the same through tf.saved_model.load.
    ``config``: the session configuration file (``--config``; its environment is added)."""
    env = bench_serving.CONFIGS[args.config][1]
    feeds = (
        given_feeds(args.inputs, signature)
        if args.inputs
        else random_feeds(signature, args.batch, args.input_shape, args.seed)
    )
    inputs_file = os.path.join(workdir, f"inputs-{key}.tensors")
    write_tensors(inputs_file, feeds)
    result = dict(signature=key, inputs={k: list(v.shape) for k, v in feeds.items()})
    try:
        want = served(binary, args.src, key, inputs_file, inputs_file + ".src", config, env)
    except RuntimeError as exc:
        raise CannotCheck(f"{key}: the original fails when served: {exc}") from None
    from graphfold.convert import tolerance as tolerance_

    try:
        python_src, fn = loaded_outputs(args.src, key, feeds)
    except Exception as exc:  # noqa: BLE001 - the reference of the tolerance and the comparison
        raise CannotCheck(f"{key}: the original fails when loaded: {exc}") from None
    computation = tolerance_.computation_dtypes(fn) if args.tolerance is None else frozenset()
    result["served_src_vs_loaded_src"] = largest(
        compare_outputs(python_src, want, None, computation)
    )
    try:
        got = served(binary, args.dst, key, inputs_file, inputs_file + ".dst", config, env)
    except RuntimeError as exc:
        result.update(status="failed", reason=f"DST fails when served: {exc}", outputs=[])
        return result
    result["outputs"] = compare_outputs(want, got, args.tolerance, computation)
    try:
        python_dst, _ = loaded_outputs(args.dst, key, feeds)
        loaded = compare_outputs(python_src, python_dst, args.tolerance, computation)
        result["loaded"] = {r["output"]: r["max_rel"] for r in loaded}
        result["loaded_problem"] = "; ".join(r["problem"] for r in loaded if r["problem"]) or None
    except Exception as exc:  # noqa: BLE001 - reported beside the served result
        result["loaded"], result["loaded_problem"] = {}, f"DST fails when loaded: {exc}"
    problems = [f"{r['output']}: {r['problem']}" for r in result["outputs"] if r["problem"]]
    result.update(status="failed" if problems else "ok", reason="; ".join(problems) or None)
    return result


def _figure(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def print_result(result: dict) -> None:
    key = result["signature"]
    shapes = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in result["inputs"].items())
    print(
        f"{key}: inputs {shapes}; served original vs loaded original: max rel "
        f"{_figure(result.get('served_src_vs_loaded_src'))}"
    )
    for row in result["outputs"]:
        loaded = result.get("loaded", {}).get(row["output"])
        tolerance = f"tolerance {row['tolerance']:g} ({row['why']})" if "tolerance" in row else ""
        print(
            f"  {row['output']}: served DST vs SRC max abs {_figure(row['max_abs'])} max rel "
            f"{_figure(row['max_rel'])} {tolerance}; loaded (tf.saved_model.load) DST vs SRC "
            f"max rel {_figure(loaded)}" + (f"  <- {row['problem']}" if row["problem"] else "")
        )
    if result.get("loaded_problem"):
        print(f"  loaded: {result['loaded_problem']}")
    if result["status"] == "ok":
        print(f"{key}: served outputs match")
    else:
        print(f"{key}: SERVED OUTPUTS DIFFER: {result['reason']}")


def parse_shapes(items: list[str]) -> dict:
    shapes = {}
    for item in items:
        key, _, dims = item.partition("=")
        try:
            shapes[key] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise CannotCheck(f"--input-shape {item}: expected KEY=1,224,224,3") from None
        if not key or any(d < 0 for d in shapes[key]):
            raise CannotCheck(f"--input-shape {item}: expected KEY=1,224,224,3")
    return shapes


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the original SavedModel")
    parser.add_argument("dst", help="the optimized SavedModel")
    parser.add_argument(
        "--signature",
        action="extend",
        nargs="+",
        metavar="K",
        help="signature keys; default: every signature of SRC",
    )
    parser.add_argument("--batch", type=int, default=2, help="an unknown first dimension")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="KEY=D,D,...",
        help="the shape of an input's random values",
    )
    parser.add_argument(
        "--inputs",
        help=".npz (arrays by input key) or a tensors file: these inputs instead of random ones",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance",
        type=float,
        help="relative error accepted for every "
        "output (default: by precision, graphfold.convert.tolerance)",
    )
    parser.add_argument(
        "--config",
        default="default",
        choices=sorted(bench_serving.CONFIGS),
        help="the session configuration (bench_serving.CONFIGS)",
    )
    parser.add_argument("--cache", default=CACHE, help="where the harness is built")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def check(args) -> tuple[int, dict]:
    binary, how = bench_serving.harness(args.cache)
    document = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        src=args.src,
        dst=args.dst,
        harness=how,
        signatures={},
    )
    print(f"# serving harness: {how}", flush=True)
    if binary is None:
        print(f"not checked: the serving harness cannot be built ({how})")
        return 0, dict(document, status="not checked")
    signatures = signature_defs(args.src)
    keys = args.signature or sorted(signatures)
    unknown = sorted(set(keys) - set(signatures))
    if unknown:
        raise CannotCheck(
            f"{args.src} has no signature {', '.join(unknown)} "
            f"(it has {', '.join(sorted(signatures))})"
        )
    args.input_shape = parse_shapes(args.input_shape)
    with tempfile.TemporaryDirectory(prefix="check-serving-") as workdir:
        config = bench_serving.config_file(workdir, args.config)
        for key in keys:
            result = check_signature(binary, args, key, signatures[key], workdir, config)
            document["signatures"][key] = result
            print_result(result)
    failed = [k for k, r in document["signatures"].items() if r["status"] != "ok"]
    document["status"] = "failed" if failed else "ok"
    print(
        f"served outputs differ: {', '.join(failed)}"
        if failed
        else f"served outputs match ({len(keys)} signature(s))"
    )
    return (1 if failed else 0), document


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        code, document = check(args)
    except CannotCheck as why:
        print(f"cannot check: {why}", file=sys.stderr)
        code, document = 2, dict(src=args.src, dst=args.dst, status="cannot check", reason=str(why))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1, default=str)
    return code


if __name__ == "__main__":
    sys.exit(main())
