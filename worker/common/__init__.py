"""What every worker service shares.

    link.py       link to the coordinator: a face of the typed client (client.api); retrying
    identity.py   the Ed25519 identity file, locked by one process
    service.py    the pop-and-serve loop, run until SIGINT/SIGTERM (the first one drains)
    donor.py      donor controls: idle-only, schedule, jobs per hour (the gate before a pop)
    status.py     the running worker's state: status file and live terminal line
    controls_cli.py  donor-control settings and `idlegrid worker status`
    cli.py        settings and start-up steps shared by the `idlegrid worker KIND` commands
    config_file.py   `--config FILE` (TOML) and IDLEGRID_WORKER_* variables for them
    sandboxing.py    the `--unsandboxed` setting and the confinement check at start-up

Nothing here imports torch, the image engine or the LLM code.
"""

__all__: list[str] = []
