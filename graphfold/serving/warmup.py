"""TF Serving warm-up records: ``assets.extra/tf_serving_warmup_requests``.

The file is a TFRecord of ``tensorflow.serving.PredictionLog`` protos (at most 1,000 are read).
TF Serving replays each one against the model it loads: a ``predict_log`` calls the signature
``request.model_spec.signature_name`` (empty: ``serving_default``) with ``request.inputs``. The
protos come from ``tensorflow-serving-api`` (``pip install 'graphfold[serving]'``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from graphfold.errors import BadInput
from graphfold.options import MAX_WARMUP

PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = MAX_WARMUP  # TF Serving's limit on the records it replays
DEFAULT_SIGNATURE = "serving_default"


@dataclasses.dataclass
class Request:
    """One predict record: its index in the file, the signature it calls, its inputs."""

    index: int
    signature: str
    inputs: dict[str, np.ndarray]


def _bad(message: str):
    return BadInput(message)


def available() -> bool:
    try:
        import tensorflow_serving.apis.prediction_log_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def _protos():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise _bad(
            "warm-up records need tensorflow-serving-api: pip install 'graphfold[serving]'"
        ) from None
    return model_pb2, predict_pb2, prediction_log_pb2


def read_raw(path: str) -> list[bytes]:
    """The records of the TFRecord file ``path``; ``BadInput`` naming the first bad one."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
    except tf.errors.OpError as exc:
        raise _bad(
            f"{path}: record {len(records)} is not a valid TFRecord "
            f"({str(exc.message).splitlines()[0][:120]})"
        ) from None
    return records


def read(path: str) -> tuple[list[Request], dict[str, int]]:
    """The predict requests of the warm-up file ``path`` (its first ``MAX_RECORDS`` records),
    and a count of the other kinds of record (classify, regress, ...), which are kept but not
    replayed here. ``BadInput`` names the first record that is not a ``PredictionLog``."""
    from google.protobuf import message

    _, _, prediction_log_pb2 = _protos()
    requests: list[Request] = []
    others: dict[str, int] = {}
    for index, record in enumerate(read_raw(path)[:MAX_RECORDS]):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except (message.DecodeError, RuntimeWarning, ValueError) as exc:
            raise _bad(f"{path}: record {index} is not a PredictionLog ({exc})") from None
        kind = log.WhichOneof("log_type")
        if kind is None:
            raise _bad(f"{path}: record {index} is not a PredictionLog (it holds no request)")
        if kind != "predict_log":
            others[kind] = others.get(kind, 0) + 1
            continue
        request = log.predict_log.request
        try:
            inputs = {key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}
        except (TypeError, ValueError) as exc:
            raise _bad(
                f"{path}: record {index} holds an input tensor that cannot be read ({exc})"
            ) from None
        requests.append(
            Request(index, request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs)
        )
    return requests, others


def build(signature: str, inputs: dict[str, np.ndarray], model_name: str = "") -> bytes:
    """One serialized ``PredictionLog`` calling ``signature`` with ``inputs``."""
    _, predict_pb2, prediction_log_pb2 = _protos()
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    if model_name:
        request.model_spec.name = model_name
    for key, value in sorted(inputs.items()):
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString(deterministic=True)


def write(path: str, records: list[bytes]) -> None:
    """Writes ``records`` as the TFRecord file ``path`` (TFRecord framing is deterministic: an
    existing file's records written again come out as the same bytes)."""
    if len(records) > MAX_RECORDS:
        raise _bad(
            f"{path}: {len(records)} warm-up records; TF Serving reads at most {MAX_RECORDS}"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
