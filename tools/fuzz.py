"""Differential fuzzing of graphfold: random graphs, rewritten and compared with the original.

    python tools/fuzz.py --n 1000 --seed 0 [--verbose] [--stop]

Seeds ``seed .. seed+n-1`` each give one graph (``tests/graphgen.py``). For each: rewrite, check
that the outputs match (relative error <= 1e-5 float32, 2e-2 float16), that the GraphDef imports,
and that the report lists every inserted batch norm with a reason when unfolded (an output over
that limit, a cancellation, is judged against the graph in float64: counted as ``by_reference``).
Then the same frozen graph through ``optimize_graph_def`` with 1-4 layer, bias and batch-norm
nodes among the requested outputs (``graphgen.check_fetches``): each must stay exact.
Failures are printed with their seed and the graph; reproduce one with
``--seed S --n 1 --verbose``.

The graphs run in a child process: when TensorFlow aborts it (a ``CHECK`` failure in a kernel or a
shape function kills the process, it cannot be caught), the seed is reported as a failure and the
campaign goes on from the next seed; an abort while running the *original* graph (a TensorFlow
bug the generator met, not a rewrite) is reported as skipped, with its seed. Exit status 1 when
any seed failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))


def _child(args) -> None:
    """Runs the seeds, one protocol line per seed on stdout: START, then OK or FAIL."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import graphgen

    for seed in range(args.seed, args.seed + args.n):
        print(f"START {seed}", flush=True)
        case = None
        try:
            case = graphgen.build(seed)
            print(f"ORIGINAL {seed}", flush=True)  # a TensorFlow abort here is not ours
            graphgen.run_original(case)
            print(f"REWRITE {seed}", flush=True)
            folded, err = graphgen.check(case)
            fetched, fetch_err = graphgen.check_fetches(
                case, phase=lambda name, seed=seed: print(f"{name} {seed}", flush=True)
            )
        except Exception as exc:  # noqa: BLE001 (every failure is reported with its seed)
            text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if case is not None:
                text += "\n" + case.describe()
            if args.verbose:
                text += "\n" + traceback.format_exc()
            print("FAIL " + json.dumps({"seed": seed, "text": text}), flush=True)
            continue
        report = folded.report
        stats = {
            "seed": seed,
            "layout": case.layout,
            "dtype": case.dtype.name,
            "batch_norms": len(report.batch_norms),
            "forward": report.count("forward"),
            "backward": report.count("backward"),
            "split": report.count("split"),
            "partial": len(report.partial),
            "not_folded": len(report.not_folded),
            "err": err,
            "by_reference": err > graphgen.TOLERANCE[case.dtype],
            "fetched": len(fetched),
            "fetch_err": fetch_err,
            "fetch_by_reference": fetch_err > graphgen.TOLERANCE[case.dtype],
        }
        if args.verbose:
            stats["text"] = case.describe() + "\n" + report.entry_table()
        print("OK " + json.dumps(stats), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of graphs")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--verbose", action="store_true", help="print every graph and report")
    parser.add_argument("--stop", action="store_true", help="stop at the first failure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    failures: list[int] = []
    original_aborts: list[int] = []  # seeds whose original graph TensorFlow cannot run
    stats = collections.Counter()
    worst: dict[str, tuple[float, int]] = {}  # dtype -> (largest relative error, its seed)
    start, end = time.perf_counter(), args.seed + args.n
    seed = args.seed
    while seed < end:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "--seed",
            str(seed),
            "--n",
            str(end - seed),
        ] + (["--verbose"] if args.verbose else [])
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        current, stop, phase = None, False, None
        for line in proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind in ("START", "ORIGINAL", "REWRITE"):
                current, phase = int(rest), kind
            elif kind == "FAIL":
                record = json.loads(rest)
                failures.append(record["seed"])
                print(
                    f"FAIL seed {record['seed']}: " + record["text"].replace("\n", "\n  "),
                    flush=True,
                )
                current = None
                if args.stop:
                    proc.kill()
                    stop = True
                    break
            elif kind == "OK":
                record = json.loads(rest)
                current = None
                stats["graphs"] += 1
                for key in ("layout", "dtype"):
                    stats[record[key]] += 1
                for key in (
                    "batch_norms",
                    "forward",
                    "backward",
                    "split",
                    "partial",
                    "not_folded",
                    "by_reference",
                    "fetched",
                    "fetch_by_reference",
                ):
                    stats[key] += record[key]
                worst[record["dtype"]] = max(
                    worst.get(record["dtype"], (0.0, -1)), (record["err"], record["seed"])
                )
                key = record["dtype"] + " fetched"
                worst[key] = max(worst.get(key, (0.0, -1)), (record["fetch_err"], record["seed"]))
                if args.verbose:
                    print(record["text"] + f"\nmax relative error {record['err']:.3g}\n")
        stderr = proc.stderr.read()
        proc.wait()
        if stop:
            break
        if current is None:
            break  # the child ran every seed
        tail = [
            line
            for line in stderr.splitlines()
            if "Check failed" in line or line.startswith(("F0000", "Fatal", "Segmentation"))
        ][-1:]
        if phase == "ORIGINAL":  # TensorFlow aborts on the generated graph itself
            original_aborts.append(current)
            print(
                f"SKIP seed {current}: TensorFlow aborts running the ORIGINAL graph (exit "
                f"status {proc.returncode})" + (f": {tail[0]}" if tail else ""),
                flush=True,
            )
        else:
            failures.append(current)  # the child died inside seed ``current``
            print(
                f"FAIL seed {current}: the process died (exit status {proc.returncode})"
                + (f": {tail[0]}" if tail else ""),
                flush=True,
            )
        if args.stop:
            break
        seed = current + 1
    seconds = time.perf_counter() - start
    print(f"\n{args.n} seeds from {args.seed}: {len(failures)} failed, {seconds:.0f} s")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    print(
        "  worst relative error: "
        + ", ".join(f"{k} {e:.3g} (seed {s})" for k, (e, s) in sorted(worst.items()))
    )
    if failures:
        print("  failing seeds: " + " ".join(map(str, failures)))
    if original_aborts:
        print(
            f"  skipped, TensorFlow aborts on the original graph: {len(original_aborts)} "
            "(seeds " + " ".join(map(str, original_aborts)) + ")"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
