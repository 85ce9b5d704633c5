"""Fixtures every test module may use."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """``src(name)``: the path of the shared SavedModel fixture ``name``
    (``savedmodel_fixtures.BUILDERS``), built on first use."""
    import savedmodel_fixtures as F

    return lambda name: F.get(name, tmp_path_factory)
