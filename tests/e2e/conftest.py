"""Fixtures shared by the end-to-end tests of this package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_image_network import Network


@pytest.fixture
def image_network(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    """A coordinator with room for slow jobs (a 30 s lease); workers are started by the test."""
    net = Network(tmp_path, tiny_models, lease_timeout=30)
    try:
        yield net
    finally:
        net.close()
