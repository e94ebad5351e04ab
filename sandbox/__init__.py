"""Runs an inference engine in a restricted child process and talks to it over pipes.

    errors.py   the error tree (SandboxError and its subclasses)
    policy.py   SandboxPolicy: environment, workdir, resource limits, timeouts, wrapper
    engine.py   Engine (the protocol a hosted engine implements) and EngineResult
    calls.py    typed calls (protocol.engine.EngineCall) on both ends: CallTable for the
                engine, parse_message and CallResult for `Sandbox.run`
    channel.py  framing of the pipe: typed JSON headers plus binary blobs, no pickle
    process.py  ChildProcess: one child's lifetime (spawn, handshake, request, kill)
    sandbox.py  Sandbox: the public object; one call at a time, restarts after crashes
    child.py    the child's entry point, `python -m sandbox.child`

Usage:

    async with await Sandbox.create("worker.image.engine:ImageEngine", options) as sb:
        result = await sb.call("image", payload, on_progress=report)   # JSON dicts
        result = await sb.run(IMAGE, params, on_progress=report)         # typed messages

Imports only the standard library, pydantic and `protocol`: never torch or the engines themselves,
which exist only inside the child.
"""

from sandbox.calls import CallResult, CallTable
from sandbox.engine import Engine, EngineResult
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox

__all__ = ["CallResult", "CallTable", "Engine", "EngineResult", "Sandbox", "SandboxPolicy"]
