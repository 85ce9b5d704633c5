"""The ops that reach outside the graph, in one place, each with its category and reason.

graphfold runs none of them without the user's consent (``allow_ops``, ``--allow-ops``): a
signature holding one is folded and written but not run, a model whose loading would run one is
not loaded (``graphfold.convert.scan`` finds them). TensorFlow's own ``saved_model_cli scan``
looks for
three (``WriteFile``, ``ReadFile``, ``PrintV2``); this list adds the other file, dataset,
checkpoint and summary ops, the network and Python ops, and printing. An op that the running
TensorFlow does not register (a custom kernel) is held back too, in category "unregistered".

Categories: "file" reads, writes, lists or maps files at a path the graph computes (local, or
remote through gs://, s3://, hdfs:// file systems); "network" talks to other processes or
machines; "python" runs Python code in the process that executes it; "print" prints to
stderr/stdout, or (PrintV2) appends to any file:// path; "unregistered": what it does is unknown,
and it cannot run here.
"""

from __future__ import annotations


def _ops(category: str, reason: str, *names: str) -> dict[str, tuple[str, str]]:
    return {name: (category, reason) for name in names}


# op -> (category, reason): what graphfold will not run without the user's consent.
OUTSIDE: dict[str, tuple[str, str]] = {
    **_ops("file", "reads a file", "ReadFile"),
    **_ops("file", "writes a file", "WriteFile"),
    **_ops("file", "lists the files matching a pattern", "MatchingFiles"),
    **_ops("file", "memory-maps a file as a tensor", "ImmutableConst"),
    **_ops("file", "writes a checkpoint", "Save", "SaveV2", "SaveSlices"),
    **_ops(
        "file",
        "reads a checkpoint",
        "Restore",
        "RestoreV2",
        "RestoreSlice",
        "DTensorRestoreV2",
        "LoadAndRemapMatrix",
    ),
    **_ops("file", "merges checkpoint files and deletes the merged ones", "MergeV2Checkpoints"),
    **_ops("file", "reads vocabulary files", "GenerateVocabRemapping"),
    **_ops(
        "file",
        "fills a lookup table from a text file",
        "InitializeTableFromTextFile",
        "InitializeTableFromTextFileV2",
    ),
    **_ops(
        "file",
        "reads records from files: a dataset reader",
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "TextLineDataset",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "CSVDataset",
        "CSVDatasetV2",
        "ExperimentalCSVDataset",
        "SqlDataset",
        "ExperimentalSqlDataset",
        "LMDBDataset",
        "ExperimentalLMDBDataset",
        "MatchingFilesDataset",
        "ExperimentalMatchingFilesDataset",
        "LoadDataset",
        "SnapshotDatasetReader",
        "SnapshotNestedDatasetReader",
        "SnapshotChunkDataset",
        "ListSnapshotChunksDataset",
    ),
    **_ops(
        "file",
        "writes a dataset to files",
        "SaveDataset",
        "SaveDatasetV2",
        "SnapshotDataset",
        "SnapshotDatasetV2",
        "CacheDataset",
        "CacheDatasetV2",
    ),
    **_ops(
        "file",
        "reads records from files: a queue-based reader",
        "TFRecordReader",
        "TFRecordReaderV2",
        "TextLineReader",
        "TextLineReaderV2",
        "WholeFileReader",
        "WholeFileReaderV2",
        "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2",
        "LMDBReader",
    ),
    **_ops(
        "file",
        "writes TensorBoard summaries to event files",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "WriteSummary",
        "WriteRawProtoSummary",
        "WriteScalarSummary",
        "WriteHistogramSummary",
        "WriteImageSummary",
        "WriteAudioSummary",
        "WriteGraphSummary",
        "ImportEvent",
        "FlushSummaryWriter",
        "CloseSummaryWriter",
        "StatsAggregatorSetSummaryWriter",
    ),
    **_ops("file", "writes calibration statistics to a file", "CalibrationStatisticsSaver"),
    **_ops(
        "file",
        "configures a file system, its credentials or endpoints, for the whole process",
        "FileSystemSetConfiguration",
    ),
    **_ops(
        "network",
        "talks to a tf.data service",
        "DataServiceDataset",
        "DataServiceDatasetV2",
        "DataServiceDatasetV3",
        "DataServiceDatasetV4",
        "RegisterDataset",
        "RegisterDatasetV2",
        "DistributedSave",
    ),
    **_ops(
        "network",
        "makes or serves remote procedure calls",
        "RpcClient",
        "RpcCall",
        "RpcServer",
        "RpcServerRegister",
        "RpcServerStart",
    ),
    **_ops(
        "network",
        "sends tensors to debug URLs: grpc://, or file:// dumps",
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugIdentityV3",
        "DebugNanCount",
        "DebugNumericSummary",
    ),
    **_ops(
        "network",
        "exchanges tensors with other devices or workers, and may wait for them forever",
        "CollectiveReduce",
        "CollectiveReduceV2",
        "CollectiveReduceV3",
        "CollectiveGather",
        "CollectiveGatherV2",
        "CollectiveBcastSend",
        "CollectiveBcastSendV2",
        "CollectiveBcastRecv",
        "CollectiveBcastRecvV2",
        "CollectivePermute",
        "CollectiveAllToAllV2",
        "CollectiveAllToAllV3",
        "CollectiveReduceScatterV2",
        "CollectiveInitializeCommunicator",
        "CollectiveAssignGroupV2",
    ),
    **_ops(
        "python",
        "calls a Python function: tf.py_function, tf.numpy_function",
        "PyFunc",
        "PyFuncStateless",
        "EagerPyFunc",
    ),
    **_ops("print", "prints: tf.print, to stderr or to any file:// path", "PrintV2"),
    **_ops("print", "prints to stderr: tf.compat.v1.Print", "Print"),
}
UNREGISTERED_REASON = "not registered in this TensorFlow: a custom kernel"
