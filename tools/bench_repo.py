"""A whole model repository: wall time of ``optimize_repository`` with 1 and 2 local worker
processes and on Beam's DirectRunner with 2 workers; the scaling, and each worker's peak memory.

    python tools/bench_repo.py [--models 5] [--versions 4] [--model demo|mobilenetv2]
        [--runs jobs1,jobs2,beam2] [--keep DIR] [--json F.json]

Builds a repository of MODELS x VERSIONS SavedModels in TF Serving's layout (``demo``: the
``graphfold demo`` CNN, 7 batch norms, 64x64 inputs; ``mobilenetv2``: Keras 3 MobileNetV2 at
224x224, 52 batch norms; each model with its own random weights and batch-norm statistics, its
versions copies of it), then optimizes all of it, into a fresh destination, once per run:

  jobs1   optimize_repository(jobs=1)
  jobs2   optimize_repository(jobs=2)
  beam2   optimize_repository(runner="beam"), DirectRunner, --direct_num_workers=2
          --direct_running_mode=multi_processing (needs graphfold[beam]; else skipped)

Wall time includes starting the workers: forked from this process, which has imported graphfold
(and TensorFlow) as the ``graphfold optimize-repo`` command has, and run no TensorFlow
operation (the repository is built in a child process), so they start with TensorFlow imported;
"worker start" says how they were started (``graphfold.fleet.pool.start_method``). Per version: the
seconds the worker spent on it. Peak memory: the largest ``ru_maxrss`` a worker reported (for
Beam, the SDK harness process, Beam included). Before each run, the load average and how many
cores the machine actually gave 1 and then 2 pure-Python busy loops (1 s of CPU each; 1.0 and 2.0
on 2 idle cores): on a shared machine, the scaling can be no better than that ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

RUNS = {
    "jobs1": dict(jobs=1),
    "jobs2": dict(jobs=2),
    "beam2": dict(
        runner="beam",
        pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    ),
}


def build_repository(base: str, models: int, versions: int, model: str) -> None:
    """``base/model_<i>/<v>/`` for i < models, v in 1..versions."""
    from graphfold import examples
    from graphfold.cli.demo import build_model

    for i in range(models):
        first = os.path.join(base, f"model_{i}", "1")
        if model == "demo":
            build_model(seed=i).export(first, verbose=False)
        else:
            import keras

            net = keras.applications.MobileNetV2(weights=None, classifier_activation=None)
            examples.randomise(net, np.random.default_rng(i))
            net.export(first, verbose=False)
        for v in range(2, versions + 1):
            shutil.copytree(first, os.path.join(base, f"model_{i}", str(v)))


SPIN = "import time\nend = time.process_time() + {0}\nwhile time.process_time() < end:\n    pass\n"


def cores_delivered(processes: int, cpu_seconds: float = 1.0) -> float:
    """CPU seconds per wall second that ``processes`` pure-Python spinners got together: the
    parallel capacity the machine gives right now (2.0 on 2 idle cores)."""
    start = time.perf_counter()
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN.format(cpu_seconds)]) for _ in range(processes)
    ]
    for spinner in spinners:
        spinner.wait()
    return processes * cpu_seconds / (time.perf_counter() - start)


def run_once(name: str, src: str, dst: str) -> dict:
    from graphfold.fleet import pool
    from graphfold.fleet.repository import optimize_repository

    load = os.getloadavg()[0]
    method = pool.start_method()
    capacity = (cores_delivered(1), cores_delivered(2))
    start = time.perf_counter()
    result = optimize_repository(src, dst, versions="all", **RUNS[name])
    wall = time.perf_counter() - start
    seconds = [r["seconds"] for r in result.records if r.get("seconds") is not None]
    rss = [r["worker_peak_rss_mb"] for r in result.records if r.get("worker_peak_rss_mb")]
    return {
        "run": name,
        "wall_s": wall,
        "versions": len(result.records),
        "ok": result.count("ok"),
        "failed": [f"{r['model']}/{r['version']}: {r['error']}" for r in result.failed],
        "per_version_s": statistics.median(seconds) if seconds else None,
        "sum_version_s": sum(seconds),
        "peak_rss_mb": max(rss) if rss else None,
        "load_before": load,
        "cores_delivered_1_2": capacity,
        "start_method": None if name.startswith("beam") else method,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--model", choices=("demo", "mobilenetv2"), default="demo")
    parser.add_argument("--runs", default="jobs1,jobs2,beam2")
    parser.add_argument("--keep", metavar="DIR", help="build (or reuse) the repository here")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:  # the child process that builds the repository
        build_repository(args.build, args.models, args.versions, args.model)
        return 0
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import machine

    work = tempfile.mkdtemp(prefix="bench_repo-")
    try:
        src = args.keep or os.path.join(work, "models")
        if not os.path.isdir(src):
            clock = time.perf_counter()
            # in a child process: this one stays as a user's process that has imported
            # graphfold and run no TensorFlow operation (so its workers can be forked)
            subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--build",
                    src,
                    "--models",
                    str(args.models),
                    "--versions",
                    str(args.versions),
                    "--model",
                    args.model,
                ],
                check=True,
            )
            print(
                f"built {args.models} x {args.versions} {args.model} versions in {src} "
                f"({time.perf_counter() - clock:.0f}s)",
                file=sys.stderr,
            )
        results = []
        for name in runs:
            if name.startswith("beam"):
                try:
                    import apache_beam  # noqa: F401
                except ImportError:
                    print(f"{name}: skipped (pip install 'graphfold[beam]')", file=sys.stderr)
                    continue
            print(f"{name}: running (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
            results.append(run_once(name, src, os.path.join(work, f"out_{name}")))
            print(f"{name}: {results[-1]['wall_s']:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {machine()}; {os.cpu_count()} cores visible")
    print(f"repository: {args.models} models x {args.versions} versions ({args.model})\n")
    base = next((r["wall_s"] for r in results if r["run"] == "jobs1"), None)
    print(
        "| run | wall s | speed-up vs jobs1 | median s per version (in worker) | "
        "sum s over versions | peak RSS per worker MB | load avg before | "
        "cores delivered to 1 / 2 spinners | worker start | ok | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speedup = f"{base / r['wall_s']:.2f}x" if base else "-"
        per = "-" if r["per_version_s"] is None else f"{r['per_version_s']:.2f}"
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        one, two = r["cores_delivered_1_2"]
        print(
            f"| {r['run']} | {r['wall_s']:.1f} | {speedup} | {per} | {r['sum_version_s']:.1f} "
            f"| {rss} | {r['load_before']:.2f} | {one:.2f} / {two:.2f} "
            f"| {r.get('start_method') or 'beam'} | {r['ok']} "
            f"| {len(r['failed'])} |"
        )
    for r in results:
        for failure in r["failed"]:
            print(f"{r['run']}: failed {failure}")
    jobs2 = next((r for r in results if r["run"] == "jobs2"), None)
    if base and jobs2:
        ratio = base / jobs2["wall_s"]
        one, two = jobs2["cores_delivered_1_2"]
        print(
            f"\nscaling: jobs2 is {ratio:.2f}x faster than jobs1 (target >= 1.7x on 2 free "
            f"cores): {'met' if ratio >= 1.7 else 'NOT met'}; just before the jobs2 run the "
            f"machine gave 1 busy process {one:.2f} cores and 2 busy processes {two:.2f} "
            f"cores ({two / one:.2f}x: the most any 2-process run could scale then)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "models": args.models,
                    "versions": args.versions,
                    "model": args.model,
                    "results": results,
                },
                f,
                indent=2,
            )
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
