"""Where the CLI keeps API keys between runs: one JSON file, readable by its owner only."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["Credentials"]


class Credentials:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def api_key(self, coordinator: str) -> str | None:
        return self._load().get(coordinator.rstrip("/"))

    def save(self, coordinator: str, api_key: str) -> None:
        data = self._load()
        data[coordinator.rstrip("/")] = api_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
