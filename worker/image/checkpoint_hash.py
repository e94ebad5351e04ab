"""The checkpoint hash an image worker reports, as the image model reference pins it.

- A single file (`--model x.safetensors`): the file's SHA-256, as `sha256sum` prints it
  (the hash AI Horde's reference and CivitAI list).
- A diffusers folder: the SHA-256 of the manifest of its weights: one line
  `<sha256 of the file>  <path relative to the folder, with />` per `*.safetensors` file
  under it (any depth, hidden folders skipped), in byte order of the paths, each line ending
  in a newline. In a shell: `cd FOLDER && find . -name '*.safetensors' -not -path '*/.*'
  | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum`. Every weight of the
  pipeline counts (UNet, text encoders, VAE): two folders hash alike only if they compute
  alike. Configs (JSON) do not count.

`python -m worker.image.checkpoint_hash PATH` prints it, for an operator writing the
reference. Hashing a large checkpoint takes a while, so each file's hash is cached
(`cache_file`, JSON) under its absolute path, size and modification time: a restart with
unchanged files reads no weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

__all__ = ["checkpoint_sha256", "file_sha256", "model_sha256"]

_CHUNK = 1 << 20
# cached hashes kept at most (the oldest entries go first)
_MAX_ENTRIES = 1000


def checkpoint_sha256(path: Path, cache_file: Path | None = None) -> str:
    """The hash of the checkpoint at `path` (a file, or a diffusers folder), as above."""
    cache = _Cache(cache_file)
    try:
        if path.is_file():
            return cache.sha256(path)
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*.safetensors")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{path}: no .safetensors file in it; give a diffusers folder")
        manifest = "".join(f"{cache.sha256(p)}  {name}\n" for name, p in files)
        return hashlib.sha256(manifest.encode()).hexdigest()
    finally:
        cache.save()


def model_sha256(model: str, cache_file: Path | None = None) -> str | None:
    """The hash of `--model` as the worker loads it (a local path); None for a model that
    is not one (no hash to report: the coordinator then refuses its catalog names)."""
    path = Path(model)
    return checkpoint_sha256(path, cache_file) if path.exists() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Cache:
    """{absolute path: [size, mtime_ns, sha256]} in a JSON file (None: no cache)."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, list[object]] = {}
        self.changed = False
        if file is not None:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(file.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.entries = loaded

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if (
            isinstance(entry, list)
            and entry[:2] == [stat.st_size, stat.st_mtime_ns]
            and isinstance(entry[2], str)
        ):
            return entry[2]
        digest = file_sha256(path)
        self.entries.pop(key, None)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        entries = dict(list(self.entries.items())[-_MAX_ENTRIES:])
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.file.with_suffix(".partial")
            partial.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(partial, self.file)
        except OSError:
            # only a cache: the next start hashes again
            pass


if __name__ == "__main__":  # pragma: no cover - an operator's command
    for argument in sys.argv[1:]:
        print(f"{checkpoint_sha256(Path(argument))}  {argument}")
