"""The Python SDK and the `idlegrid` command line.

api/            the typed client of the coordinator's API: routes, transports, faces
                (shared with the worker, whose link is a face of it)
sdk.py          AsyncClient and Client (faces of api/): accounts, submit, stream, download
follow.py       following a job through coordinator restarts: streams, backoff, patience
cli.py          `idlegrid` and its client subcommands; plugs in the others
loras_cli.py    `generate --lora/--ti`
chat_cli.py     `idlegrid chat` and `idlegrid complete`
image_extras.py `idlegrid generate`'s flags for the hires fix, upscalers and face fixers
progress.py     live progress line on a terminal
preview_file.py `generate --preview FILE`: the latest live preview, replaced atomically
credentials.py  saved API keys per coordinator
errors.py       ClientError and its subclasses
"""

from client.errors import ApiError, ClientError, JobFailed, WaitTimeout
from client.sdk import AsyncClient, Client, GenerationResult

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientError",
    "GenerationResult",
    "JobFailed",
    "WaitTimeout",
]
