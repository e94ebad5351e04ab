"""Run by the Python of a venv holding AI Horde's own client library (horde_sdk), against
an idlegrid coordinator: its simple client requests images (as URLs and as base64) and
polls until done, a bridge thread pops and submits as an AI Horde worker does, then it looks
up the user, the workers and the models, and cancels a request. Prints "ALL OK" at the end.

    python horde_sdk_client.py URL REQUESTER_KEY BRIDGE_OWNER_KEY

Only tests/e2e/test_horde_sdk.py runs it, inside a network namespace with nothing but
loopback.
"""

import base64
import io
import os
import sys
import threading
import time
from typing import Any

URL, ALICE, BRIDGE = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["AI_HORDE_URL"] = f"{URL}/api/"  # read when horde_sdk is imported

from horde_sdk.ai_horde_api.ai_horde_clients import (  # noqa: E402
    AIHordeAPIManualClient,
    AIHordeAPISimpleClient,
)
from horde_sdk.ai_horde_api.apimodels import (  # noqa: E402
    FindUserRequest,
    ImageGenerateAsyncRequest,
    ImageGenerateAsyncResponse,
    ImageGenerateJobPopRequest,
    ImageGenerateJobPopResponse,
    ImageGenerationInputPayload,
    ImageGenerationJobSubmitRequest,
)
from horde_sdk.ai_horde_api.apimodels._users import UserDetailsResponse  # noqa: E402
from horde_sdk.ai_horde_api.apimodels.base import JobSubmitResponse  # noqa: E402
from horde_sdk.ai_horde_api.consts import GENERATION_STATE  # noqa: E402
from PIL import Image  # noqa: E402

COLOUR = (30, 60, 90)
simple = AIHordeAPISimpleClient()
manual = AIHordeAPIManualClient()
stop = threading.Event()
# what the bridge saw of the last job's source image: (processing, image, mask, strength)
seen: dict[str, Any] = {}
print("heartbeat:", simple.heartbeat_request().version)


def bridge() -> None:
    """An AI Horde worker: pop, paint a solid image, submit it as base64 WebP."""
    while not stop.is_set():
        pop = ImageGenerateJobPopRequest(
            apikey=BRIDGE,
            name="sdk-bridge",
            models=["stable_diffusion"],
            max_pixels=262144,
            allow_img2img=True,
            allow_painting=True,
        )
        popped = manual.submit_request(pop, ImageGenerateJobPopResponse)
        assert isinstance(popped, ImageGenerateJobPopResponse), popped
        if not popped.ids:
            time.sleep(0.2)
            continue
        p = popped.payload
        seen.update(
            processing=str(popped.source_processing),
            image=popped.source_image,
            mask=popped.source_mask,
            strength=p.denoising_strength,
        )
        print("bridge popped:", p.sampler_name, p.seed, p.width, p.height, p.ddim_steps, p.prompt)
        out = io.BytesIO()
        Image.new("RGB", (p.width, p.height), COLOUR).save(out, format="WEBP", lossless=True)
        submit = ImageGenerationJobSubmitRequest(
            apikey=BRIDGE,
            id=popped.ids[0],
            generation=base64.b64encode(out.getvalue()).decode(),
            seed=int(p.seed),
            state=GENERATION_STATE.ok,
        )
        done = manual.submit_request(submit, JobSubmitResponse)
        assert isinstance(done, JobSubmitResponse), done
        print("bridge rewarded:", done.reward)


threading.Thread(target=bridge, daemon=True).start()
for r2 in (True, False):
    request = ImageGenerateAsyncRequest(
        apikey=ALICE,
        prompt="a lighthouse ### fog",
        models=[],
        r2=r2,
        params=ImageGenerationInputPayload(
            width=64, height=64, steps=4, n=1, seed="3", sampler_name="k_euler_a"
        ),
    )
    status, job_id = simple.image_generate_request(request, timeout=60)
    (generation,) = status.generations
    assert generation.worker_name == "sdk-bridge" and generation.seed == "3", generation
    image = simple.download_image_from_generation(generation)
    assert image.size == (64, 64) and image.convert("RGB").getpixel((3, 3)) == COLOUR
    print(f"image (r2={r2}):", job_id, generation.model, generation.img[:40])
# img2img and inpainting: the source image and mask reach the bridge as they were sent
source, mask = io.BytesIO(), io.BytesIO()
Image.new("RGB", (64, 64), (200, 10, 10)).save(source, format="WEBP", lossless=True)
Image.new("L", (64, 64), 255).save(mask, format="PNG")
source_b64 = base64.b64encode(source.getvalue()).decode()
mask_b64 = base64.b64encode(mask.getvalue()).decode()
for processing, with_mask in (("img2img", None), ("inpainting", mask_b64)):
    request = ImageGenerateAsyncRequest(
        apikey=ALICE,
        prompt="a lighthouse",
        models=[],
        params=ImageGenerationInputPayload(
            width=64, height=64, steps=4, n=1, seed="4", denoising_strength=0.6
        ),
        source_image=source_b64,
        source_processing=processing,
        source_mask=with_mask,
    )
    status, job_id = simple.image_generate_request(request, timeout=60)
    (generation,) = status.generations
    assert generation.worker_name == "sdk-bridge", generation
    assert seen["processing"].endswith(processing), seen["processing"]
    assert seen["image"] == source_b64 and seen["mask"] == with_mask, processing
    assert abs(float(seen["strength"]) - 0.6) < 1e-9, seen["strength"]
    print(f"{processing}:", job_id)
stop.set()
me = manual.submit_request(FindUserRequest(apikey=ALICE), UserDetailsResponse)
assert isinstance(me, UserDetailsResponse) and me.username == f"alice#{me.id_}", me
print("find_user:", me.username, me.kudos)
workers = simple.workers_all_details()
assert [w.name for w in workers] == ["sdk-bridge"], workers
assert simple.worker_details(workers[0].id_).name == "sdk-bridge"
models = simple.image_status_models_all()
assert [m.name for m in models.root] == ["stable_diffusion"], models
created = manual.submit_request(
    ImageGenerateAsyncRequest(
        apikey=ALICE,
        prompt="to cancel",
        models=[],
        params=ImageGenerationInputPayload(width=64, height=64, steps=4),
    ),
    ImageGenerateAsyncResponse,
)
assert isinstance(created, ImageGenerateAsyncResponse), created
cancelled = manual.delete_pending_image(created.id_)
assert cancelled.done and not cancelled.generations, cancelled
print("ALL OK")
