"""Issue 26, "every input bounded, never a 500": a property-based fuzz run over every route
of the coordinator's OpenAPI document (GET /api/v1/openapi.json), with schemathesis.

A real coordinator runs in its own process (rate limits opened wide, so that the fuzzer
reaches the handlers); every operation gets valid and invalid requests generated from its
schema (bodies, path and query parameters, headers), sent with a registered API key and a
registered worker's token; no answer may be a 5xx and the log may hold no traceback. About
a minute in all: EXAMPLES per operation and mode.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Err, Ok

from coordinator.config import DEFAULT_RATE_LIMITS
from protocol.signing import Identity
from tests.fakes import register_accounts
from tests.procs import Proc
from worker.common.link import CoordinatorLink

# generated requests per operation and mode (valid, invalid)
EXAMPLES = 8
# long-polls (pops wait 10 s when they name no `wait`) would hold a case for up to a minute
NO_WAIT = 0.0


async def _credentials(url: str) -> dict[str, str]:
    (key,) = await register_accounts(url, "fuzzer")
    link = CoordinatorLink(url, Identity.generate(), "fuzz-worker", key)
    try:
        await link.register()
        token = link.token
    finally:
        await link.aclose()
    assert token is not None
    return {"apikey": key, "X-Worker-Token": token}


@pytest.fixture
def coordinator(tmp_path: Path) -> Any:
    wide = [f"--rate-limit={scope}=1000/100000,1000/100000" for scope in DEFAULT_RATE_LIMITS]
    proc = Proc(
        ["coordinator", "--port", "0", "--data-dir", str(tmp_path / "data"), *wide],
        tmp_path / "coordinator.log",
    )
    try:
        url = proc.wait_for(r"listening on (http://\S+)", 60).group(1)
        yield proc, url
    finally:
        proc.stop()


def test_no_route_answers_5xx(coordinator: tuple[Proc, str]) -> None:
    proc, url = coordinator
    headers = asyncio.run(_credentials(url))
    schema = schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")
    results = list(schema.get_all_operations())
    unreadable = [result.err() for result in results if isinstance(result, Err)]
    assert not unreadable, unreadable  # a route the fuzzer cannot read fails the test
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) > 40, [op.label for op in operations]
    run_seed = random.randrange(2**32)
    print(f"fuzz seed {run_seed}")
    failures: list[str] = []
    with requests.Session() as session:
        for operation in operations:
            strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
                GenerationMode.NEGATIVE
            )

            @seed(run_seed)
            @settings(
                max_examples=2 * EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            )
            @given(case=strategy)
            def fuzz(case: Any) -> None:
                if isinstance(case.body, dict) and case.path.endswith("/pop"):
                    case.body["wait"] = NO_WAIT
                response = case.call(base_url=url, session=session, headers=headers, timeout=30)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path}: {response.status_code} "
                    f"{response.text[:500]}"
                )

            try:
                fuzz()
            except AssertionError as exc:
                failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n".join(failures)
    assert "Traceback" not in proc.output(), proc.output()[-5000:]
