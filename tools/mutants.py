"""Deliberate breakages of graphfold, each run against the tests that must catch it.

A mutant is a few exact text edits of the package (an edit whose text is no longer there is an
error: the mutant must be updated with the code it breaks). Each one is applied to a copy of the
working tree, and its tests run there with ``pytest -x``; the mutant is *caught* when a test
fails, and *survives* when they all pass: then the suite lets that breakage through, and a test
is missing.

    python tools/mutants.py                     # every mutant, with its own tests
    python tools/mutants.py --cheap             # those CI runs (tests/test_tools.py)
    python tools/mutants.py --only rewrite-folds-nothing --tests tests/test_trust.py
    python tools/mutants.py --list

Exit status 0 when every mutant run was caught, 1 otherwise. ``--markdown`` prints the table of
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # what the mutant does, in a user's words
    edits: tuple[tuple[str, str, str], ...]  # (file, exact text, replacement)
    tests: tuple[str, ...]  # pytest arguments that must catch it
    cheap: bool = False  # run in CI (tests/test_tools.py)


MUTANTS = (
    Mutant(
        "rewrite-folds-nothing",
        "rewrite returns its input unchanged (and still reports every batch norm folded)",
        (
            (
                "graphfold/convert/rewrite.py",
                "            apply_.fold(graph, affine, decision.writes)\n",
                "            pass  # mutant: nothing folded\n",
            ),
        ),
        ("tests/test_trust.py", "-k", "keras_export"),
        cheap=True,
    ),
    Mutant(
        "forward-shift-dropped",
        "the shift t of a forward fold is dropped (bias s*b, no new bias)",
        (
            (
                "graphfold/fold/writes.py",
                "_channel_values(b, bias.s, bias.sign * bias.t, bias.axis",
                "_channel_values(b, bias.s, 0 * bias.t, bias.axis",
            ),
            (
                "graphfold/fold/writes.py",
                "    if np.any(root.t != 0):\n",
                "    if False:  # mutant\n",
            ),
        ),
        ("tests/test_forward_rules.py", "-k", "layer_then_batch_norm_nhwc"),
        cheap=True,
    ),
    Mutant(
        "backward-shift-dropped",
        "the shift t of a backward fold is dropped (no W*t added to the bias)",
        (
            (
                "graphfold/fold/writes.py",
                "    if sink.response is not None:\n",
                "    if False:  # mutant\n",
            ),
        ),
        ("tests/test_condition.py", "-k", "backward_into"),
        cheap=True,
    ),
    Mutant(
        "leaves-without-inverse",
        "the layers behind an Add (leaves) do not absorb 1/s",
        (
            (
                "graphfold/fold/rules.py",
                "inverse = Demand(1 / demand.s,",
                "inverse = Demand(np.ones_like(demand.s),",
            ),
        ),
        ("tests/test_condition.py", "-k", "leaf"),
        cheap=True,
    ),
    Mutant(
        "shared-weight-modified",
        "a weight another node reads is modified in place instead of cloned",
        (
            (
                "graphfold/fold/apply.py",
                "    if direct and len(readers) == 1 and not graph.is_fetched(const):\n",
                "    if True:  # mutant\n",
            ),
        ),
        ("tests/test_refusals.py",),
    ),
    Mutant(
        "comparison-always-passes",
        "verification's comparison passes whatever the error",
        (
            (
                "graphfold/convert/verify.py",
                "        if problem is None and not max_rel <= limit:\n",
                "        if False:  # mutant\n",
            ),
        ),
        ("tests/test_cli.py", "-k", "verification_failure"),
        cheap=True,
    ),
    Mutant(
        "noise-floor-accepts-anything",
        "a failed check is accepted whatever the noise floor says",
        (("graphfold/convert/noise.py", "o.max_rel <= NOISE_MULTIPLE * floors[o.name]", "True"),),
        ("tests/test_trust.py", "-k", "noise"),
        cheap=True,
    ),
    Mutant(
        "require-verification-ignored",
        "--require-verification (require_verification=) is ignored by optimize",
        (
            (
                "graphfold/serving/saved_model.py",
                "    if unverified and require_verification:\n",
                "    if False:  # mutant\n",
            ),
        ),
        ("tests/test_serving.py", "-k", "not_verified"),
        cheap=True,
    ),
    Mutant(
        "require-verification-ignored-graph-def",
        "--require-verification is ignored for a GraphDef file",
        (
            (
                "graphfold/serving/graph_def_file.py",
                'if check.status in ("skipped", "inconclusive") and options.require_verification:',
                "if False:  # mutant",
            ),
        ),
        ("tests/test_trust.py", "-k", "require"),
        cheap=True,
    ),
    Mutant(
        "require-verification-ignored-verify",
        "--require-verification is ignored by verify",
        (
            (
                "graphfold/serving/saved_model.py",
                "    if options.require_verification and unverified:\n",
                "    if False:  # mutant\n",
            ),
        ),
        ("tests/test_trust.py", "-k", "verify_acts"),
        cheap=True,
    ),
    Mutant(
        "assets-extra-not-copied",
        "assets.extra/ of SRC is not copied into DST",
        (
            (
                "graphfold/serving/assets.py",
                "    for rel in untouched_paths(src):\n",
                "    for rel in [p for p in untouched_paths(src) if 'assets.extra' not in p]:\n",
            ),
        ),
        ("tests/test_serving.py", "-k", "every_file_beside"),
        cheap=True,
    ),
    Mutant(
        "variables-left-unfolded",
        "weights written as variables: the original function is written, unfolded, while "
        "the report says folded",
        (
            (
                "graphfold/serving/saved_model.py",
                "        return rewrite(fn, weights=weights, keep_graph_def=False, verify=False, "
                "partial=partial)\n",
                "        return FoldedFunction(fn, None, fold(fn)[-1])  # mutant\n",
            ),
        ),
        ("tests/test_weights.py", "-k", "variables"),
        cheap=True,
    ),
    Mutant(
        "auto-writes-constants",
        "the default (auto) writes constants for an original that reads variables (TF "
        "Serving then peaks at about +8x the weights)",
        (
            (
                "graphfold/serving/saved_model.py",
                '    if nbytes:\n        return "variables", None\n',
                '    if False:  # mutant\n        return "variables", None\n',
            ),
        ),
        ("tests/test_weights.py", "-k", "auto"),
        cheap=True,
    ),
    Mutant(
        "census-misses-unread-batch-norms",
        "the census drops the batch norms the recogniser could not read (no entry, no reason)",
        (
            (
                "graphfold/fold/census.py",
                "    for key, nodes in batch_norm_layers(graph.graph_def.node).items():\n"
                "        if key in covered:",
                "    for key, nodes in {}.items():  # mutant\n        if key in covered:",
            ),
        ),
        ("tests/test_trust.py", "-k", "cannot_read"),
        cheap=True,
    ),
    Mutant(
        "census-misses-function-bodies",
        "the census drops the batch norms inside functions (tf.cond / while bodies, calls)",
        (
            (
                "graphfold/fold/census.py",
                "    for function in graph_def.library.function:\n"
                "        name = function.signature.name",
                "    for function in []:  # mutant\n        name = function.signature.name",
            ),
        ),
        ("tests/test_control_flow.py", "-k", "cond_with_batch_norm"),
        cheap=True,
    ),
    Mutant(
        "crash-copied-through",
        "a crash while rewriting copies the signature through, exit 0",
        (
            (
                "graphfold/serving/saved_model.py",
                "    except NotFreezable as exc:  # an expected reason",
                "    except Exception as exc:  # mutant",
            ),
        ),
        ("tests/test_trust.py", "-k", "crash"),
        cheap=True,
    ),
    Mutant(
        "tf-quirk-emitted",
        "a pattern TensorFlow miscomputes (Conv2D -> BiasAdd -> Add -> LeakyRelu) is emitted "
        "where the fold makes it",
        (
            (
                "graphfold/fold/tf_quirks.py",
                "QUIRKS = (LEAKY_RELU_FUSION,)\n",
                "QUIRKS = ()  # mutant\n",
            ),
        ),
        ("tests/test_tf_quirks.py", "-k", "cspnet"),
        cheap=True,
    ),
    Mutant(
        "rewrite-unchecked",
        "rewrite returns its result without checking it against the original",
        (
            (
                "graphfold/convert/rewrite.py",
                "    if verify:\n        self_check.check(",
                "    if False:  # mutant\n        self_check.check(",
            ),
        ),
        ("tests/test_self_check.py", "-k", "wrong_result"),
        cheap=True,
    ),
    Mutant(
        "inconclusive-reads-verified",
        "a noise floor too large to mean anything is reported as verified",
        (
            (
                "graphfold/convert/noise.py",
                "    if largest > INCONCLUSIVE_FLOOR:\n",
                "    if False:  # mutant\n",
            ),
        ),
        ("tests/test_serving.py", "-k", "inconclusive"),
    ),
    Mutant(
        "cast-round-trip-inexact",
        "a Cast round trip that rounds (float32 -> float16 -> float32) is removed too",
        (
            (
                "graphfold/fold/casts.py",
                "        if (narrow, wide) not in EXACT_WIDENINGS or _cast_types(outer) != (wide, "
                "narrow):",
                "        if _cast_types(outer) != (wide, narrow):  # mutant",
            ),
        ),
        ("tests/test_verification_realism.py", "-k", "only_exact"),
    ),
    Mutant(
        "unknown-dims-tiny",
        "unknown height and width are verified on 1 x 1 images",
        (("graphfold/convert/input_shapes.py", "IMAGE_SIZE = 224 ", "IMAGE_SIZE = 1 "),),
        ("tests/test_verification_realism.py", "-k", "224"),
    ),
    Mutant(
        "tolerance-ignores-precision",
        "the default tolerance is float32's whatever the model computes in",
        (
            (
                "graphfold/convert/tolerance.py",
                "tf.float16: 2e-2, tf.bfloat16: 6e-2}",
                "tf.float16: 1e-5, tf.bfloat16: 1e-5}  # mutant",
            ),
        ),
        ("tests/test_verification_realism.py", "-k", "mixed_float16_passes"),
    ),
    Mutant(
        "outside-ops-run-without-consent",
        "a signature holding a file write (or py_function, print) is run to verify it",
        (
            (
                "graphfold/convert/scan.py",
                "    return [f for f in findings if f.op not in allowed]\n",
                "    return []  # mutant\n",
            ),
        ),
        ("tests/test_scan.py", "-k", "runs_nothing_without_consent"),
        cheap=True,
    ),
    Mutant(
        "negative-scale-through-relu",
        "a scale <= 0 is carried through ReLU (relu(-x) is not -relu(x)): a partial fold "
        "that is wrong",
        (
            (
                "graphfold/fold/rules.py",
                "    if not demand.positive:\n        return Blocked(node.name, "
                'f"{what} needs every scale > 0',
                '    if False:\n        return Blocked(node.name, f"{what} needs every scale > 0',
            ),
        ),
        ("tests/test_partial.py", "-k", "negative_scale"),
        cheap=True,
    ),
)


def tree_files(root: str) -> list[str]:
    """The files of the working tree (tracked, and untracked but not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if os.path.isfile(os.path.join(root, line))]


def apply_edits(tree: str, mutant: Mutant) -> None:
    """Applies ``mutant``'s edits in ``tree``; ``ValueError`` when a text is not found once."""
    for path, old, new in mutant.edits:
        full = os.path.join(tree, path)
        with open(full, encoding="utf-8") as f:
            text = f.read()
        count = text.count(old)
        if count != 1:
            raise ValueError(
                f"mutant {mutant.name}: the text to replace is in {path} "
                f"{count} times, not once (update the mutant): {old!r}"
            )
        with open(full, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))


def run(mutant: Mutant, tests: tuple[str, ...] | None = None, root: str = ROOT) -> dict:
    """Applies ``mutant`` to a copy of ``root`` and runs its tests there: ``{"name", "caught",
    "by" (the first failing test), "seconds", "returncode"}``."""
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphfold-mutant-") as tree:
        for rel in tree_files(root):
            os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(tree, rel))
        apply_edits(tree, mutant)
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                *(tests or mutant.tests),
            ],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return {
        "name": mutant.name,
        "caught": proc.returncode == 1 and bool(failed),
        "by": failed[0] if failed else None,
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - clock,
        "output": proc.stdout[-3000:] if proc.returncode not in (0, 1) else "",
    }


def markdown(results: list[dict]) -> str:
    by_name = {m.name: m for m in MUTANTS}
    rows = ["| mutant | what it breaks | tests run | caught by | CI |", "|---|---|---|---|---|"]
    for r in results:
        m = by_name[r["name"]]
        caught = f"`{r['by']}`" if r["caught"] else "**SURVIVED**"
        rows.append(
            f"| `{m.name}` | {m.breaks} | `{' '.join(m.tests)}` | {caught} | "
            f"{'yes' if m.cheap else 'no'} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cheap", action="store_true", help="only the mutants CI runs")
    parser.add_argument("--only", action="append", metavar="NAME", help="this mutant (repeatable)")
    parser.add_argument("--tests", nargs="+", help="run these pytest arguments instead")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--markdown", action="store_true", help="print the results as a table")
    args = parser.parse_args(argv)
    chosen = [
        m for m in MUTANTS if (not args.cheap or m.cheap) and (not args.only or m.name in args.only)
    ]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {'cheap ' if m.cheap else ''}{m.breaks}")
        return 0
    results = []
    for mutant in chosen:
        result = run(mutant, tuple(args.tests) if args.tests else None)
        results.append(result)
        status = (
            f"caught by {result['by']}"
            if result["caught"]
            else f"SURVIVED (pytest exit {result['returncode']})"
        )
        print(f"{mutant.name:32} {status} ({result['seconds']:.0f}s)", flush=True)
        if result["output"]:
            print(result["output"])
    if args.markdown:
        print(markdown(results))
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
