"""Tiny models for the worker's tests, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.tiny_models import build_tiny_models, write_single_file_checkpoint


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `sd/` (diffusers folder) and `llm/` (Llama LM)."""
    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def tiny_sd(tiny_models: Path) -> Path:
    return tiny_models / "sd"


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as one original-format (SD-1) safetensors file."""
    out = tmp_path_factory.mktemp("single-file") / "tiny-sd1.safetensors"
    write_single_file_checkpoint(tiny_sd, out)
    return out
