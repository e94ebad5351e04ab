"""The `--unsandboxed` flag every worker command has, and the start-up check behind it.

Workers confine the code that touches strangers' data (sandbox.confine). When this machine
cannot confine it, a worker says exactly what is missing and how to get it, and exits,
unless its owner passed `--unsandboxed`: then it runs anyway, warns loudly, and tells the
coordinator (the engine info's `sandboxed: false`), whose operator may refuse such workers.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Annotated

from protocol.settings import Flag

if TYPE_CHECKING:
    from worker.common.link import CoordinatorLink

__all__ = ["Unsandboxed", "confinement_allowed", "report_confinement"]

log = logging.getLogger(__name__)

_WARNING = (
    "WARNING: running UNSANDBOXED (--unsandboxed): code handling strangers' jobs runs with "
    "this user's files, credentials and network. Only do this on a machine you would "
    "hand to a stranger. The coordinator and requesters are told."
)


# the `--unsandboxed` setting of every worker command (protocol.settings)
Unsandboxed = Annotated[
    bool,
    Flag(
        "run without confinement when this machine cannot provide it (unsafe; "
        "reported to the coordinator)"
    ),
]


def confinement_allowed(unsandboxed: bool) -> bool:
    """True when the worker may start: confinement works here, or the owner waived it
    (then the warning is printed). False after printing what is missing and the fix."""
    from sandbox.confine import check_confinement

    if unsandboxed:
        print(_WARNING, file=sys.stderr, flush=True)
        log.warning("running unsandboxed at the owner's request (--unsandboxed)")
        return True
    readiness = check_confinement()
    if readiness.ready:
        return True
    print("error: this worker cannot confine the code it runs for strangers:", file=sys.stderr)
    for problem in readiness.problems:
        print(f"  - {problem}", file=sys.stderr)
    print(
        "Fix that and start again (`idlegrid worker doctor` checks it), or pass --unsandboxed "
        "to run unconfined at your own risk.",
        file=sys.stderr,
    )
    return False


async def report_confinement(link: CoordinatorLink, engine: str, unsandboxed: bool) -> None:
    """Tell the coordinator whether this worker's compute runs confined (its engine info);
    a coordinator with --require-sandbox answers 403 to an unconfined one."""
    from worker.errors import CoordinatorRejected, CoordinatorUnavailable

    try:
        await link.report_engine({"engine": engine, "sandboxed": not unsandboxed})
    except CoordinatorUnavailable as exc:
        log.warning("could not report the engine to the coordinator: %s", exc)
    except CoordinatorRejected as exc:
        if exc.status == 403:
            raise
        log.warning("the coordinator did not take the engine report: %s", exc)
