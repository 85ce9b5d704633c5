"""Models are programs: ops reaching outside the graph are found before anything runs, and run
only with the user's consent (issue 21).

Each model below folds (a fused batch norm after a convolution, random statistics) and holds one
op that touches the machine: a file written to a temporary path, a Python function that creates
a file, a ``tf.print`` to a ``file://`` path, a ``WriteFile`` in the branch of a ``tf.cond``
inside a nested function, a resource whose initializer writes a file (run by loading), and a
GraphDef with an op TensorFlow does not know. Every path of graphfold that executes a model
(``optimize``, ``verify``, ``optimize-repo``, the Python API, GraphDef files) must leave the
file absent, fold and write as usual, report NOT VERIFIED naming the op and where it sits, keep
the op in the written graph, refuse with ``--require-verification``, and run it with
``--allow-ops``.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.cli.command import main
from graphfold.errors import BadInput, VerificationFailed

SPEC = tf.TensorSpec([None, 6, 6, 2], tf.float32, name="x")
KINDS = ("write", "python", "print", "cond")
OP = {"write": "WriteFile", "python": "EagerPyFunc", "print": "PrintV2", "cond": "WriteFile"}
BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


class Net(tf.Module):
    """A convolution and a fused batch norm with random statistics and gamma signs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
        self.gamma = tf.Variable(
            (rng.uniform(0.5, 1.5, 4) * rng.choice([-1, 1], 4)).astype("float32")
        )
        self.beta = tf.Variable(rng.normal(0, 0.3, 4).astype("float32"))
        self.mean = tf.Variable(rng.normal(0, 0.3, 4).astype("float32"))
        self.var = tf.Variable(rng.uniform(0.5, 2.0, 4).astype("float32"))

    def features(self, x):
        y = tf.nn.conv2d(x, self.w, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(
            y, self.gamma, self.beta, self.mean, self.var, is_training=False
        )[0]


def _body(kind: str, net: Net, target: str):
    if kind == "write":

        def body(x):
            tf.io.write_file(target, tf.strings.as_string(tf.reduce_sum(x)))
            return net.features(x)
    elif kind == "python":

        def touch(t):
            open(target, "w").close()
            return t

        def body(x):
            y = tf.py_function(touch, [x], tf.float32)
            y.set_shape(x.shape)
            return net.features(y)
    elif kind == "print":

        def body(x):
            tf.print("sum", tf.reduce_sum(x), output_stream=f"file://{target}")
            return net.features(x)
    else:  # "cond": WriteFile in a branch of a tf.cond, inside a nested function

        @tf.function(autograph=False)
        def inner(x):
            def write():
                with tf.control_dependencies([tf.io.write_file(target, "cond")]):
                    return tf.identity(x)

            return tf.cond(tf.size(x) > 0, write, lambda: x)

        def body(x):
            return net.features(inner(x))

    return body


def build(path: str, kind: str, target: str) -> None:
    net = Net()
    net.serve = tf.function(_body(kind, net, target), input_signature=[SPEC], autograph=False)
    tf.saved_model.save(net, path, signatures={"serving_default": net.serve})


class WritingResource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer, which ``tf.saved_model.load`` runs, writes a file."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        tf.io.write_file(self.target, "loaded")
        tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)


def build_loading(path: str, target: str) -> None:
    net = Net()
    net.resource = WritingResource(target)
    net.serve = tf.function(net.features, input_signature=[SPEC], autograph=False)
    tf.saved_model.save(net, path, signatures={"serving_default": net.serve})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (SavedModel path, the file its op creates when it runs)."""
    base = tmp_path_factory.mktemp("scan_models")
    made = {}
    for kind in KINDS + ("loading",):
        path, target = str(base / kind), str(base / f"{kind}.touched")
        (build_loading(path, target) if kind == "loading" else build(path, kind, target))
        assert not os.path.exists(target), "saving ran the op"
        made[kind] = (path, target)
    return made


@pytest.fixture
def model(models, request):
    """``(src, target)`` of one kind, the target absent before and removed after."""
    src, target = models[request.param]
    assert not os.path.exists(target)
    yield src, target
    if os.path.exists(target):
        os.remove(target)


def ops_of(path: str) -> set[str]:
    """Every op of a written SavedModel: its graph and its function library."""
    from graphfold.serving.saved_model import read_saved_model

    graph_def = read_saved_model(path).meta_graphs[0].graph_def
    return {n.op for n in graph_def.node} | {
        n.op for f in graph_def.library.function for n in f.node_def
    }


def assert_folded_keeping(path: str, op: str) -> None:
    ops = ops_of(path)
    assert op in ops, f"the written model lost {op}"
    assert not ops & set(BATCH_NORM_OPS), "the batch norm was not folded"


def assert_held(check: dict | object, op: str) -> None:
    status = check["status"] if isinstance(check, dict) else check.status
    reason = check["reason"] if isinstance(check, dict) else check.reason
    assert status == "skipped", reason
    assert "not run" in reason and f"{op} (" in reason
    # the consent, in the caller's words: the flag on the command line, the keyword from Python
    assert re.search(f"allow them with (--allow-ops |allow_ops='){op}", reason), reason


# ---- the Python API ------------------------------------------------------------------------


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_api_folds_writes_and_runs_nothing_without_consent(model, tmp_path, request):
    (src, target), kind = model, request.node.callspec.params["model"]
    dst = str(tmp_path / "out")
    result = graphfold.optimize_saved_model(src, dst)
    assert not os.path.exists(target), f"optimize_saved_model ran {OP[kind]}"
    assert result.written and not result.verified
    assert result.not_verified == ["serving_default"]
    assert_held(result.verification["serving_default"], OP[kind])
    assert result["serving_default"].folded
    assert_folded_keeping(dst, OP[kind])
    found = result.to_dict()["outside_ops"]["signatures"]["serving_default"]
    assert [f["op"] for f in found] == [OP[kind]] and found[0]["function"]

    check = graphfold.verify_saved_models(src, dst).verification["serving_default"]
    assert not os.path.exists(target), "verify_saved_models ran it"
    assert_held(check, OP[kind])

    with pytest.raises(VerificationFailed, match="NOT VERIFIED"):
        graphfold.optimize_saved_model(src, str(tmp_path / "required"), require_verification=True)
    assert not os.path.exists(tmp_path / "required") and not os.path.exists(target)


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_api_allow_ops_runs_them(model, tmp_path, request):
    """Consent: the op runs (the file appears) and the signature is verified. (The Python
    function of ``tf.py_function`` lives in this process, which built the model.)"""
    (src, target), kind = model, request.node.callspec.params["model"]
    dst = str(tmp_path / "out")
    result = graphfold.optimize_saved_model(src, dst, allow_ops=(OP[kind],))
    assert os.path.exists(target), "allowed, yet not run"
    assert result.verified and result.verification["serving_default"].status == "ok"
    assert_folded_keeping(dst, OP[kind])
    os.remove(target)
    check = graphfold.verify_saved_models(src, dst, allow_ops=OP[kind]).verification[
        "serving_default"
    ]
    assert check.status == "ok", check.reason
    assert os.path.exists(target)


def test_nested_cond_branch_is_found_with_its_function(models):
    from graphfold.convert.scan import scan_meta_graph
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model

    src, _ = models["cond"]
    meta = meta_graph_for(read_saved_model(src), src, ("serve",))
    [finding] = scan_meta_graph(meta, ["serving_default"]).signatures["serving_default"]
    assert finding.op == "WriteFile" and finding.node == "cond/WriteFile"
    assert finding.function.startswith("cond_true"), finding  # the If's then_branch
    assert finding.category == "file"


def test_every_attr_that_names_a_function_is_walked():
    """``tf.switch_case`` (a Case: a list of branch functions) and ``tf.while_loop`` (While:
    cond and body), called from a nested function: each op found in the function holding it,
    once, however many times it is reached."""
    from graphfold.convert.scan import scan_graph_def

    @tf.function(autograph=False)
    def nested(x, i):
        def write():
            with tf.control_dependencies([tf.io.write_file("/nonexistent/never", "x")]):
                return tf.identity(x)

        def printed(j, y):
            with tf.control_dependencies([tf.print(j)]):
                return j + 1, tf.identity(y)

        y = tf.switch_case(i, [lambda: x, write])
        return tf.while_loop(lambda j, y: j < 2, printed, [0, y])[1]

    fn = tf.function(
        lambda x, i: nested(x, i) + nested(x, i), autograph=False
    ).get_concrete_function(tf.TensorSpec([2], tf.float32), tf.TensorSpec([], tf.int32))
    graph_def = fn.graph.as_graph_def()
    found = {f.op: f for f in scan_graph_def(graph_def, [t.name for t in fn.outputs])}
    assert sorted(found) == ["PrintV2", "WriteFile"], found
    library = {f.signature.name: f for f in graph_def.library.function}
    for finding in found.values():
        assert finding.node in {n.name for n in library[finding.function].node_def}
    assert scan_graph_def(graph_def, [fn.inputs[0].name]) == []  # an input runs nothing


def test_an_unregistered_op_in_a_saved_model_is_named_before_loading(models, tmp_path):
    """TensorFlow cannot load a SavedModel holding an op it does not know: graphfold says
    which op, and where, without trying."""
    from graphfold.serving.saved_model import read_saved_model

    path = str(tmp_path / "custom")
    shutil.copytree(models["write"][0], path)
    proto = read_saved_model(path)
    for function in proto.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "WriteFile":
                node.op = "GraphfoldNoSuchOp"
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(proto.SerializeToString())
    with pytest.raises(
        BadInput,
        match="GraphfoldNoSuchOp .*at node 'WriteFile' in function "
        "'__inference_.*nothing was loaded",
    ):
        graphfold.optimize_saved_model(path, str(tmp_path / "out"), allow_ops="WriteFile")


def test_the_function_tf_loads_for_a_signature_is_scanned_too(tmp_path):
    """``tf.saved_model.load`` runs the function the object graph binds to a signature, not
    the graph its SignatureDef names: a model crafted so that the two differ (the SignatureDef
    pointing at a clean call) is still held back."""
    from graphfold.convert.scan import scan_meta_graph
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model

    target, path = str(tmp_path / "crafted.touched"), str(tmp_path / "crafted")
    net = Net()
    net.serve = tf.function(_body("write", net, target), input_signature=[SPEC], autograph=False)
    net.clean = tf.function(net.features, input_signature=[SPEC], autograph=False)
    tf.saved_model.save(net, path, signatures={"serving_default": net.serve, "clean": net.clean})
    proto = read_saved_model(path)
    signatures = proto.meta_graphs[0].signature_def
    [(name, info)] = signatures["serving_default"].outputs.items()
    info.name = next(iter(signatures["clean"].outputs.values())).name
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(proto.SerializeToString())
    meta = meta_graph_for(read_saved_model(path), path, ("serve",))
    scan = scan_meta_graph(meta, ["serving_default", "clean"])
    assert [f.op for f in scan.signatures["serving_default"]] == ["WriteFile"]
    assert scan.signatures["clean"] == []
    result = graphfold.optimize_saved_model(path, str(tmp_path / "out"))
    assert not os.path.exists(target)
    assert result.not_verified == ["serving_default"]
    assert result.verification["clean"].status == "ok"


def test_own_assets_and_checkpoints_are_not_held_back(src):
    """A table filled from the SavedModel's own asset and a TF1 restore from its own
    variables/ read the model's own files: loading them is not held back, while the ops are
    there (InitializeTableFromTextFileV2, RestoreV2)."""
    from graphfold.convert.scan import scan_meta_graph
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model, signature_keys

    for name, tags, op in (
        ("table", ("serve",), "InitializeTableFromTextFileV2"),
        ("tf1", ("serve", "gpu"), "RestoreV2"),
    ):
        path = src(name)
        meta = meta_graph_for(read_saved_model(path), path, tags)
        assert op in ops_of(path)
        scan = scan_meta_graph(meta, signature_keys(meta))
        assert scan.loading == [] and not any(scan.signatures.values()), scan


def _repository(src: str, tmp_path) -> str:
    base = tmp_path / "repo"
    shutil.copytree(src, base / "model" / "1")
    return str(base)


def test_an_asset_named_outside_the_saved_model_is_not_its_own(src, tmp_path):
    """TensorFlow's loader joins an asset's file name to assets/ as it is: a table filled from
    "../../etc/passwd" or an absolute path reads any file, and is held back."""
    from graphfold.convert.scan import scan_meta_graph
    from graphfold.serving.saved_model import meta_graph_for, read_saved_model, signature_keys

    path = str(tmp_path / "table")
    shutil.copytree(src("table"), path)
    proto = read_saved_model(path)
    for name in ("../../../../etc/hostname", "/etc/hostname"):
        proto.meta_graphs[0].asset_file_def[0].filename = name
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(proto.SerializeToString())
        meta = meta_graph_for(read_saved_model(path), path, ("serve",))
        [finding] = scan_meta_graph(meta, signature_keys(meta)).loading
        assert finding.op == "InitializeTableFromTextFileV2", finding
        with pytest.raises(BadInput, match="InitializeTableFromTextFileV2"):
            graphfold.optimize_saved_model(path, str(tmp_path / "out"))


@pytest.mark.parametrize("model", ["loading"], indirect=True)
def test_what_loading_runs_is_held_back_too(model, tmp_path, capsys):
    """``tf.saved_model.load`` runs every resource's initializer: a model whose initializer
    writes a file is not loaded, by inspect, optimize, verify or optimize-repo, without
    consent; with it, it is."""
    src, target = model
    for argv in (
        ["inspect", src],
        ["optimize", src, str(tmp_path / "out")],
        ["verify", src, src],
        ["optimize-repo", _repository(src, tmp_path), str(tmp_path / "served"), "--jobs", "1"],
    ):
        code = main(argv)
        out, err = capsys.readouterr()
        assert not os.path.exists(target), f"{argv[0]} loaded it"
        assert code == (1 if argv[0] == "optimize-repo" else 2), err
        assert "loading it would run" in err and "_initializer" in err
        assert re.search("allow them with (--allow-ops |allow_ops=')WriteFile", err), err
    assert not os.path.exists(tmp_path / "out")
    assert main(["inspect", src, "--allow-ops", "WriteFile"]) == 0
    assert os.path.exists(target)


def test_require_runnable_gates_the_demo_timing(models, src):
    from graphfold.cli.demo import require_runnable

    require_runnable(src("two_signatures"), ["predict", "single"])
    with pytest.raises(BadInput, match="WriteFile"):
        require_runnable(models["write"][0], ["serving_default"])
    require_runnable(models["write"][0], ["serving_default"], allow_ops="WriteFile")


def test_allow_ops_names_must_be_held_back_ops(models, tmp_path, capsys):
    from graphfold.options import Options
    from graphfold.outside import OUTSIDE

    assert Options(allow_ops=" WriteFile,PrintV2 ").allow_ops == ("PrintV2", "WriteFile")
    assert Options(allow_ops=["WriteFile"]) == Options(allow_ops="WriteFile")
    for wrong in ("Conv2D", "WriteFIle"):
        with pytest.raises(BadInput, match=f"allow_ops='{wrong}': not an op graphfold holds"):
            Options(allow_ops=wrong)
        assert (
            main(["optimize", models["write"][0], str(tmp_path / "o"), "--allow-ops", wrong]) == 2
        )
        assert f"--allow-ops {wrong}: not an op" in capsys.readouterr().err
    from tensorflow.python.framework import op_def_registry

    missing = [op for op in OUTSIDE if op_def_registry.get(op) is None]
    assert not missing, f"not TensorFlow ops (a typo?): {missing}"


def test_folding_evaluates_none_of_them():
    """Folding evaluates constant subgraphs through an allowlist of pure math only."""
    from graphfold.fold.constants import EVALUATORS
    from graphfold.outside import OUTSIDE

    assert not set(EVALUATORS) & set(OUTSIDE)


# ---- the command ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_cli_optimize(model, tmp_path, capsys, request):
    (src, target), op = model, OP[request.node.callspec.params["model"]]
    dst = str(tmp_path / "out")
    code = main(["optimize", src, dst, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and not os.path.exists(target)
    assert document["not_verified"] == ["serving_default"]
    assert_held(document["signatures"]["serving_default"]["verification"], op)
    assert_folded_keeping(dst, op)

    code = main(["optimize", src, str(tmp_path / "required"), "--require-verification"])
    out, err = capsys.readouterr()
    assert code == 1 and "NOT VERIFIED" in err and op in err
    assert not os.path.exists(tmp_path / "required") and not os.path.exists(target)

    code = main(["optimize", src, str(tmp_path / "allowed"), "--allow-ops", op])
    out, err = capsys.readouterr()
    assert code == 0 and os.path.exists(target), err
    assert out.rstrip().splitlines()[-1].split("; ")[-2] == "verified"


@pytest.mark.parametrize("model", KINDS, indirect=True)
def test_cli_verify(model, tmp_path, capsys, request):
    (src, target), op = model, OP[request.node.callspec.params["model"]]
    dst = str(tmp_path / "out")
    assert main(["optimize", src, dst, "--no-verify", "-q"]) == 0
    assert not os.path.exists(target)
    code = main(["verify", src, dst, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and not os.path.exists(target)
    assert_held(document["signatures"]["serving_default"]["verification"], op)
    assert main(["verify", src, dst, "--require-verification", "-q"]) == 1
    assert not os.path.exists(target)
    assert main(["verify", src, dst, "--allow-ops", op, "-q"]) == 0
    assert os.path.exists(target)


def test_cli_optimize_repo(models, tmp_path, capsys):
    """A repository holding one model of each kind (one run over all four: worker processes
    start slowly here)."""
    targets = [models[kind][1] for kind in KINDS]
    repo = tmp_path / "repo"
    for kind in KINDS:
        shutil.copytree(models[kind][0], repo / kind / "1")

    def run(dst: str, *extra: str) -> tuple[int, dict]:
        code = main(
            ["optimize-repo", str(repo), str(tmp_path / dst), "--json", "--jobs", "2", *extra]
        )
        versions = json.loads(capsys.readouterr().out)["versions"]
        return code, {v["model"]: v for v in versions}

    try:
        code, versions = run("held")
        assert code == 0 and not any(map(os.path.exists, targets))
        for kind in KINDS:
            assert versions[kind]["status"] == "ok" and versions[kind]["verified"] is False
            assert_held(
                versions[kind]["report"]["signatures"]["serving_default"]["verification"], OP[kind]
            )
            assert_folded_keeping(str(tmp_path / "held" / kind / "1"), OP[kind])

        code, versions = run("required", "--require-verification")
        assert code == 1 and not any(map(os.path.exists, targets))
        for kind in KINDS:
            assert versions[kind]["status"] == "failed" and OP[kind] in versions[kind]["error"]
            assert not os.path.exists(tmp_path / "required" / kind / "1")

        code, versions = run("allowed", "--allow-ops", ",".join(sorted(set(OP.values()))))
        assert code == 0
        for kind in ("write", "print", "cond"):
            assert versions[kind]["verified"] is True and os.path.exists(models[kind][1])
        # run, in a worker process that does not hold the model's Python function
        check = versions["python"]["report"]["signatures"]["serving_default"]["verification"]
        assert "the original fails" in check["reason"] and "EagerPyFunc" in check["reason"]
    finally:
        for target in filter(os.path.exists, targets):
            os.remove(target)


@pytest.mark.parametrize("model", ["cond"], indirect=True)
def test_cli_inspect_lists_them_per_signature(model, capsys):
    src, target = model
    assert main(["inspect", src]) == 0
    out = capsys.readouterr().out
    assert "ops reaching outside the graph" in out
    row = next(line for line in out.splitlines() if "WriteFile" in line).split()
    assert row[:4] == ["serving_default", "WriteFile", "file", "cond/WriteFile"]
    assert row[4].startswith("cond_true")
    assert main(["inspect", src, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    [finding] = document["outside_ops"]["signatures"]["serving_default"]
    assert (finding["op"], finding["node"]) == ("WriteFile", "cond/WriteFile")
    assert document["outside_ops"]["loading"] == []
    assert not os.path.exists(target)


def test_cli_inspect_of_a_clean_model_says_none(src, capsys):
    assert main(["inspect", src("two_signatures")]) == 0
    assert (
        "ops reaching outside the graph (file, network, Python, print, unregistered): "
        "none in 2 signature(s)" in capsys.readouterr().out
    )


# ---- GraphDef files ------------------------------------------------------------------------


def _frozen(body, path: str, extra=None) -> None:
    from graphfold.convert.freeze import freeze

    fn = tf.function(body, input_signature=[SPEC], autograph=False).get_concrete_function()
    frozen = freeze(fn)
    if extra is not None:
        extra(frozen.graph_def, frozen.outputs[0])
    with open(path, "wb") as f:
        f.write(frozen.graph_def.SerializeToString())


def test_graph_def_file_with_an_unregistered_op(tmp_path, capsys):
    """An op TensorFlow does not know (a custom kernel) cannot run: folded and written, NOT
    VERIFIED; --require-verification: exit 1, nothing written; it cannot be allowed."""

    def custom(graph_def, output):
        node = graph_def.node.add()
        node.name, node.op = "custom", "GraphfoldNoSuchOp"
        node.input.append(output)
        node.attr["T"].type = tf.float32.as_datatype_enum

    net = Net()
    src, dst = str(tmp_path / "custom.pb"), str(tmp_path / "out.pb")
    _frozen(net.features, src, custom)
    code = main(["optimize", src, dst, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and os.path.exists(dst)
    check = document["signatures"]["graph"]["verification"]
    assert check["status"] == "skipped" and "GraphfoldNoSuchOp" in check["reason"]
    assert "unregistered op cannot run" in check["reason"]
    assert document["signatures"]["graph"]["report"]["summary"]["folded"] == 1
    assert main(["optimize", src, str(tmp_path / "req.pb"), "--require-verification"]) == 1
    assert not os.path.exists(tmp_path / "req.pb")
    assert main(["optimize", src, str(tmp_path / "a.pb"), "--allow-ops", "GraphfoldNoSuchOp"]) == 2
    assert main(["inspect", src, "--allow-ops", "WriteFile"]) == 2  # nothing runs there
    assert "--allow-ops: not supported for inspecting a GraphDef file" in capsys.readouterr().err
    assert main(["inspect", src, "--json"]) == 0
    [finding] = json.loads(capsys.readouterr().out)["outside_ops"]["signatures"]["graph"]
    assert (finding["op"], finding["node"], finding["category"]) == (
        "GraphfoldNoSuchOp",
        "custom",
        "unregistered",
    )


def test_graph_def_file_with_a_file_write(tmp_path, capsys):
    target = str(tmp_path / "graph.touched")
    net = Net()
    src, dst = str(tmp_path / "write.pb"), str(tmp_path / "out.pb")
    _frozen(_body("write", net, target), src)
    assert main(["optimize", src, dst]) == 0
    assert not os.path.exists(target) and os.path.exists(dst)
    assert "NOT VERIFIED" in capsys.readouterr().out
    from tensorflow.core.framework import graph_pb2

    written = graph_pb2.GraphDef.FromString(open(dst, "rb").read())
    ops = {n.op for n in written.node}
    assert "WriteFile" in ops and not ops & set(BATCH_NORM_OPS)
    assert main(["optimize", src, str(tmp_path / "req.pb"), "--require-verification"]) == 1
    assert not os.path.exists(tmp_path / "req.pb") and not os.path.exists(target)
    assert main(["optimize", src, str(tmp_path / "ok.pb"), "--allow-ops", "WriteFile"]) == 0
    assert os.path.exists(target)


# ---- graphfold.rewrite's own check ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_checks_itself_without_running_them(kind, tmp_path):
    """``rewrite`` folds a function holding such an op but its own check does not run it (NOT
    VERIFIED, naming it); ``allow_ops`` consents, and then the check runs and passes."""
    target = str(tmp_path / "touched")
    net = Net()
    fn = tf.function(_body(kind, net, target), input_signature=[SPEC], autograph=False)
    folded = graphfold.rewrite(fn)
    assert not os.path.exists(target), f"rewrite's check ran {OP[kind]}"
    assert_held(folded.report.verification, OP[kind])
    assert folded.report.folded, "the batch norm was not folded"

    allowed = graphfold.rewrite(fn, allow_ops=[OP[kind]])
    assert allowed.report.verification.status == "ok"
    assert os.path.exists(target), "with consent, the check runs the function"
