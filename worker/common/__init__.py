"""What every worker service shares.

    link.py       HTTP link to the coordinator (and retrying while it is away)
    identity.py   the Ed25519 identity file, locked by one process
    service.py    the pop-and-serve loop, run until SIGINT/SIGTERM
    cli.py        flags and start-up steps shared by the `idlegrid worker KIND` commands

Nothing here imports torch, the image engine or the LLM code.
"""

__all__: list[str] = []
