"""The worker's link to the coordinator: a face of the typed client (client.api).

The requests themselves (register, pop, progress, results, peer links) are
client.api.worker_routes; this face signs what the worker signs with its identity, keeps
the token registration gives it, and names failures as worker.errors does
(`WorkerErrors`): CoordinatorUnavailable (unreachable, or a 5xx: retry), LeaseLost (409:
drop the job), CoordinatorRejected (another 4xx: fix the request). `retrying` calls until
the coordinator answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from client.api import worker_routes as routes
from client.api.core import Request, Response
from client.api.errors import TransportError
from client.api.faces import AsyncApi, endpoint
from client.api.transports import AsyncTransport
from client.api.worker_routes import Capabilities
from protocol.adapted import adapters_message
from protocol.loras import ResolvedAdapter
from protocol.messages import ErrorBody, ImageUploaded, LeasedJob, ResultAccepted, WorkerRegistered
from protocol.signing import (
    Identity,
    peer_proof_message,
    result_message,
    sha256_hex,
    text_result_message,
)
from protocol.text import LeasedTextJob, PeerLinked, TextResultAccepted
from worker.errors import CoordinatorRejected, CoordinatorUnavailable, LeaseLost

__all__ = ["Capabilities", "CoordinatorLink", "PeerSigner", "WorkerErrors", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# seconds between attempts while the coordinator is unreachable
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
# seconds one call may take unless its route says otherwise, and to connect
CALL_SECONDS = 30.0
CONNECT_SECONDS = 10.0


class PeerSigner(Protocol):
    """A libp2p key that signs for its peer id (worker.llm.swarm.peer_proof.PeerKey)."""

    @property
    def peer_id(self) -> str: ...

    def sign(self, message: bytes) -> str:
        """Hex signature over `message`."""
        ...


class WorkerErrors:
    """The worker's errors (worker.errors) for the typed client's failures."""

    def rejected(self, request: Request, response: Response) -> Exception:
        message = _message(response.text)
        if response.status == 409:
            return LeaseLost(message)
        if response.status >= 500:
            return CoordinatorUnavailable(f"coordinator error {response.status}: {message}")
        return CoordinatorRejected(response.status, message)

    def unreachable(self, request: Request, error: TransportError) -> Exception:
        cause = error.__cause__ or error
        return CoordinatorUnavailable(
            f"cannot reach the coordinator at {request.base_url}: {cause!r}"
        )

    def timed_out(self, request: Request, seconds: float) -> Exception:
        return CoordinatorUnavailable(
            f"cannot reach the coordinator at {request.base_url}: {TimeoutError()!r}"
        )


class CoordinatorLink(AsyncApi):
    """Worker `name`'s link, signing with `identity`; its earnings go to the account of
    `api_key`. `transport`: how requests travel (default: aiohttp over the network)."""

    def __init__(
        self,
        base_url: str,
        identity: Identity,
        name: str,
        api_key: str | None,
        *,
        transport: AsyncTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            WorkerErrors(),
            timeout=CALL_SECONDS,
            connect_timeout=CONNECT_SECONDS,
            transport=transport,
        )
        self._identity = identity
        self._name = name
        self.worker_id: str | None = None
        # a job of one image goes up and is paid in one request, unless the coordinator
        # is older than that route
        self._final_upload = True

    @property
    def token(self) -> str | None:
        """The worker token registration gave (sent as X-Worker-Token)."""
        return self.core.worker_token

    async def challenge(self, purpose: routes.Purpose) -> str:
        """A single-use nonce to sign (`register` or `peer`), valid for about a minute."""
        try:
            return await self.send(routes.challenge(purpose))
        except CoordinatorRejected as exc:
            if exc.status != 404:
                raise
            raise CoordinatorRejected(
                404,
                f"the coordinator at {self.base_url} hands out no challenges: it runs an "
                "older idlegrid than this worker; upgrade the coordinator",
            ) from None

    async def register(self) -> WorkerRegistered:
        """Register this identity, signing the account the earnings go to and a fresh
        nonce: a captured registration cannot be replayed, with another key or as is."""
        nonce = await self.challenge("register")
        registered = await self.send(
            routes.register(self._identity, self._name, self.core.api_key, nonce)
        )
        self.core.worker_token = registered.token
        self.worker_id = registered.worker_id
        return registered

    pop = endpoint(routes.pop)
    progress = endpoint(routes.progress)
    fail = endpoint(routes.fail)
    report_engine = endpoint(routes.engine)

    def signed_image(self, job: LeasedJob, index: int, seed: int, sha256: str) -> dict[str, Any]:
        """One image's entry of a result: what the upload's headers and the result carry."""
        signature = self._identity.sign(result_message(job.id, job.params_hash, sha256))
        return {"index": index, "seed": seed, "sha256": sha256, "signature": signature}

    async def upload_image(
        self, job: LeasedJob, index: int, seed: int, png: bytes
    ) -> ImageUploaded:
        """Upload one image as raw PNG bytes; the coordinator checks it and keeps it for
        the result that follows."""
        image = self.signed_image(job, index, seed, sha256_hex(png))
        return await self.send(routes.upload_image(job, image, png))

    finish = endpoint(routes.finish)

    async def sources(self, job: LeasedJob) -> list[bytes]:
        """The job's source image and mask (none for txt2img), each checked against the
        digest its signed params name; CoordinatorRejected if the bytes do not match."""
        blobs = []
        for digest in (job.params.source_image, job.params.source_mask):
            if digest is None:
                continue
            data = await self.send(routes.source(job.id, digest))
            if sha256_hex(data) != digest:
                raise CoordinatorRejected(
                    200, f"the source {digest} of job {job.id} arrived with another SHA-256"
                )
            blobs.append(data)
        return blobs

    async def submit(
        self,
        job: LeasedJob,
        seeds: list[int],
        pngs: list[bytes],
        adapters: list[ResolvedAdapter] | None = None,
    ) -> ResultAccepted:
        """Upload every image, then finish the job (naming and signing the LoRAs and TIs
        it used, `adapters`, if it has any); a job of one image without them, in one
        request."""
        single = len(pngs) == 1 and not (adapters or job.params.loras or job.params.tis)
        if single and self._final_upload:
            image = self.signed_image(job, 0, seeds[0], sha256_hex(pngs[0]))
            try:
                return await self.send(routes.upload_final_image(job, image, pngs[0]))
            except CoordinatorRejected as exc:
                if exc.status != 404:
                    raise
                self._final_upload = False  # an older coordinator: upload, then finish
        images = []
        for index, (seed, png) in enumerate(zip(seeds, pngs, strict=True)):
            image = self.signed_image(job, index, seed, sha256_hex(png))
            await self.send(routes.upload_image(job, image, png))
            images.append(image)
        if not adapters:
            return await self.send(routes.finish(job, images))
        signature = self._identity.sign(adapters_message(job.id, job.params_hash, adapters))
        used = [adapter.model_dump(mode="json") for adapter in adapters]
        return await self.send(routes.finish(job, images, used, signature))

    # --- block servers and text gateways ------------------------------------------------

    async def link_peer(self, peer: PeerSigner) -> PeerLinked:
        """Link a block server's hivemind peer id to the registered worker, proving with
        the peer id's libp2p key (worker.llm.swarm.peer_proof) that it is ours."""
        assert self.worker_id is not None, "register() first"
        nonce = await self.challenge("peer")
        signature = peer.sign(peer_proof_message(nonce, self.worker_id, peer.peer_id))
        return await self.send(routes.link_peer(peer.peer_id, nonce, signature))

    pop_text = endpoint(routes.pop_text)
    text_delta = endpoint(routes.text_delta)
    fail_text = endpoint(routes.fail_text)

    async def submit_text(
        self,
        job: LeasedTextJob,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        spans: list[dict[str, Any]],
        checks: list[dict[str, Any]] | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> TextResultAccepted:
        """Report a finished text job: its text, usage, who served it and the gateway's
        spot checks of those servers (protocol.text.ServerCheck), signed; with
        params.logprobs, the tokens' log-probabilities (not signed)."""
        signature = self._identity.sign(
            text_result_message(job.id, job.params_hash, text, spans, checks)
        )
        return await self.send(
            routes.submit_text(
                job,
                text,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                spans,
                checks,
                signature,
                logprobs,
            )
        )


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
