"""Resolving and fetching LoRAs and textual inversions against a loopback CivitAI stand-in:
by id, by name, by version, pins, trigger words, every refusal, and the LRU cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from protocol.loras import BASELINES, CIVITAI_BASELINES, baseline_of
from protocol.params import ImageParams
from tests.civitai import CivitaiStandIn, Entry, fake_safetensors, standin
from worker.errors import AdapterUnavailable
from worker.image.adapters import Adapters, AdapterSettings, Backoff, trigger_words

LORA = fake_safetensors(4096, 1)
TI = fake_safetensors(256, 2)
ENTRIES = [
    Entry(111, "Tiny Style", "LORA", 1110, LORA, trained_words=["tinystyle", "tiny art"]),
    Entry(222, "Tiny Embedding", "TextualInversion", 2220, TI),
    Entry(333, "Big One", "LORA", 3330, fake_safetensors(3 * 2**20, 3)),
    Entry(444, "XL Style", "LORA", 4440, LORA, base_model="SDXL 1.0"),
    Entry(555, "Liar", "LORA", 5550, LORA, sha256="AB" * 32),
    Entry(666, "Pickled", "LORA", 6660, b"\x80\x04not safetensors", format="PickleTensor"),
    Entry(777, "Lies About Size", "LORA", 7770, fake_safetensors(3 * 2**20, 4), size_kb=1),
    Entry(888, "Not What It Says", "LORA", 8880, b"\x80\x04 pickle bytes"),
]


@pytest.fixture
def civitai() -> Iterator[CivitaiStandIn]:
    with standin(list(ENTRIES)) as server:
        yield server


def settings(url: str, tmp: Path, **changes: object) -> AdapterSettings:
    values: dict[str, object] = {
        "civitai_url": url,
        "civitai_token": "secret-token",
        "cache_dir": tmp / "loras",
        "max_bytes": 2 * 2**20,
        "cache_bytes": 10 * 2**20,
        "baseline": "sd1",
        **changes,
    }
    return AdapterSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def adapters(civitai: CivitaiStandIn, tmp_path: Path) -> AsyncIterator[Adapters]:
    made = await Adapters.create(settings(civitai.url, tmp_path))
    try:
        yield made
    finally:
        await made.aclose()


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _exists(*paths: str) -> bool:
    return all(Path(path).exists() for path in paths)


def job(**fields: object) -> ImageParams:
    return ImageParams.model_validate({"prompt": "a cat", "seed": 1, **fields})


async def test_a_lora_by_id_by_name_and_by_version_is_one_cached_file(
    adapters: Adapters, civitai: CivitaiStandIn
) -> None:
    by_id = await adapters.prepare(job(loras=[{"name": "111", "model": 0.5, "clip": 0.25}]))
    by_name = await adapters.prepare(job(loras=[{"name": "tiny style"}]))
    by_version = await adapters.prepare(job(loras=[{"name": "1110", "is_version": True}]))
    # a verification re-run: pinned to the version and file, the name kept (a TI's token)
    pinned = await adapters.prepare(
        job(
            loras=[
                {
                    "name": "Tiny Style",
                    "version_id": 1110,
                    "sha256": hashlib.sha256(LORA).hexdigest(),
                }
            ],
            tis=[{"name": "mytoken", "version_id": 2220}],
        )
    )
    assert [(r.name, r.version_id) for r in pinned.resolved] == [
        ("Tiny Style", 1110),
        ("mytoken", 2220),
    ]
    assert pinned.request.tis[0].token == "mytoken"
    sha = hashlib.sha256(LORA).hexdigest()
    for prepared in (by_id, by_name, by_version):
        assert [(r.kind, r.version_id, r.sha256) for r in prepared.resolved] == [
            ("lora", 1110, sha)
        ]
        (lora,) = prepared.request.loras
        assert _read(lora.path) == LORA
        assert Path(lora.path).parent == adapters.settings.cache_dir
        # the prompt is unchanged unless trigger words are asked for
        assert prepared.request.params.prompt == "a cat"
    assert (by_id.request.loras[0].model, by_id.request.loras[0].clip) == (0.5, 0.25)
    assert civitai.downloads[1110] == 1  # downloaded once, then from the cache
    assert set(civitai.tokens) == {"Bearer secret-token"}


async def test_trigger_words_and_ti_tokens_are_injected_only_when_asked(
    adapters: Adapters,
) -> None:
    prepared = await adapters.prepare(
        job(
            negative_prompt="blurry",
            loras=[{"name": "111", "inject_trigger": "all"}],
            tis=[
                {"name": "222", "inject_ti": "negprompt", "strength": 0.5},
                {"name": "Tiny Embedding", "inject_ti": "prompt"},
            ],
        )
    )
    params = prepared.request.params
    assert params.prompt == "Tiny Embedding, a cat, tinystyle, tiny art"
    assert params.negative_prompt == "blurry, 222"
    assert [(t.token, t.strength) for t in prepared.request.tis] == [
        ("222", 0.5),
        ("Tiny Embedding", 1.0),
    ]
    assert [r.kind for r in prepared.resolved] == ["lora", "ti", "ti"]
    assert trigger_words(("a", "b c"), "any") == ["a"]
    assert trigger_words(("a", "b c"), "C") == ["b c"]
    assert trigger_words(("a", "b c"), "zzz") == ["a"]
    assert trigger_words((), "all") == []


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"loras": [{"name": "555"}]}, "download_failed", ["SHA256", "5550"]),
        ({"loras": [{"name": "333"}]}, "download_failed", ["--lora-max-mb"]),
        ({"loras": [{"name": "777"}]}, "download_failed", ["--lora-max-mb"]),
        ({"loras": [{"name": "666"}]}, "download_failed", ["not a safetensors file"]),
        ({"loras": [{"name": "888"}]}, "download_failed", ["is not safetensors"]),
        ({"loras": [{"name": "444"}]}, "baseline_mismatch", ["'SDXL 1.0' (sdxl)", "is sd1"]),
        ({"loras": [{"name": "999"}]}, "download_failed", ["no 'models/999'"]),
        ({"loras": [{"name": "nothing like it"}]}, "download_failed", ["finds no lora"]),
        ({"loras": [{"name": "222"}]}, "download_failed", ["TextualInversion, not a lora"]),
        ({"tis": [{"name": "111"}]}, "download_failed", ["LORA, not a ti"]),
        (
            {"loras": [{"name": "1110", "is_version": True, "sha256": "0" * 64}]},
            "download_failed",
            ["pinned to SHA256 " + "0" * 64],
        ),
    ],
)
async def test_each_refusal_names_its_reason(
    adapters: Adapters, fields: dict[str, object], code: str, words: list[str]
) -> None:
    with pytest.raises(AdapterUnavailable) as caught:
        await adapters.prepare(job(**fields))
    assert caught.value.code == code
    assert str(caught.value).startswith(f"{code}: ")
    for word in words:
        assert word in str(caught.value)
    # nothing partial or wrong is left in the cache
    assert not list(adapters.settings.cache_dir.glob(".part-*"))
    assert not any("5550" in p.name for p in adapters.settings.cache_dir.iterdir())
    bad = hashlib.sha256(ENTRIES[4].data).hexdigest()
    assert not (adapters.settings.cache_dir / f"{bad}.safetensors").exists()


def _accepting(adapters: Adapters) -> bool:
    # (a call: mypy would narrow a property it saw asserted)
    return adapters.accepting


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_unreachable_api_is_a_download_failure_and_a_pause(tmp_path: Path) -> None:
    with standin(list(ENTRIES)) as server:
        url = server.url
        made = await Adapters.create(settings(url, tmp_path))
        clock = FakeClock()
        made.backoff = Backoff(clock, first=30, cap=100)
        await made.prepare(job(loras=[{"name": "111"}]))
    try:
        assert _accepting(made)
        for pause in (30, 60, 100, 100):  # doubling up to the cap
            with pytest.raises(AdapterUnavailable, match="^download_failed: .*unreachable"):
                await made.prepare(job(loras=[{"name": "222"}]))
            # no LoRA jobs are taken for a while; plain ones go on (ImageWorker.offer)
            assert not _accepting(made)
            clock.now += pause - 1
            assert not _accepting(made)
            clock.now += 1
            assert _accepting(made)
        # a job prepared again ends the pause (Adapters.prepare)
        made.backoff.failed()
        made.backoff.succeeded()
        assert _accepting(made) and made.backoff.pause == 0
    finally:
        await made.aclose()


async def test_the_cache_evicts_the_least_recently_used_but_never_the_jobs_own(
    civitai: CivitaiStandIn, tmp_path: Path
) -> None:
    files = [fake_safetensors(600 * 1024, i) for i in range(4)]
    civitai.entries[:] = [
        Entry(10 + i, f"L{i}", "LORA", 100 + i, data) for i, data in enumerate(files)
    ]
    made = await Adapters.create(settings(civitai.url, tmp_path, cache_bytes=2 * 2**20))
    try:
        cache = made.settings.cache_dir
        first = (await made.prepare(job(loras=[{"name": "10"}]))).request.loras[0].path
        second = (await made.prepare(job(loras=[{"name": "11"}]))).request.loras[0].path
        third = (await made.prepare(job(loras=[{"name": "12"}]))).request.loras[0].path
        # make the first the most recently used, then need room: the second goes
        old = os.stat(second).st_mtime - 100
        os.utime(second, (old, old))
        os.utime(third, (old + 1, old + 1))
        await made.prepare(job(loras=[{"name": "10"}]))
        await made.prepare(job(loras=[{"name": "13"}]))
        assert _exists(first, third) and not _exists(second)
        total = sum(p.stat().st_size for p in cache.glob("*.safetensors"))
        assert total <= 2 * 2**20
        # one job's own files are never evicted for each other, even over the cap
        both = await made.prepare(job(loras=[{"name": "11"}, {"name": "12"}, {"name": "13"}]))
        assert _exists(*(lora.path for lora in both.request.loras))
    finally:
        await made.aclose()


def test_civitai_base_models_map_to_our_baselines() -> None:
    assert baseline_of("SD 1.5") == "sd1"
    assert baseline_of("SD 2.1") == "sd2"
    assert {baseline_of(b) for b in ("SDXL 1.0", "Pony", "Illustrious")} == {"sdxl"}
    assert baseline_of("Flux.1 D") is None
    assert set(CIVITAI_BASELINES.values()) == set(BASELINES)
