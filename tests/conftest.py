"""Shared test fixtures: paths to the real files in ../shared/fixtures (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep TensorFlow quiet and on the CPU in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


def _fixture(relative: str) -> Path:
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real fixture {relative} is absent ({FIXTURES})")
    return path


@pytest.fixture
def monaco_mbtiles() -> Path:
    """Real 2015 OSM QA tiles for Monaco (closed ways as LineStrings, extent 4096)."""
    return _fixture("osm-qa-monaco/monaco.mbtiles")


@pytest.fixture
def portugal_dir() -> Path:
    """Real QA-style z17 tiles, features and 8 satellite JPEGs around Praia da Aguda."""
    return _fixture("portugal-z17")


@pytest.fixture
def classes_file() -> Path:
    return ROOT / "classes" / "mine.json"


@pytest.fixture
def server():
    """Start loopback servers answering from {path: (status, bytes)}; all closed afterwards."""
    from osm_fakes import RouteServer

    servers = []

    def start(routes):
        servers.append(RouteServer(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def file_server():
    """Start loopback servers serving one file as S3 does (osm_fakes.FileServer)."""
    from osm_fakes import FileServer

    servers = []

    def start(data):
        servers.append(FileServer(data))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
