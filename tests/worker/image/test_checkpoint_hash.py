"""The checkpoint hash a worker reports: `sha256sum` of a single file, the documented shell
pipeline's hash of a diffusers folder, and a cache that spares a restart the reading."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.image.checkpoint_hash import checkpoint_sha256, model_sha256


def _folder(root: Path) -> Path:
    """A diffusers-shaped folder: weights at two depths, a config, a hidden cache folder."""
    for name, data in (
        ("unet/diffusion_pytorch_model.safetensors", b"unet" * 1000),
        ("vae/diffusion_pytorch_model.safetensors", b"vae"),
        ("text_encoder/model.safetensors", b"text"),
        ("model.safetensors", b"top"),
        ("unet/config.json", b"{}"),
        (".cache/huggingface/x.safetensors", b"download state"),
    ):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_a_single_file_hashes_as_sha256sum(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * 2**20 + 5))  # over the read chunk
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_a_folder_hashes_as_the_documented_pipeline(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "model")
    pipeline = (
        "find . -name '*.safetensors' -not -path '*/.*' | sed 's|^\\./||' | LC_ALL=C sort "
        "| xargs sha256sum | sha256sum"
    )
    shell = subprocess.run(
        ["sh", "-c", pipeline], cwd=folder, capture_output=True, text=True, check=True
    )
    assert checkpoint_sha256(folder) == shell.stdout.split()[0]
    # configs and hidden folders do not count; every weight does
    (folder / "unet" / "config.json").write_bytes(b'{"x": 1}')
    (folder / ".cache" / "huggingface" / "x.safetensors").write_bytes(b"other")
    before = checkpoint_sha256(folder)
    assert before == shell.stdout.split()[0]
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"VAE")
    assert checkpoint_sha256(folder) != before


def test_the_cache_is_keyed_by_path_size_and_mtime(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "model")
    cache = tmp_path / "cache" / "hashes.json"
    first = checkpoint_sha256(folder, cache)
    assert cache.exists() and checkpoint_sha256(folder, cache) == first
    # same size and modification time: the cached hash is believed (nothing is read) ...
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stat = unet.stat()
    unet.write_bytes(b"UNET" * 1000)
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint_sha256(folder, cache) == first
    # ... another modification time is hashed again
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert checkpoint_sha256(folder, cache) != first
    assert checkpoint_sha256(folder) == checkpoint_sha256(folder, cache)
    # a broken cache is only a cache
    cache.write_text("not json")
    assert checkpoint_sha256(folder, cache) == checkpoint_sha256(folder)


def test_what_the_worker_reports(tmp_path: Path) -> None:
    assert model_sha256("org/a-hub-id-never-downloaded") is None
    with pytest.raises(ValueError, match="no .safetensors file"):
        model_sha256(str(tmp_path))
    folder = _folder(tmp_path / "model")
    assert model_sha256(str(folder)) == checkpoint_sha256(folder)
