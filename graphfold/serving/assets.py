"""Everything in a SavedModel that graphfold does not rewrite reaches DST byte for byte.

graphfold rewrites only the graph (``saved_model.pb``, or ``.pbtxt`` / chunked ``.cpb``), the
weights (``variables/``) and ``fingerprint.pb``, which hashes those two. Every other file or folder
of SRC (``assets/``, ``assets.extra/`` with TF Serving's warm-up requests, anything a pipeline
put there) is copied into DST unchanged, overwriting what ``tf.saved_model.save`` wrote under the
same name (``assets/`` files it copies are the same bytes).

One file is left out, with a note: tf-keras' ``keras_metadata.pb`` describes the Keras layers of
SRC's object graph, which DST does not have; ``tf_keras.models.load_model`` fails on DST with it
(IndexError) and loads DST without it. No server reads it.
"""

from __future__ import annotations

import os
import shutil

REWRITTEN = (
    "saved_model.pb",
    "saved_model.pbtxt",
    "saved_model.cpb",
    "variables",
    "fingerprint.pb",
)
DESCRIBES_SRC_GRAPH = {
    "keras_metadata.pb": "it describes the Keras layers of SRC's object graph, which DST does "
    "not have (tf_keras.models.load_model would fail on DST with it)",
}


def untouched_paths(src: str) -> list[str]:
    """Paths (relative to ``src``) of the files and empty folders graphfold copies as they are."""
    paths = []
    for directory, dirs, files in os.walk(src):
        rel = os.path.relpath(directory, src)
        if rel == ".":
            dirs[:] = sorted(d for d in dirs if d not in REWRITTEN)
            files = [f for f in files if f not in REWRITTEN and f not in DESCRIBES_SRC_GRAPH]
        else:
            dirs.sort()
            if not dirs and not files:
                paths.append(rel)
        paths.extend(os.path.normpath(os.path.join(rel, f)) for f in sorted(files))
        # os.walk does not enter a symbolic link to a folder: it is copied whole, as a folder
        paths.extend(
            os.path.normpath(os.path.join(rel, d))
            for d in dirs
            if os.path.islink(os.path.join(directory, d))
        )
    return paths


def left_out(src: str) -> dict[str, str]:
    """Top-level files of ``src`` that are not copied (``DESCRIBES_SRC_GRAPH``) -> why."""
    return {
        name: why
        for name, why in DESCRIBES_SRC_GRAPH.items()
        if os.path.isfile(os.path.join(src, name))
    }


def copy_untouched(src: str, dst: str) -> list[str]:
    """Copies every untouched path of ``src`` into ``dst`` (contents and mode bits); returns the
    copied paths. A symbolic link is copied as the file or folder it points to."""
    copied = []
    for rel in untouched_paths(src):
        source, target = os.path.join(src, rel), os.path.join(dst, rel)
        if os.path.islink(source) and os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            shutil.copy2(source, target)
        copied.append(rel)
    return copied
