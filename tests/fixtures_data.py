"""Dataset fixtures shared by tests: a tiny digits-det set generated once per session.

Register ``pytest_plugins = ["fixtures_data"]`` in ``tests/conftest.py`` to get the ``tiny_digits_yaml`` fixture,
or call :func:`make_tiny_digits` from a module's own fixture.
"""
from __future__ import annotations

import pytest

TINY_DIGITS = {"n_train": 8, "n_val": 6, "n_calib": 4, "seed": 0}


def make_tiny_digits(tmp_path_factory):
    """Generate a tiny digits-det set (8 train / 6 val / 4 calib images) and return its data.yaml path."""
    from trt_qat.data.digits_det import generate_digits_det

    return generate_digits_det(tmp_path_factory.mktemp("digits") / "digits-det", **TINY_DIGITS)


@pytest.fixture(scope="session")
def tiny_digits_yaml(tmp_path_factory):
    """Path of the data.yaml of a tiny digits-det set (see :data:`TINY_DIGITS`). Treat it as read-only."""
    return make_tiny_digits(tmp_path_factory)
