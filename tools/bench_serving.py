"""What serving graphfold's output costs, measured the way TF Serving loads a model.

    python tools/bench_serving.py [--models ResNet50,MobileNetV2,DenseNet121]
        [--variants original,freeze,constants,variables,graph] [--loaders serving,python]
        [--batches 1,16] [--rounds 30] [--configs default,no-mem-opt,grappler-limited,mmap]
        [--cache DIR] [--json F.json] [--plot F.png]
    python tools/bench_serving.py --from-json F.json [--plot F.png]     # tables (and plot) again

For each Keras 3 ``model.export()`` (``weights=None``, random BN statistics, built in a child
process) the variants

  original   the export itself;
  freeze     frozen and cleaned up as graphfold does it, nothing folded
             (``graphfold.convert.rewrite.freeze_only``), written as graphfold writes
             constants: what
             freezing alone gives;
  constants  ``graphfold optimize --weights constants`` (functions holding ``Const`` nodes);
  variables  ``graphfold optimize --weights variables`` (the folded weights in ``variables/``);
  graph      the folded graph with its constants in the main graph of a TF1-style MetaGraph, no
             function library (written by this tool, ``_write_graph_constants``: the layout
             issue 20 suggested TensorFlow might hold fewer times; measured, not adopted);

each checked before it is measured: a written variant whose graph still holds a batch norm
(a ``FusedBatchNorm*`` or the ``Rsqrt`` of a decomposed one) is refused, never measured (an
unfolded copy is not graphfold's output).

Memory, one fresh process per variant and loader: the peak (``VmHWM``) and resident (``VmRSS``)
set after loading, after the first call, and after 10 more calls (settled). Loaders:
``serving``, TF Serving's own path (``tools/serving_harness.cc``: C++ ``LoadSavedModel`` +
``Session::Run``, the MetaGraph's graph dropped after loading as TF Serving does; built here
with g++ against the installed wheel, into ``--cache``); ``python``, ``tf.saved_model.load`` and
a call of ``serving_default``. ``--configs``: the serving path again under other session
configurations (``CONFIGS``), for the advice in docs/benchmarks.md.

Latency, per loader: each variant loaded in a process of its own beside the original (the A/A
control: the original beside itself), both warmed up, then ``--rounds`` rounds of one call of
each in a random order each round, at each batch size; per variant the median milliseconds
(wall time, and the process' CPU time, steadier on a shared machine) and the median over the
rounds of its time over the original's in the same round. (All variants in one process, tried
first, slowed the variables model by 5 to 10 % against the original: their caches interfere.)
The ``--configs`` runs keep all variants in one process per configuration, batch 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bench_cli  # noqa: E402  (the children load and measure; this process only reads protos)

ENV = bench_cli.ENV
MODELS = "ResNet50,MobileNetV2,DenseNet121"
VARIANTS = ("original", "freeze", "constants", "variables", "graph")
LOADERS = ("serving", "python")
AA = "original (A/A)"
# Session configurations for the serving path (``--configs``): a ConfigProto in text form, and
# the environment of the process.
CONFIGS = {
    "default": ("", {}),
    "no-mem-opt": ("graph_options { rewrite_options { memory_optimization: NO_MEM_OPT } }", {}),
    "grappler-limited": (
        'graph_options { rewrite_options { optimizers: "pruning" optimizers: "remap" } }',
        {},
    ),
    "mmap": ("", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    "frozen-weights": ("", {"TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "1"}),
}
HARNESS = os.path.join(HERE, "serving_harness.cc")
BATCH_NORM_OPS = (
    "FusedBatchNorm",
    "FusedBatchNormV2",
    "FusedBatchNormV3",
    "Rsqrt",
    "BatchNormWithGlobalNormalization",
)


# ---- the C++ harness -----------------------------------------------------------------------------
def harness(cache: str) -> tuple[str | None, str]:
    """``(path of the built harness, how it was found)``; ``(None, why)`` when it cannot be built
    (no g++, no TensorFlow headers). Built once per source, TensorFlow and compiler."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    info = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, tensorflow as tf; print(json.dumps("
            "[tf.__version__, tf.sysconfig.get_include(), "
            "tf.sysconfig.get_lib()]))",
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    if info.returncode != 0:
        return None, "TensorFlow is not importable: " + info.stderr.strip()[-200:]
    version, include, lib = json.loads(info.stdout.splitlines()[-1])
    with open(HARNESS, "rb") as f:
        digest = hashlib.sha256(f.read() + f"{version}{compiler}".encode()).hexdigest()[:12]
    binary = os.path.join(cache, f"serving_harness-{digest}")
    if os.path.exists(binary):
        return binary, f"cached: {binary}"
    os.makedirs(cache, exist_ok=True)
    libs = [
        f
        for f in ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2")
        if os.path.exists(os.path.join(lib, f))
    ]
    if len(libs) < 2 or not os.path.isdir(os.path.join(include, "tensorflow", "cc")):
        return None, f"the TensorFlow wheel at {lib} has no C++ headers or libraries"
    temporary = binary + f".{os.getpid()}.tmp"
    # --no-as-needed: the session factories register themselves from libtensorflow_cc's
    # initialisers; without it the linker drops that library and no session can be made.
    argv = [
        compiler,
        "-O2",
        "-w",
        "-std=c++17",
        "-D_GLIBCXX_USE_CXX11_ABI=1",
        "-DEIGEN_MAX_ALIGN_BYTES=64",
        f"-I{include}",
        HARNESS,
        "-o",
        temporary,
        f"-L{lib}",
        "-Wl,--no-as-needed",
        *[f"-l:{f}" for f in libs],
        f"-Wl,-rpath,{lib}",
    ]
    built = subprocess.run(argv, capture_output=True, text=True)
    if built.returncode != 0:
        return None, "g++ failed: " + built.stderr.strip()[-500:]
    os.replace(temporary, binary)
    return binary, f"built: {binary}"


def config_file(workdir: str, name: str) -> str | None:
    """A serialized ConfigProto of ``CONFIGS[name]``, or None for the default."""
    text = CONFIGS[name][0]
    if not text:
        return None
    from google.protobuf import text_format
    from tensorflow.core.protobuf import config_pb2

    path = os.path.join(workdir, f"config-{name}.pb")
    with open(path, "wb") as f:
        f.write(text_format.Parse(text, config_pb2.ConfigProto()).SerializeToString())
    return path


# ---- the variants (built in child processes) -----------------------------------------------------
def _write_freeze_only(export: str, dst: str) -> None:
    """``export`` frozen and cleaned up, nothing folded, written as graphfold writes constants
    (each distinct function once; Keras' serve and serving_default are one)."""
    import tensorflow as tf

    from graphfold.convert.function import op_name
    from graphfold.convert.rewrite import fold, reimport
    from graphfold.serving import saved_weights
    from graphfold.serving.saved_model import same_functions, save, signature_keys

    loaded = tf.saved_model.load(export)
    keys = [k for k in loaded.signatures if k in signature_keys_of(export, signature_keys)]
    first = same_functions(loaded, keys)
    functions, held = {}, {}
    for key in keys:
        if first[key] != key:
            functions[key] = functions[first[key]]
            continue
        concrete, graph_def, weights, inputs, outputs, report = fold(
            loaded.signatures[key], folding=False
        )
        functions[key] = reimport(
            concrete,
            graph_def,
            weights.names(),
            inputs,
            outputs,
            report,
            saved_weights.marked_constants(weights, key, op_name),
        )
        held[key] = weights
    save(loaded, functions, dst, keep_original=False)
    saved_weights.fill(dst, held)


def _write_graph_constants(export: str, dst: str) -> None:
    """PROTOTYPE: the folded graph, its constants filled in, as the main graph of a TF1-style
    MetaGraph (no function library); one distinct function only."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    from graphfold.convert.rewrite import fold
    from graphfold.serving import saved_weights
    from graphfold.serving.saved_model import same_functions, signature_keys

    loaded = tf.saved_model.load(export)
    keys = signature_keys_of(export, signature_keys)
    first = same_functions(loaded, keys)
    assert len(set(first.values())) == 1, first
    fn = loaded.signatures[keys[0]]
    concrete, graph_def, weights, inputs, outputs, report = fold(fn)
    meta = meta_graph_pb2.MetaGraphDef()
    meta.meta_info_def.tags.append("serve")
    meta.graph_def.CopyFrom(weights.inline(graph_def))
    _, specs = fn.structured_input_signature
    out_keys = sorted(fn.structured_outputs)
    for key in keys:
        sig = meta.signature_def[key]
        sig.method_name = "tensorflow/serving/predict"
        for k, t in zip(sorted(specs), inputs):
            sig.inputs[k].name = t if ":" in t else t + ":0"
            sig.inputs[k].dtype = specs[k].dtype.as_datatype_enum
            sig.inputs[k].tensor_shape.CopyFrom(specs[k].shape.as_proto())
        for k, t in zip(out_keys, outputs):
            spec = fn.structured_outputs[k]
            sig.outputs[k].name = t if ":" in t else t + ":0"
            sig.outputs[k].dtype = spec.dtype.as_datatype_enum
            sig.outputs[k].tensor_shape.CopyFrom(spec.shape.as_proto())
    proto = saved_model_pb2.SavedModel(saved_model_schema_version=1)
    proto.meta_graphs.append(meta)
    os.makedirs(dst)
    saved_weights.write(dst, proto.SerializeToString(deterministic=True))


def signature_keys_of(export: str, signature_keys) -> list[str]:
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model

    return signature_keys(meta_graph_for(read_saved_model(export), export, ("serve",)))


def census(path: str) -> dict:
    """Ops of the written graph (main graph and function library): batch-norm ops left, nodes."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
    return dict(
        nodes=len(ops),
        functions=len(graph.library.function),
        batch_norm_ops=sum(op in BATCH_NORM_OPS for op in ops),
    )


def build_variant(export: str, variant: str, dst: str, reuse: bool = False) -> dict:
    """Writes ``variant`` of ``export`` at ``dst`` (the original: ``export`` itself); returns
    what was written: its path, census, and graphfold's report summary. ``reuse``: a variant
    written by an earlier run is taken as it is."""
    if variant == "original":
        return dict(path=export, **census(export))
    stamp = dst + ".json"
    if reuse and os.path.exists(stamp) and os.path.exists(dst):
        with open(stamp) as f:
            return json.load(f)
    shutil.rmtree(dst, ignore_errors=True)
    info = {"path": dst, "folded": "none: freeze only" if variant == "freeze" else "–"}
    if variant in ("freeze", "graph"):
        writer = "_write_freeze_only" if variant == "freeze" else "_write_graph_constants"
        code = (
            f"import sys; sys.path.insert(0, {HERE!r}); import bench_serving; "
            f"bench_serving.{writer}({export!r}, {dst!r})"
        )
        subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
    else:
        report = dst + ".report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "graphfold",
                "optimize",
                export,
                dst,
                "--quiet",
                "--weights",
                variant,
                "--report",
                report,
            ],
            env=ENV,
            check=True,
        )
        with open(report) as f:
            document = json.load(f)
        os.remove(report)
        unchanged = {
            k: v["unchanged_reason"]
            for k, v in document["signatures"].items()
            if not v["rewritten"]
        }
        info.update(weights=document.get("weights"), unchanged=unchanged, folded=_folded(document))
    info.update(census(dst))
    with open(stamp, "w") as f:
        json.dump(info, f)
    return info


def _folded(document: dict) -> str:
    """ "folded/total" batch norms of the first signature graphfold rewrote (Keras' serve and
    serving_default are one function, folded once)."""
    for _key, signature in sorted((document.get("signatures") or {}).items()):
        if signature.get("rewritten"):
            summary = signature["report"]["summary"]
            return f"{summary['folded']}/{summary['batch_norms']}"
    return "0/–"


def check_folded(model: str, variants: dict) -> None:
    """Refuses to measure a written variant that graphfold did not rewrite (copied a signature
    through) or whose graph keeps batch-norm ops the original had."""
    before = variants["original"]["batch_norm_ops"]
    for name in ("constants", "variables", "graph"):
        info = variants.get(name)
        if info is None:
            continue
        if info.get("unchanged") or (before and info["batch_norm_ops"]):
            raise SystemExit(
                f"{model} {name}: not folded ({info['batch_norm_ops']} batch-norm "
                f"ops left of {before}; unchanged: {info.get('unchanged')}): "
                f"refusing to measure an unfolded copy"
            )


# ---- measuring -----------------------------------------------------------------------------------
PYTHON_MEMORY = """
import json, sys, time
import numpy as np, tensorflow as tf
def point(seconds):
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Vm"))
    kib = lambda k: float(status[k].split()[0]) / 1024
    return dict(hwm_mib=kib("VmHWM"), rss_mib=kib("VmRSS"), seconds=seconds)
start = time.perf_counter()
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
result = {"load": point(time.perf_counter() - start)}
_, specs = fn.structured_input_signature
x = {k: tf.constant(np.random.default_rng(0).uniform(-1, 1, [int(sys.argv[2])] +
     s.shape.as_list()[1:]).astype(s.dtype.as_numpy_dtype)) for k, s in specs.items()}
start = time.perf_counter()
fn(**x)
result["first_call"] = point(time.perf_counter() - start)
start = time.perf_counter()
for _ in range(10):
    fn(**x)
result["settled"] = point(time.perf_counter() - start)
print(json.dumps(result))
"""

PYTHON_LATENCY = """
import json, sys, time
import numpy as np, tensorflow as tf
paths, batches = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rounds, warmup = int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
fns = {k: tf.saved_model.load(p).signatures["serving_default"] for k, p in paths.items()}
result = {}
for batch in batches:
    feeds = {}
    for k, fn in fns.items():
        _, specs = fn.structured_input_signature
        feeds[k] = {n: tf.constant(rng.uniform(-1, 1, [batch] + s.shape.as_list()[1:])
                                   .astype(s.dtype.as_numpy_dtype)) for n, s in specs.items()}
        for _ in range(warmup):
            fn(**feeds[k])
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k in rng.permutation(list(fns)):
            cpu_start, start = time.process_time(), time.perf_counter()
            [t.numpy() for t in fns[k](**feeds[k]).values()]
            wall[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - cpu_start)
    result[str(batch)], result[f"cpu {batch}"] = wall, cpu
print(json.dumps(result))
"""


def _json_child(argv: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(argv, env={**ENV, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:3])}...: exit {done.returncode}: {done.stderr.strip()[-1000:]}"
        )
    return json.loads(done.stdout.splitlines()[-1])


def memory(
    binary: str | None,
    loader: str,
    path: str,
    batch: int,
    config: str | None = None,
    env: dict | None = None,
) -> dict:
    """Peak and resident MiB after loading, first call, settled: a fresh process."""
    if loader == "python":
        return _json_child([sys.executable, "-c", PYTHON_MEMORY, path, str(batch)], env)
    argv = [binary, "memory", path, f"--batch={batch}"]
    return _json_child(argv + ([f"--config={config}"] if config else []), env)


def latency(
    binary: str | None,
    loader: str,
    paths: dict,
    batches: list[int],
    rounds: int,
    warmup: int,
    config: str | None = None,
    env: dict | None = None,
) -> dict:
    """batch -> name -> seconds per call, every path loaded in one process, rounds interleaved
    in random order."""
    if loader == "python":
        return _json_child(
            [
                sys.executable,
                "-c",
                PYTHON_LATENCY,
                json.dumps(paths),
                json.dumps(batches),
                str(rounds),
                str(warmup),
            ],
            env,
        )
    argv = [
        binary,
        "latency",
        *[f"{k}={p}" for k, p in paths.items()],
        f"--batches={','.join(map(str, batches))}",
        f"--rounds={rounds}",
        f"--warmup={warmup}",
    ]
    return _json_child(argv + ([f"--config={config}"] if config else []), env)


def latency_pairs(
    binary: str | None, loader: str, variants: dict, batches: list[int], rounds: int, warmup: int
) -> dict:
    """variant -> batch key -> {"original": seconds, variant: seconds}: each variant against
    the original in a process of its own, the two alone (as when one replaces the other: with
    more models in one process their caches interfere, and that slowed a variables model by
    5 to 10 % against the original); the A/A control is the original against itself."""
    original = variants["original"]["path"]
    pairs = {}
    for variant, info in variants.items():
        name = AA if variant == "original" else variant
        pairs[name] = latency(
            binary, loader, {"original": original, name: info["path"]}, batches, rounds, warmup
        )
    return pairs


def median(values) -> float:
    values = sorted(values)
    n = len(values)
    return (
        float("nan")
        if not n
        else (values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2)
    )


def ratios(times: dict, reference: str = "original") -> dict:
    """name -> median over the rounds of its time over ``reference``'s in the same round."""
    return {k: median([a / b for a, b in zip(v, times[reference])]) for k, v in times.items()}


def weight_mb(export: str) -> float:
    code = (
        "import sys, tensorflow as tf; loaded = tf.saved_model.load(sys.argv[1]); "
        "print(sum(v.shape.num_elements() * v.dtype.size "
        "for v in loaded.signatures['serving_default'].variables))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, export], env=ENV, capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1]) / 1e6


def measure_model(name: str, args, binary: str | None) -> dict:
    """Builds ``name``'s export and variants, then measures them; one JSON-able dict."""
    export = bench_cli.ensure_model(os.path.join(args.cache, "exports"), name)
    workdir = os.path.join(args.cache, "variants", name)
    os.makedirs(workdir, exist_ok=True)
    variants = {
        v: build_variant(export, v, os.path.join(workdir, v), args.reuse_variants)
        for v in args.variants
    }
    check_folded(name, variants)
    row = {
        "weight_mb": weight_mb(export),
        "variants": variants,
        "memory": {},
        "latency": {},
        "configs": {},
        "load_average": {"start": os.getloadavg()},
    }
    loaders = [name for name in args.loaders if name == "python" or binary]
    for loader in loaders:
        row["memory"][loader] = {
            v: memory(binary, loader, info["path"], args.memory_batch)
            for v, info in variants.items()
        }
        print(f"# {name} {loader} memory done", file=sys.stderr, flush=True)
    for loader in loaders:
        row["latency"][loader] = latency_pairs(
            binary, loader, variants, args.batches, args.rounds, args.warmup
        )
        print(f"# {name} {loader} latency done", file=sys.stderr, flush=True)
    if binary:
        for config in [c for c in args.configs if c != "default"]:
            text, env = CONFIGS[config]
            proto = config_file(workdir, config)
            row["configs"][config] = {
                "memory": {
                    v: memory(binary, "serving", variants[v]["path"], args.memory_batch, proto, env)
                    for v in variants
                },
                "latency": latency(
                    binary,
                    "serving",
                    {v: variants[v]["path"] for v in variants},
                    args.batches[:1],
                    args.rounds,
                    args.warmup,
                    proto,
                    env,
                ),
            }
            print(f"# {name} config {config} done", file=sys.stderr, flush=True)
    row["load_average"]["end"] = os.getloadavg()
    return row


# ---- reporting -----------------------------------------------------------------------------------
def _over(mib: float, reference: float, weight: float) -> str:
    return f"{(mib - reference) * 2**20 / (weight * 1e6):+.1f}"


def peak(m: dict) -> float:
    """Peak MiB of a memory run: loading, the first call and the settled calls."""
    return max(m["first_call"]["hwm_mib"], m["settled"]["hwm_mib"])


def memory_table(rows: dict) -> str:
    lines = [
        "| model | weights MB | variant | folded | BN ops left | loader | after load MiB | "
        "peak, load + first call MiB | (peak − original) / weights | settled RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        for loader, table in row["memory"].items():
            reference = peak(table["original"])
            for variant, m in table.items():
                info = row["variants"][variant]
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            name,
                            f"{row['weight_mb']:.0f}",
                            variant,
                            info.get("folded", "–"),
                            str(info["batch_norm_ops"]),
                            loader,
                            f"{m['load']['hwm_mib']:.0f}",
                            f"{peak(m):.0f}",
                            _over(peak(m), reference, row["weight_mb"]),
                            f"{m['settled']['rss_mib']:.0f}",
                        ]
                    )
                    + " |"
                )
    return "\n".join(lines)


def _batch_and_clock(key: str) -> tuple[str, str]:
    """A latency key ("16", "cpu 16") as (batch, "wall" or "CPU")."""
    return (key[4:], "CPU") if key.startswith("cpu ") else (key, "wall")


def latency_table(rows: dict) -> str:
    """Per model, loader, batch and clock (wall time; the process' CPU time, steadier on a
    shared machine): each variant's median ms, the original's in the same process (each pair
    ran at its own time: compare within a cell, not across), and the median of the variant's
    per-round ratios to the original (``latency_pairs``)."""
    variants = [
        v
        for v in (*VARIANTS, AA)
        if v != "original"
        and any(v in by_loader for r in rows.values() for by_loader in r["latency"].values())
    ]
    lines = [
        "| model | loader | batch | time | "
        + " | ".join(f"{v} ms (original's)" for v in variants)
        + " | "
        + " | ".join(f"{v} / original" for v in variants)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(variants)),
    ]
    for name, row in rows.items():
        for loader, pairs in row["latency"].items():
            keys = sorted(
                next(iter(pairs.values())),
                key=lambda k: (int(_batch_and_clock(k)[0]), _batch_and_clock(k)[1] != "wall"),
            )
            for key in keys:
                cells = [name, loader, *_batch_and_clock(key)]
                cells += [
                    f"{median(pairs[v][key][v]) * 1e3:.1f} "
                    f"({median(pairs[v][key]['original']) * 1e3:.1f})"
                    if v in pairs
                    else "–"
                    for v in variants
                ]
                cells += [
                    f"{ratios(pairs[v][key])[v]:.3f}" if v in pairs else "–" for v in variants
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configs_table(rows: dict) -> str:
    """Per model, session configuration and variant: TF Serving's peak and settled memory, and
    the batch-1 latency over the original's in the same process (the default configuration:
    ``latency_pairs``, each variant beside the original; the others: every variant in one
    process)."""
    lines = [
        "| model | configuration | variant | peak MiB (serving) | (peak − original, default) "
        "/ weights | settled RSS MiB | latency / original, same configuration, batch 1: "
        "wall | CPU | median ms: wall | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "serving" not in row["memory"] or not row["configs"]:
            continue
        reference = peak(row["memory"]["serving"]["original"])
        every = {"default": (row["memory"]["serving"], _pair_cells(row["latency"]["serving"]))}
        for config, result in row["configs"].items():
            every[config] = (result["memory"], _process_cells(result["latency"]))
        for config, (memories, cells) in every.items():
            for variant, m in memories.items():
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            name,
                            config,
                            variant,
                            f"{peak(m):.0f}",
                            _over(peak(m), reference, row["weight_mb"]),
                            f"{m['settled']['rss_mib']:.0f}",
                            *cells.get(variant, ["–"] * 4),
                        ]
                    )
                    + " |"
                )
    return "\n".join(lines)


def _pair_cells(pairs: dict) -> dict:
    """variant -> [wall ratio, CPU ratio, wall ms, CPU ms] at batch 1, from its own pair."""
    cells = {}
    for name, by_key in pairs.items():
        variant = "original" if name == AA else name
        wall, cpu = by_key["1"], by_key["cpu 1"]
        cells[variant] = [
            f"{ratios(wall)[name]:.3f}",
            f"{ratios(cpu)[name]:.3f}",
            f"{median(wall[name]) * 1e3:.1f}",
            f"{median(cpu[name]) * 1e3:.1f}",
        ]
    return cells


def _process_cells(by_key: dict) -> dict:
    """The same, every variant from one process."""
    wall, cpu = by_key["1"], by_key["cpu 1"]
    by_wall, by_cpu = ratios(wall), ratios(cpu)
    return {
        v: [
            f"{by_wall[v]:.3f}",
            f"{by_cpu[v]:.3f}",
            f"{median(wall[v]) * 1e3:.1f}",
            f"{median(cpu[v]) * 1e3:.1f}",
        ]
        for v in wall
    }


def report(document: dict) -> str:
    rows = document["rows"]
    loads = "; ".join(
        f"{name} {r['load_average']['start'][0]:.1f} -> "
        f"{r['load_average'].get('end', [float('nan')])[0]:.1f}"
        for name, r in rows.items()
        if "load_average" in r
    )
    parts = [
        f"# {document['machine']}",
        f"# {document.get('command', '')}",
        f"# {document.get('date', '')}; load average (1 min) at start -> end: {loads}",
        "",
        memory_table(rows),
        "",
        latency_table(rows),
    ]
    if any(r["configs"] for r in rows.values()):
        parts += ["", configs_table(rows)]
    return "\n".join(parts)


def plot(rows: dict, path: str) -> None:
    """Peak memory (TF Serving's path) and latency over the original's, per model and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    variants = [v for v in VARIANTS if any(v in r["variants"] for r in rows.values())]
    batches = sorted(
        {
            b
            for r in rows.values()
            for pairs in r["latency"].values()
            for by_key in pairs.values()
            for b in by_key
            if not b.startswith("cpu ")
        },
        key=int,
    )
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(5 * (1 + len(batches)), 4.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(names))]
        loader = lambda r: r["memory"].get("serving") or next(iter(r["memory"].values()))
        over = [
            (peak(loader(r)[variant]) - peak(loader(r)["original"]))
            * 2**20
            / (r["weight_mb"] * 1e6)
            if variant in loader(r)
            else float("nan")
            for r in rows.values()
        ]
        axes[0].bar(
            xs,
            over,
            width,
            label="original (latency: its A/A control)" if variant == "original" else variant,
        )
        for ax, batch in zip(axes[1:], batches):

            def ratio(r, variant=variant, batch=batch):  # CPU time where measured: steadier
                pairs = r["latency"].get("serving") or next(iter(r["latency"].values()))
                if variant not in pairs and variant != "original":
                    return float("nan")
                by_key = pairs[variant if variant != "original" else AA]
                times = by_key.get(f"cpu {batch}", by_key[batch])
                return ratios(times)[variant if variant != "original" else AA]

            ax.bar(xs, [ratio(r) for r in rows.values()], width, label=variant)
    axes[0].axhline(
        1.0,
        color="k",
        linestyle="--",
        linewidth=1,
        label="the default's limit: original + 1x the weights",
    )
    axes[0].set_ylabel("(peak − original's peak) / weights")
    axes[0].set_title("peak RSS, load + first call (TF Serving's path)")
    for ax, batch in zip(axes[1:], batches):
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_ylabel("time / original's (median of per-round ratios)")
        ax.set_title(f"CPU time per call, batch {batch} (TF Serving's path)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    import benchlib

    return benchlib.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="keras.applications exports")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--batches", default="1,16", help="latency batch sizes")
    parser.add_argument("--memory-batch", type=int, default=1, help="batch of the memory runs")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    parser.add_argument("--warmup", type=int, default=3, help="calls of each variant first")
    parser.add_argument(
        "--configs", default="default", help=f"serving session configurations: {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--cache", default=os.path.join(tempfile.gettempdir(), "graphfold-bench-serving")
    )
    parser.add_argument(
        "--reuse-variants",
        action="store_true",
        help="measure the variants an earlier run wrote under --cache",
    )
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--from-json", help="no measuring: the tables (and plot) of a --json file")
    parser.add_argument("--plot", help="PNG: peak memory and latency ratios per variant")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            document = json.load(f)
    else:
        args.variants = [v for v in args.variants.split(",") if v]
        args.loaders = [name for name in args.loaders.split(",") if name]
        args.batches = [int(b) for b in args.batches.split(",") if b]
        args.configs = [c for c in args.configs.split(",") if c]
        unknown = sorted(
            set(args.variants) - set(VARIANTS)
            | set(args.loaders) - set(LOADERS)
            | set(args.configs) - set(CONFIGS)
        )
        if unknown or "original" not in args.variants:
            parser.error(f"unknown {unknown}" if unknown else "--variants needs original")
        binary, how = (
            harness(os.path.join(args.cache, "bin"))
            if "serving" in args.loaders
            else (None, "not asked")
        )
        print(f"# serving harness: {how}", file=sys.stderr, flush=True)
        document = {
            "machine": machine(),
            "command": "python tools/bench_serving.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "harness": how,
            "rows": {},
        }
        for name in [m for m in args.models.split(",") if m]:
            document["rows"][name] = measure_model(name, args, binary)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(document, f, indent=1)
    print(report(document))
    if args.plot:
        plot(document["rows"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
