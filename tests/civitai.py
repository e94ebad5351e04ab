"""A loopback stand-in of CivitAI's REST API v1, and tiny random LoRAs and embeddings.

`CivitaiStandIn` serves the endpoints a worker calls (models by id, model versions by id, a
search by name and type) and the files, from an aiohttp app on 127.0.0.1 port 0 in a
thread of its own, so both in-process tests and worker subprocesses can reach it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from aiohttp import web

__all__ = ["CivitaiStandIn", "Entry", "fake_safetensors", "random_lora", "random_ti", "standin"]


def fake_safetensors(size: int = 64, fill: int = 0) -> bytes:
    """A valid safetensors file of one uint8 tensor of `size` bytes (no torch needed)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + bytes([fill]) * size


def random_lora(sd: Path, out: Path, seed: int = 0, rank: int = 4, scale: float = 0.5) -> Path:
    """A kohya-format LoRA (CivitAI's usual kind) for the tiny pipeline at `sd`: random
    down/up matrices for every attention projection of the UNet and text encoder (an SDXL
    pipeline's two: `lora_te1_` and `lora_te2_`, as kohya names them)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    modules = [("lora_unet_", name, m) for name, m in unet.named_modules()]
    if (sd / "text_encoder_2").is_dir():
        encoders = [
            ("lora_te1_", CLIPTextModel.from_pretrained(sd / "text_encoder")),
            ("lora_te2_", CLIPTextModelWithProjection.from_pretrained(sd / "text_encoder_2")),
        ]
    else:
        encoders = [("lora_te_", CLIPTextModel.from_pretrained(sd / "text_encoder"))]
    for prefix, text in encoders:
        modules += [(prefix, name, m) for name, m in text.named_modules()]
    for prefix, name, module in modules:
        if not isinstance(module, torch.nn.Linear):
            continue
        if not name.endswith(
            ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
        ):
            continue
        key = prefix + name.replace(".", "_")
        down = torch.randn(rank, module.in_features, generator=generator) * scale
        up = torch.randn(module.out_features, rank, generator=generator) * scale
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, out)
    return out


def random_ti(sd: Path, out: Path, seed: int = 0, vectors: int = 2) -> Path:
    """An A1111-format embedding (`emb_params`) for the tiny text encoder; for an SDXL
    pipeline, CivitAI's SDXL form: `clip_l` for its first text encoder, `clip_g` for its
    second."""
    import torch
    from safetensors.torch import save_file

    def hidden(encoder: str) -> int:
        return int(json.loads((sd / encoder / "config.json").read_text())["hidden_size"])

    generator = torch.Generator().manual_seed(seed)
    if (sd / "text_encoder_2").is_dir():
        tensors = {
            key: torch.randn(vectors, hidden(encoder), generator=generator)
            for key, encoder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))
        }
    else:
        tensors = {"emb_params": torch.randn(vectors, hidden("text_encoder"), generator=generator)}
    save_file(tensors, out)
    return out


@dataclass
class Entry:
    """One CivitAI model with one version and its file."""

    model_id: int
    name: str
    type: str  # "LORA" or "TextualInversion"
    version_id: int
    data: bytes
    base_model: str = "SD 1.5"
    trained_words: list[str] = field(default_factory=list)
    # what the API claims (None: the truth)
    sha256: str | None = None
    size_kb: float | None = None
    format: str = "SafeTensor"

    def version(self, base: str) -> dict[str, Any]:
        digest = self.sha256 or hashlib.sha256(self.data).hexdigest().upper()
        url = f"{base}/api/download/models/{self.version_id}"
        return {
            "id": self.version_id,
            "modelId": self.model_id,
            "name": "v1.0",
            "baseModel": self.base_model,
            "trainedWords": self.trained_words,
            "downloadUrl": url,
            "files": [
                {
                    "name": self.name + (".safetensors" if self.format == "SafeTensor" else ".pt"),
                    "id": self.version_id * 10,
                    "sizeKB": self.size_kb if self.size_kb is not None else len(self.data) / 1024,
                    "type": "Model",
                    "primary": True,
                    "metadata": {"format": self.format, "fp": "fp16", "size": "pruned"},
                    "hashes": {"SHA256": digest, "AutoV2": digest[:10]},
                    "downloadUrl": url,
                }
            ],
        }

    def model(self, base: str) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "name": self.name,
            "type": self.type,
            "nsfw": False,
            "modelVersions": [self.version(base)],
        }


class CivitaiStandIn:
    """CivitAI's endpoints for `entries`; `url` once started; `downloads` counts files
    served by version id; `calls` counts API calls; `token` is what the last call sent."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.url = ""
        self.downloads: Counter[int] = Counter()
        self.calls = 0
        self.tokens: list[str | None] = []
        # stops serving (CivitAI unreachable); set by `standin`
        self.shutdown: Callable[[], None] = lambda: None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/models/{id}", self._model)
        app.router.add_get("/api/v1/models", self._search)
        app.router.add_get("/api/v1/model-versions/{id}", self._version)
        app.router.add_get("/api/download/models/{id}", self._download)
        return app

    def _note(self, request: web.Request) -> None:
        self.calls += 1
        self.tokens.append(request.headers.get("Authorization"))

    async def _model(self, request: web.Request) -> web.Response:
        self._note(request)
        for entry in self.entries:
            if str(entry.model_id) == request.match_info["id"]:
                return web.json_response(entry.model(self.url))
        return web.json_response({"error": "No model with id"}, status=404)

    async def _search(self, request: web.Request) -> web.Response:
        self._note(request)
        query = request.query.get("query", "").lower()
        types = request.query.getall("types", [])
        items = [
            e.model(self.url)
            for e in self.entries
            if query in e.name.lower() and (not types or e.type in types)
        ]
        return web.json_response({"items": items, "metadata": {"totalItems": len(items)}})

    async def _version(self, request: web.Request) -> web.Response:
        self._note(request)
        for entry in self.entries:
            if str(entry.version_id) == request.match_info["id"]:
                body = entry.version(self.url)
                body["model"] = {"name": entry.name, "type": entry.type, "nsfw": False}
                return web.json_response(body)
        return web.json_response({"error": "No version"}, status=404)

    async def _download(self, request: web.Request) -> web.Response:
        for entry in self.entries:
            if str(entry.version_id) == request.match_info["id"]:
                self.downloads[entry.version_id] += 1
                return web.Response(body=entry.data, content_type="application/octet-stream")
        return web.Response(status=404)


@contextmanager
def standin(entries: list[Entry]) -> Iterator[CivitaiStandIn]:
    """Serve `entries` on 127.0.0.1 (a thread with its own event loop) while in the block."""
    server = CivitaiStandIn(entries)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        server.url = f"http://127.0.0.1:{port}"

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    stopped = False

    def shutdown() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)

    server.shutdown = shutdown
    try:
        yield server
    finally:
        shutdown()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
