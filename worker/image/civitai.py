"""Resolving a job's LoRAs and textual inversions through CivitAI's public REST API v1.

`{url}/api/v1/models/{id}` for a name made only of digits, `{url}/api/v1/model-versions/{id}`
with `is_version`, else `{url}/api/v1/models?query=NAME&types=LORA` (or TextualInversion),
taking the model whose name equals NAME (ignoring case), else the first found. The version
is the model's `modelVersions[0]`; its file is the `primary` SafeTensor one, with its
`hashes.SHA256` and `downloadUrl`. Runs in the worker, never in the sandbox (which has no
network); the files are fetched by worker.image.lora_cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from protocol.loras import CIVITAI_URL, LoraSpec, TiSpec
from worker.errors import AdapterUnavailable

__all__ = ["CIVITAI_URL", "CivitaiApi", "CivitaiFile", "Kind"]

log = logging.getLogger(__name__)

# the model types a LoRA may have on CivitAI (LyCORIS/LoCon load the same way), and a TI's
_TYPES: dict[str, tuple[str, ...]] = {
    "lora": ("LORA", "LoCon", "DoRA"),
    "ti": ("TextualInversion",),
}
_SEARCH_TYPE = {"lora": "LORA", "ti": "TextualInversion"}
# the answers of the API are small; a larger one is not CivitAI's
_MAX_JSON_BYTES = 8 * 1024 * 1024

Kind = Literal["lora", "ti"]


@dataclass(frozen=True)
class CivitaiFile:
    """The file one LoRA or TI of a job resolved to."""

    kind: Kind
    # the name as the job gave it
    name: str
    model_name: str
    version_id: int
    base_model: str
    trained_words: tuple[str, ...]
    sha256: str  # lower case
    size_bytes: int | None
    url: str


def _failed(message: str) -> AdapterUnavailable:
    return AdapterUnavailable("download_failed", message)


class CivitaiApi:
    """CivitAI's API at `url` (its origin), with `token` for gated models and files."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.token = token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _get(self, path: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        try:
            async with self.session.get(url, headers=self.headers) as response:
                if response.status == 404:
                    raise _failed(f"CivitAI has no {path.split('?')[0]!r}")
                if response.status >= 400:
                    raise _failed(f"CivitAI answered {response.status} to /api/v1/{path}")
                body = await response.content.read(_MAX_JSON_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterUnavailable(
                "download_failed",
                f"CivitAI's API at {self.url} is unreachable ({exc})",
                unreachable=True,
            ) from None
        if len(body) > _MAX_JSON_BYTES:
            raise _failed(f"CivitAI's answer to /api/v1/{path} is too large")
        try:
            return json.loads(body)
        except ValueError:
            raise _failed(f"CivitAI's answer to /api/v1/{path} is not JSON") from None

    async def resolve(self, spec: LoraSpec | TiSpec, kind: Kind) -> CivitaiFile:
        """The version and file `spec` names; AdapterUnavailable when there is none."""
        name = spec.name
        pinned = spec.version_id
        if pinned is not None or (isinstance(spec, LoraSpec) and spec.is_version):
            if pinned is None and not name.isdigit():
                raise _failed(f"{name!r} is not a version id (is_version needs digits)")
            version = await self._get(f"model-versions/{pinned if pinned is not None else name}")
            model = version.get("model") if isinstance(version, dict) else None
            model_name = str(model.get("name", name)) if isinstance(model, dict) else name
            model_type = model.get("type") if isinstance(model, dict) else None
            if model_type is not None and model_type not in _TYPES[kind]:
                raise _failed(f"CivitAI version {name} is a {model_type}, not a {kind}")
            return _file(kind, name, model_name, version)
        if name.isdigit():
            model = await self._get(f"models/{name}")
        else:
            found = await self._get(
                f"models?query={quote(name)}&types={_SEARCH_TYPE[kind]}&limit=20"
            )
            items = found.get("items") if isinstance(found, dict) else None
            if not isinstance(items, list) or not items:
                raise _failed(f"CivitAI finds no {kind} named {name!r}")
            exact = [m for m in items if str(m.get("name", "")).lower() == name.lower()]
            model = (exact or items)[0]
        if not isinstance(model, dict):
            raise _failed(f"CivitAI's answer for {name!r} is not a model")
        if model.get("type") not in _TYPES[kind]:
            raise _failed(f"CivitAI model {name!r} is a {model.get('type')}, not a {kind}")
        versions = model.get("modelVersions")
        if not isinstance(versions, list) or not versions:
            raise _failed(f"CivitAI model {name!r} has no version")
        return _file(kind, name, str(model.get("name", name)), versions[0])


def _file(kind: Kind, name: str, model_name: str, version: Any) -> CivitaiFile:
    """The primary SafeTensor file of `version` (a CivitAI model version object)."""
    if not isinstance(version, dict) or not isinstance(version.get("id"), int):
        raise _failed(f"CivitAI's version of {name!r} has no id")
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    primary = [f for f in files if f.get("primary")] or files[:1]
    if not primary:
        raise _failed(f"CivitAI's version {version['id']} of {name!r} has no file")
    chosen = primary[0]
    metadata = chosen.get("metadata") or {}
    file_name = str(chosen.get("name", ""))
    if metadata.get("format") != "SafeTensor" and not file_name.endswith(".safetensors"):
        raise _failed(
            f"the file of {name!r} (version {version['id']}) is not a safetensors file; "
            "only safetensors weights are loaded"
        )
    sha256 = (chosen.get("hashes") or {}).get("SHA256")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise _failed(f"CivitAI gives no SHA256 for the file of {name!r}; it cannot be checked")
    url = chosen.get("downloadUrl") or version.get("downloadUrl")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _failed(f"CivitAI gives no download URL for {name!r}")
    size_kb = chosen.get("sizeKB")
    words = version.get("trainedWords") or []
    return CivitaiFile(
        kind=kind,
        name=name,
        model_name=model_name,
        version_id=int(version["id"]),
        base_model=str(version.get("baseModel", "")),
        trained_words=tuple(str(w) for w in words if isinstance(w, str) and w.strip()),
        sha256=sha256.lower(),
        size_bytes=int(size_kb * 1024) if isinstance(size_kb, int | float) else None,
        url=url,
    )
