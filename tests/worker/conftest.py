"""Tiny model paths for the worker's tests (`tiny_models` comes from tests/conftest.py:
prebuilt by scripts/test, else built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.models.tiny_models import write_single_file_checkpoint
from worker.models.tiny_single_file import build_tiny_sdxl_wide, write_sdxl_single_file


@pytest.fixture(scope="session")
def tiny_sd(tiny_models: Path) -> Path:
    return tiny_models / "sd"


@pytest.fixture(scope="session")
def tiny_sd_inpaint(tiny_models: Path) -> Path:
    """The tiny pipeline as an inpainting checkpoint (9-channel UNet)."""
    return tiny_models / "sd-inpaint"


@pytest.fixture(scope="session")
def tiny_sd2(tiny_models: Path) -> Path:
    """An SD 2 (768-v) shaped pipeline: OpenCLIP-style text encoder, v-prediction."""
    return tiny_models / "sd2"


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models: Path) -> Path:
    """An SDXL pipeline: two text encoders, pooled text and size conditioning."""
    return tiny_models / "sdxl"


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tiny_models: Path) -> Path:
    """An SDXL refiner: the second text encoder alone, an aesthetic score."""
    return tiny_models / "sdxl-refiner"


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as one original-format (SD-1) safetensors file."""
    out = tmp_path_factory.mktemp("single-file") / "tiny-sd1.safetensors"
    write_single_file_checkpoint(tiny_sd, out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_wide(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL with a second text encoder wider than the first, as SDXL's: diffusers'
    single-file loader tells the two apart by width (worker.models.tiny_single_file)."""
    out = tmp_path_factory.mktemp("sdxl-wide") / "sdxl-wide"
    build_tiny_sdxl_wide(tiny_sdxl, out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_sdxl_wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sdxl_wide` as one original-layout (Stability "sgm") safetensors file."""
    out = tmp_path_factory.mktemp("single-file") / "tiny-sdxl.safetensors"
    write_sdxl_single_file(tiny_sdxl_wide, out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_single_file(
    tiny_sdxl_refiner: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny SDXL refiner as one original-layout safetensors file."""
    out = tmp_path_factory.mktemp("single-file") / "tiny-sdxl-refiner.safetensors"
    write_sdxl_single_file(tiny_sdxl_refiner, out)
    return out
