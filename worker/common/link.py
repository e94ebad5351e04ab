"""The worker's HTTP link to the coordinator: register, pop, progress, result, fail.

Registration and a block server's peer link sign a single-use coordinator nonce
(`challenge`), so neither can be replayed.

A result goes up as one raw-PNG upload per image (`PUT /api/v1/jobs/{id}/images/{i}`,
seed, hash and signature in headers), then one small JSON request that names the
uploads and gets the job paid.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aiohttp
from pydantic import BaseModel

from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    Challenge,
    ErrorBody,
    ImageUploaded,
    JobStatus,
    LeasedJob,
    LeaseExtended,
    PopResponse,
    ResultAccepted,
    WorkerRegistered,
)
from protocol.signing import (
    Identity,
    account_binding,
    peer_proof_message,
    registration_message,
    result_message,
    sha256_hex,
    text_result_message,
)
from protocol.text import (
    LeasedTextJob,
    PeerLinked,
    TextDeltaAccepted,
    TextModel,
    TextPopResponse,
    TextResultAccepted,
    TextStatus,
)
from worker.errors import CoordinatorRejected, CoordinatorUnavailable, LeaseLost

__all__ = ["Capabilities", "CoordinatorLink", "PeerSigner", "retrying"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# seconds between attempts while the coordinator is unreachable
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)


class PeerSigner(Protocol):
    """A libp2p key that signs for its peer id (worker.llm.swarm.peer_proof.PeerKey)."""

    @property
    def peer_id(self) -> str: ...

    def sign(self, message: bytes) -> str:
        """Hex signature over `message`."""
        ...


class Capabilities(BaseModel):
    models: list[str]
    max_pixels: int
    max_steps: int


class CoordinatorLink:
    def __init__(self, base_url: str, identity: Identity, name: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._identity = identity
        self._name = name
        self._api_key = api_key
        self._token: str | None = None
        self.worker_id: str | None = None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def _call(
        self,
        path: str,
        body: Any,
        model: type[M],
        *,
        worker: bool = True,
        seconds: float = 30.0,
        method: str = "POST",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> M:
        """`body` goes as JSON, or `data` as the raw body (with its Content-Type in headers)."""
        headers = dict(headers or {})
        if worker:
            assert self._token is not None, "register() first"
            headers["X-Worker-Token"] = self._token
        elif self._api_key:
            headers["apikey"] = self._api_key
        try:
            async with asyncio.timeout(seconds):
                # (a file-like body is sent in pieces; raw bytes would be written at once)
                payload: dict[str, Any] = (
                    {"json": body} if data is None else {"data": io.BytesIO(data)}
                )
                async with self._session.request(
                    method, self.base_url + path, headers=headers, **payload
                ) as resp:
                    text = await resp.text()
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise CoordinatorUnavailable(
                f"cannot reach the coordinator at {self.base_url}: {exc!r}"
            ) from exc
        if resp.status == 409:
            raise LeaseLost(_message(text))
        if resp.status >= 500:
            raise CoordinatorUnavailable(f"coordinator error {resp.status}: {_message(text)}")
        if resp.status >= 400:
            raise CoordinatorRejected(resp.status, _message(text))
        return model.model_validate_json(text)

    async def challenge(self, purpose: str) -> str:
        """A single-use nonce to sign (`register` or `peer`), valid for about a minute."""
        try:
            answer = await self._call(
                "/api/v1/workers/challenge", {"purpose": purpose}, Challenge, worker=False
            )
        except CoordinatorRejected as exc:
            if exc.status != 404:
                raise
            raise CoordinatorRejected(
                404,
                f"the coordinator at {self.base_url} hands out no challenges: it runs an "
                "older idlegrid than this worker; upgrade the coordinator",
            ) from None
        return answer.nonce

    async def register(self) -> WorkerRegistered:
        """Register this identity, signing the account the earnings go to and a fresh
        nonce: a captured registration cannot be replayed, with another key or as is."""
        nonce = await self.challenge("register")
        public_key = self._identity.public_key
        account = account_binding(self._api_key or None)
        message = registration_message(self._name, public_key, account, nonce)
        body = {
            "name": self._name,
            "public_key": public_key,
            "account": account,
            "nonce": nonce,
            "signature": self._identity.sign(message),
        }
        registered = await self._call(
            "/api/v1/workers/register", body, WorkerRegistered, worker=False
        )
        self._token = registered.token
        self.worker_id = registered.worker_id
        return registered

    async def pop(self, capabilities: Capabilities, wait: float) -> LeasedJob | None:
        body = {**capabilities.model_dump(), "wait": wait}
        response = await self._call("/api/v1/workers/pop", body, PopResponse, seconds=wait + 30)
        return response.job

    async def progress(self, job_id: str, image: int, step: int, steps: int) -> LeaseExtended:
        body = {"image": image, "step": step, "steps": steps}
        return await self._call(f"/api/v1/jobs/{job_id}/progress", body, LeaseExtended)

    def signed_image(self, job: LeasedJob, index: int, seed: int, sha256: str) -> dict[str, Any]:
        """One image's entry of a result: what the upload's headers and the result carry."""
        signature = self._identity.sign(result_message(job.id, job.params_hash, sha256))
        return {"index": index, "seed": seed, "sha256": sha256, "signature": signature}

    async def upload_image(
        self, job: LeasedJob, index: int, seed: int, png: bytes
    ) -> ImageUploaded:
        """Upload one image as raw PNG bytes; the coordinator checks it and keeps it for
        the result that follows."""
        return await self._upload(job, self.signed_image(job, index, seed, sha256_hex(png)), png)

    async def _upload(self, job: LeasedJob, image: dict[str, Any], png: bytes) -> ImageUploaded:
        headers = {
            "Content-Type": "image/png",
            IMAGE_SEED_HEADER: str(image["seed"]),
            IMAGE_SHA256_HEADER: image["sha256"],
            IMAGE_SIGNATURE_HEADER: image["signature"],
        }
        return await self._call(
            f"/api/v1/jobs/{job.id}/images/{image['index']}",
            None,
            ImageUploaded,
            method="PUT",
            data=png,
            headers=headers,
            seconds=300,
        )

    async def finish(self, job: LeasedJob, images: list[dict[str, Any]]) -> ResultAccepted:
        """Finish the job whose images (entries of `signed_image`) are uploaded; get paid."""
        return await self._call(
            f"/api/v1/jobs/{job.id}/result", {"images": images}, ResultAccepted, seconds=120
        )

    async def submit(self, job: LeasedJob, seeds: list[int], pngs: list[bytes]) -> ResultAccepted:
        """Upload every image, then finish the job."""
        images = []
        for index, (seed, png) in enumerate(zip(seeds, pngs, strict=True)):
            image = self.signed_image(job, index, seed, sha256_hex(png))
            await self._upload(job, image, png)
            images.append(image)
        return await self.finish(job, images)

    async def fail(self, job_id: str, reason: str) -> JobStatus:
        return await self._call(f"/api/v1/jobs/{job_id}/fail", {"reason": reason[:500]}, JobStatus)

    # --- block servers and text gateways ------------------------------------------------

    async def link_peer(self, peer: PeerSigner) -> PeerLinked:
        """Link a block server's hivemind peer id to the registered worker, proving with
        the peer id's libp2p key (worker.llm.swarm.peer_proof) that it is ours."""
        assert self.worker_id is not None, "register() first"
        nonce = await self.challenge("peer")
        message = peer_proof_message(nonce, self.worker_id, peer.peer_id)
        body = {"peer_id": peer.peer_id, "nonce": nonce, "peer_signature": peer.sign(message)}
        return await self._call("/api/v1/workers/peers", body, PeerLinked)

    async def pop_text(self, models: list[TextModel], wait: float) -> LeasedTextJob | None:
        body = {"models": [m.model_dump() for m in models], "wait": wait}
        response = await self._call("/api/v1/text/pop", body, TextPopResponse, seconds=wait + 30)
        return response.job

    async def text_delta(self, job_id: str, offset: int, text: str) -> TextDeltaAccepted:
        body = {"offset": offset, "text": text}
        return await self._call(f"/api/v1/text/jobs/{job_id}/delta", body, TextDeltaAccepted)

    async def submit_text(
        self,
        job: LeasedTextJob,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        spans: list[dict[str, Any]],
        checks: list[dict[str, Any]] | None = None,
    ) -> TextResultAccepted:
        """Report a finished text job: its text, usage, who served it and the gateway's
        spot checks of those servers (protocol.text.ServerCheck), signed."""
        message = text_result_message(job.id, job.params_hash, text, spans, checks)
        body: dict[str, Any] = {
            "text": text,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "spans": spans,
            "signature": self._identity.sign(message),
        }
        if checks:
            body["checks"] = checks
        return await self._call(f"/api/v1/text/jobs/{job.id}/result", body, TextResultAccepted)

    async def fail_text(self, job_id: str, reason: str, retry: bool) -> TextStatus:
        body = {"reason": reason[:500], "retry": retry}
        return await self._call(f"/api/v1/text/jobs/{job_id}/fail", body, TextStatus)

    async def report_engine(self, engine: dict[str, Any]) -> None:
        """Tell the coordinator which engine build this worker runs (for spot checks)."""
        await self._call("/api/v1/workers/engine", engine, _Ignored)


class _Ignored(BaseModel):
    pass


async def retrying(what: str, make_call: Callable[[], Awaitable[T]]) -> T:
    """Call until the coordinator answers: retries (with growing pauses) while it is
    unreachable or rate-limits us (429); other refusals are raised."""
    attempt = 0
    while True:
        try:
            return await make_call()
        except (CoordinatorUnavailable, CoordinatorRejected) as exc:
            if isinstance(exc, CoordinatorRejected) and exc.status != 429:
                raise
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            attempt += 1
            log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


def _message(text: str) -> str:
    try:
        return ErrorBody.model_validate_json(text).error.message
    except ValueError:
        return text[:300]
