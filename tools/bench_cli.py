"""Wall time and peak memory of the ``graphfold`` command, stage by stage, against loading the
model: each run is a fresh process, timed from its start to its exit, its peak resident set read
from the operating system (``wait4``); the reference is ``tf.saved_model.load`` and one call of
``serving_default`` in a fresh process of the same run.

"output": the same load and call of what ``graphfold optimize`` wrote, in a fresh process: what
serving the result costs, and a floor for ``optimize``, which loads and calls it to verify it.

Per stage (start-up, load, fold, write, verify, ...), the child process marks each stage's start
(a ``graphfold.progress.StageStarted`` event) with the time and the peak RSS since the previous
mark (``VmHWM``, reset through ``/proc/self/clear_refs``).

``--weights auto,constants,variables``: one row per mode (``optimize`` and its output; the
reference and ``inspect`` once per model). The targets table checks issue 20's memory targets:
optimize's peak within its output's load-and-call peak + 3x the weights in every mode, and with
the default mode (auto) within the original's load-and-call peak + 5x the weights.
Serving latency: tools/bench_serving.py.

    python tools/bench_cli.py --models ResNet50,MobileNetV2,DenseNet121 --sizes 100,500,1000,2000 \\
        --weights auto,constants,variables --json cli.json --plot docs/cli.png
    python tools/bench_cli.py --from-json cli.json --plot docs/cli.png    # tables and plot again

Models are built once under ``--cache`` (Keras 3 ``model.export()``: ``serve`` and
``serving_default``; the synthetic ones: a stack of width-2048 MatMul + batch norm + ReLU layers,
as many as the size in MB asks, saved with the same two signatures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WIDTH = 2048  # synthetic layers: WIDTH x WIDTH float32 weights
ENV = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
)


# ---- building the models (in a child process: the parent stays small) --------------------------
def _build_application(name: str, path: str) -> None:
    from graphfold import examples

    model, _, _ = examples.application(name, legacy=False)
    model.export(path, verbose=False)


def _build_synthetic(megabytes: int, path: str) -> None:
    """``layers`` x (MatMul, decomposed batch norm, ReLU), random statistics; the same function
    saved as ``serve`` and ``serving_default``."""
    import numpy as np
    import tensorflow as tf

    layers = max(1, round(megabytes * 1e6 / (WIDTH * WIDTH * 4)))
    rng = np.random.default_rng(0)
    module = tf.Module()
    module.kernels, module.bn = [], []
    for i in range(layers):
        kernel = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32)
        kernel *= np.float32(1.0 / np.sqrt(WIDTH))
        module.kernels.append(tf.Variable(kernel, name=f"dense_{i}/kernel"))
        del kernel
        stats = [
            rng.uniform(0.5, 1.5, WIDTH),
            rng.normal(0, 0.5, WIDTH),
            rng.normal(0, 0.5, WIDTH),
            rng.uniform(0.3, 2.0, WIDTH),
        ]
        module.bn.append(
            [
                tf.Variable(s.astype(np.float32), name=f"bn_{i}/{n}")
                for s, n in zip(stats, ("gamma", "beta", "mean", "variance"))
            ]
        )

    @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32, name="x")])
    def serve(x):
        for kernel, (gamma, beta, mean, variance) in zip(module.kernels, module.bn):
            x = tf.matmul(x, kernel)
            x = tf.nn.batch_normalization(x, mean, variance, beta, gamma, 1e-3)
            x = tf.nn.relu(x)
        return {"output_0": x}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serve": serve, "serving_default": serve})


def ensure_model(cache: str, name: str) -> str:
    path = os.path.join(cache, name)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    print(f"building {name} in {path}", file=sys.stderr, flush=True)
    code = f"import sys; sys.path.insert(0, {HERE!r}); import bench_cli; " + (
        f"bench_cli._build_synthetic({int(name[:-2])}, {path!r})"
        if name.endswith("MB")
        else f"bench_cli._build_application({name!r}, {path!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, stdout=subprocess.DEVNULL)
    return path


# ---- running a child process ---------------------------------------------------------------------
def run_child(argv: list[str], marks_file: str | None = None) -> dict:
    """Runs ``argv``; returns wall seconds, peak RSS (MiB) and the exit status."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, env=ENV, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = dict(
        wall=wall,
        peak_mib=usage.ru_maxrss / 1024,
        exit=process.returncode,
        stdout=stdout.decode(errors="replace")[-500:],
    )
    if process.returncode != 0:
        result["stderr"] = stderr.decode(errors="replace")[-2000:]
    if marks_file and os.path.exists(marks_file):
        with open(marks_file) as f:
            result["stages"] = json.load(f)
        # Resetting VmHWM between stages resets the kernel's peak too: the peak is theirs.
        result["peak_mib"] = max(s["peak_mib"] for s in result["stages"])
    return result


REFERENCE = """
import sys, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
_, specs = fn.structured_input_signature
fn(**{k: tf.zeros([1] + s.shape.as_list()[1:], s.dtype) for k, s in specs.items()})
print(sum(v.shape.num_elements() * v.dtype.size for v in fn.variables))
"""


# The graphfold command, with each stage's start marked by the time and the peak RSS since the
# previous mark (the first mark: Python and TensorFlow start-up).
MARKED = """
import json, os, sys, time
T0 = time.perf_counter()
marks, last = [], ["start-up"]

def hwm():
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024

def mark(stage):
    marks.append(dict(stage=last[0], end=time.perf_counter() - T0, peak_mib=hwm()))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # resets VmHWM to the current RSS
    except OSError:
        pass
    last[0] = stage

import graphfold.cli.command as cli
from graphfold.progress import StageStarted
progress = cli.Console.progress
STAGES = ("load", "fold", "write", "verify", "rename")     # graphfold.progress.StageStarted.stage

def marked(self, event):
    if isinstance(event, StageStarted) and event.stage in STAGES:
        mark(event.stage)
    progress(self, event)

cli.Console.progress = marked
code = cli.main(sys.argv[2:])
mark(None)
with open(sys.argv[1], "w") as f:
    json.dump(marks, f)
sys.exit(code)
"""


def measure(
    path: str, workdir: str, commands: list[str], weights: str, reference: dict | None = None
) -> dict:
    """One row: the reference (measured now unless given), then each command; after
    ``optimize``, the same load and call of what it wrote ("output")."""
    row = {"reference": reference or run_child([sys.executable, "-c", REFERENCE, path])}
    row["weight_mb"] = int(row["reference"]["stdout"].split()[-1]) / 1e6
    row["mode"] = weights
    for command in commands:
        marks = os.path.join(workdir, "marks.json")
        if os.path.exists(marks):
            os.remove(marks)
        dst = os.path.join(workdir, "out")
        argv = [sys.executable, "-c", MARKED, marks, command, path]
        report = os.path.join(workdir, "report.json")
        if command == "optimize":
            argv += [dst, "--overwrite", "--weights", weights, "--report", report]
        row[command] = run_child(argv, marks)
        if command == "optimize" and os.path.exists(report):
            with open(report) as f:
                document = json.load(f)
            row["weights"] = document.get("weights")
            row["rewritten"] = sum(s["rewritten"] for s in document["signatures"].values())
            os.remove(report)
            # what serving the result costs: the same load and call, of graphfold's output
            row["output"] = run_child([sys.executable, "-c", REFERENCE, dst])
        shutil.rmtree(dst, ignore_errors=True)
    return row


# ---- reporting -----------------------------------------------------------------------------------
def stage_cell(run: dict) -> str:
    stages, previous = run.get("stages") or [], 0.0
    cells = []
    for s in stages:
        cells.append(f"{s['stage']} {s['end'] - previous:.1f} s / {s['peak_mib'] / 1024:.2f}")
        previous = s["end"]
    return "; ".join(cells)


def markdown(rows: dict) -> str:
    lines = [
        "| model | weights MB | written as | reference s | reference peak GiB | optimize s | "
        "× ref | optimize peak GiB | (peak − ref) / weights | output: load + call peak GiB | "
        "(output − ref) / weights | inspect s | × ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ref, opt, ins = r["reference"], r.get("optimize"), r.get("inspect")
        cells = [
            name,
            f"{r['weight_mb']:.0f}",
            r.get("weights") or "–",
            f"{ref['wall']:.1f}",
            f"{ref['peak_mib'] / 1024:.2f}",
        ]
        if opt:
            over = (opt["peak_mib"] - ref["peak_mib"]) * 2**20 / (r["weight_mb"] * 1e6)
            cells += [
                f"{opt['wall']:.1f}" + ("" if opt["exit"] == 0 else f" (exit {opt['exit']})"),
                f"{opt['wall'] / ref['wall']:.2f}",
                f"{opt['peak_mib'] / 1024:.2f}",
                f"{over:.1f}",
            ]
        else:
            cells += ["–"] * 4
        out = r.get("output")
        if out and out["exit"] == 0:
            over = (out["peak_mib"] - ref["peak_mib"]) * 2**20 / (r["weight_mb"] * 1e6)
            cells += [f"{out['peak_mib'] / 1024:.2f}", f"{over:.1f}"]
        else:
            cells += ["–", "–"]
        cells += (
            [
                f"{ins['wall']:.1f}" + ("" if ins["exit"] == 0 else f" (exit {ins['exit']})"),
                f"{ins['wall'] / ref['wall']:.2f}",
            ]
            if ins
            else ["–", "–"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", targets(rows)]
    lines += [
        "",
        "Stages of `graphfold optimize` (seconds / peak GiB within the stage):",
        "",
        "| model | stages |",
        "|---|---|",
    ]
    for name, r in rows.items():
        if r.get("optimize"):
            lines.append(f"| {name} | {stage_cell(r['optimize'])} |")
    return "\n".join(lines)


OVER_OUTPUT, OVER_REFERENCE = 3, 5  # issue 20's targets, in weights


def _over(mib: float, base: float, weight_mb: float) -> float:
    return (mib - base) * 2**20 / (weight_mb * 1e6)


def targets(rows: dict) -> str:
    """Issue 20's memory targets per row: optimize's peak <= the written artifact's own load
    and call peak (same loader, fresh process) + 3x the weights, in every mode; with the
    default mode (auto), <= the original's load-and-call peak + 5x the weights."""
    lines = [
        f"| model | mode | written as | optimize peak GiB | output peak GiB | (optimize − "
        f"output) / weights | ≤ output + {OVER_OUTPUT}× | reference peak GiB | "
        f"(optimize − reference) / weights | default mode: ≤ reference + "
        f"{OVER_REFERENCE}× |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        opt, out, ref = r.get("optimize"), r.get("output"), r["reference"]
        if not opt or opt["exit"] != 0 or not out or out["exit"] != 0:
            continue
        vs_output = _over(opt["peak_mib"], out["peak_mib"], r["weight_mb"])
        vs_reference = _over(opt["peak_mib"], ref["peak_mib"], r["weight_mb"])
        default = (
            ("yes" if vs_reference <= OVER_REFERENCE else "**no**")
            if r.get("mode", "auto") == "auto"
            else "–"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    name.split(" (")[0],
                    r.get("mode", "auto"),
                    r.get("weights") or "–",
                    f"{opt['peak_mib'] / 1024:.2f}",
                    f"{out['peak_mib'] / 1024:.2f}",
                    f"{vs_output:.1f}",
                    "yes" if vs_output <= OVER_OUTPUT else "**no**",
                    f"{ref['peak_mib'] / 1024:.2f}",
                    f"{vs_reference:.1f}",
                    default,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps: dict[str, list] = {}
    for key, r in rows.items():
        if key.split(" (")[0].endswith("MB") and r.get("optimize"):
            sweeps.setdefault(r.get("mode", "auto"), []).append(r)
    if not sweeps:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, sweep in sweeps.items():
        sweep.sort(key=lambda r: r["weight_mb"])
        gb = [r["weight_mb"] / 1e3 for r in sweep]
        left.plot(
            gb,
            [r["optimize"]["wall"] for r in sweep],
            "o-",
            label=f"graphfold optimize --weights {mode}",
        )
        right.plot(
            gb,
            [r["optimize"]["peak_mib"] / 1024 for r in sweep],
            "o-",
            label=f"graphfold optimize --weights {mode}",
        )
        served = [r for r in sweep if r.get("output") and r["output"]["exit"] == 0]
        right.plot(
            [r["weight_mb"] / 1e3 for r in served],
            [r["output"]["peak_mib"] / 1024 for r in served],
            ":",
            label=f"its output: load + one call ({mode})",
        )
    reference = max(sweeps.values(), key=len)
    gb = [r["weight_mb"] / 1e3 for r in reference]
    left.plot(
        gb, [r["reference"]["wall"] for r in reference], "s--", label="reference: load + one call"
    )
    right.plot(
        gb,
        [r["reference"]["peak_mib"] / 1024 for r in reference],
        "s--",
        label="reference: load + one call",
    )
    left.set_xlabel("weights (GB)")
    left.set_ylabel("wall time (s)")
    right.set_xlabel("weights (GB)")
    right.set_ylabel("peak RSS (GiB)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle("graphfold optimize against loading the model (synthetic MatMul+BN stacks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="ResNet50,MobileNetV2,DenseNet121",
        help="keras.applications exports; '' for none",
    )
    parser.add_argument(
        "--sizes", default="100,500,1000,2000", help="synthetic models, MB of weights; '' for none"
    )
    parser.add_argument("--commands", default="optimize,inspect")
    parser.add_argument(
        "--weights",
        default="auto",
        help="graphfold optimize --weights, one row per mode: auto,constants,...",
    )
    parser.add_argument("--cache", default=os.path.join("/tmp", "graphfold-bench-cli"))
    parser.add_argument("--json", help="write the measurements here (merged with its rows)")
    parser.add_argument("--from-json", help="print tables (and --plot) from saved measurements")
    parser.add_argument("--plot", help="PNG of the size sweep")
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    else:
        rows = {}
        if args.json and os.path.exists(args.json):
            with open(args.json) as f:
                rows = json.load(f)
        names = [m for m in args.models.split(",") if m]
        names += [f"{s}MB" for s in args.sizes.split(",") if s]
        os.makedirs(args.cache, exist_ok=True)
        for name in names:
            path = ensure_model(args.cache, name)
            reference, commands = None, args.commands.split(",")
            for mode in args.weights.split(","):
                key = f"{name} ({mode})"
                rows[key] = measure(path, args.cache, commands, mode, reference)
                reference = rows[key]["reference"]
                commands = [c for c in commands if c != "inspect"]  # the same for every mode
                print(markdown({key: rows[key]}).splitlines()[2], file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
