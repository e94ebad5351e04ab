"""`idlegrid worker doctor`: can this machine serve jobs? One row per check, each with a fix.

A donor's first run fails for reasons that are easy to name and tedious to find: a CPU-only
torch build on a GPU machine, no bubblewrap, a coordinator of another release, a clock that
is minutes off, a full disk, pickle weights. The doctor looks at each without starting a
worker, and says PASS, WARN (works, but worse than it could) or FAIL (a worker would not
run, or should not) with a one-line fix. It exits 1 when anything FAILs.

Time is compared against the coordinator's HTTP `Date` header only: that is the clock the
worker has to agree with, and it needs no other service.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import functools
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

from worker.common.config_file import add_config_flag, read_config_file

__all__ = [
    "Check",
    "ModelRules",
    "add_doctor_command",
    "check_coordinator",
    "check_device",
    "check_disk",
    "check_model",
    "check_sandbox",
    "compatible",
    "render",
]

Status = Literal["PASS", "WARN", "FAIL"]


class _ModelSource(Protocol):
    @property
    def kind(self) -> str: ...


# clock skew against the coordinator beyond which a row WARNs / FAILs (seconds)
SKEW_WARN = 5.0
SKEW_FAIL = 60.0
# free space below which a disk row WARNs (bytes): an SD 1.5 model alone is ~4 GiB
DISK_WARN = 10 * 2**30
COORDINATOR_TIMEOUT = 10.0
_GIB = 2**30
_PICKLE_HINT = (
    "convert the weights to .safetensors on a trusted machine (e.g. "
    "`safetensors.torch.save_file`), or download the model's safetensors variant"
)


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    check: str
    status: Status
    detail: str
    # what to do about it; empty when nothing needs doing
    fix: str = ""


def add_doctor_command(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser], rules: ModelRules
) -> None:
    doctor = kinds.add_parser(
        "doctor",
        help="check this machine before serving: torch and device, sandbox, coordinator, "
        "clock, disk, model",
        description="Check whether this machine can serve jobs. Prints one row per check "
        "(PASS, WARN or FAIL, with a fix) and exits 1 if anything FAILs.",
    )
    doctor.add_argument("--coordinator", help="coordinator URL to check (default: not checked)")
    doctor.add_argument(
        "--model", help="model to check: a folder, .safetensors file or Hugging Face id"
    )
    doctor.add_argument(
        "--model-config", type=Path, help="diffusers config folder for a single-file --model"
    )
    doctor.add_argument("--json", action="store_true", help="print a machine-readable list")
    add_config_flag(doctor, kinds)
    doctor.set_defaults(run=functools.partial(_run, rules=rules))


def _run(args: argparse.Namespace, rules: ModelRules) -> int:
    coordinator: str | None = args.coordinator
    models: list[tuple[str, Path | None]] = []
    if args.model:
        models.append((args.model, args.model_config))
    if args.config is not None:
        # what the worker commands' sections name is checked too
        named, coordinators = _named_in_sections(args.config)
        models.extend(entry for entry in named if entry not in models)
        coordinator = coordinator or next(iter(coordinators), None)
    checks = check_device()
    checks.append(check_sandbox())
    if coordinator:
        checks.extend(asyncio.run(check_coordinator(coordinator)))
    else:
        checks.append(
            Check("coordinator", "WARN", "not checked", "pass --coordinator URL to check it")
        )
    checks.extend(check_disk(_disk_paths()))
    checks.extend(check_model(spec, config_dir, rules) for spec, config_dir in models)
    if args.json:
        print(json.dumps([asdict(check) for check in checks], indent=2))
    else:
        print(render(checks))
    return 1 if any(check.status == "FAIL" for check in checks) else 0


def _named_in_sections(path: Path) -> tuple[list[tuple[str, Path | None]], list[str]]:
    """The models (with their --model-config) and coordinators in the file's [image],
    [blocks] and [gateway] sections."""
    data = read_config_file(path)  # (already read and checked while parsing the flags)
    top = {key.replace("_", "-"): value for key, value in data.items()}
    models: list[tuple[str, Path | None]] = []
    coordinators: list[str] = []
    for section in ("image", "blocks", "gateway"):
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        values = {key.replace("_", "-"): value for key, value in table.items()}
        model = values.get("model")
        config = values.get("model-config", top.get("model-config"))
        if isinstance(model, str):
            entry = (model, Path(config).expanduser() if isinstance(config, str) else None)
            if entry not in models:
                models.append(entry)
        if isinstance(values.get("coordinator"), str):
            coordinators.append(values["coordinator"])
    return models, coordinators


def render(checks: list[Check]) -> str:
    """An aligned table; each row's fix on the line below it."""
    width = max(len(check.check) for check in checks)
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for check in checks:
        lines.append(f"{check.status:<6}  {check.check:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':<6}  {'':<{width}}  fix: {check.fix}")
    return "\n".join(lines)


# -- torch and the device -----------------------------------------------------------------


def check_device() -> list[Check]:
    """torch: importable, its version; the device jobs would run on."""
    try:
        import torch
    except ImportError as exc:
        return [
            Check(
                "torch",
                "FAIL",
                f"cannot import torch: {exc}",
                "install idlegrid's dependencies (README: Install), with the torch build "
                "for your GPU",
            )
        ]
    checks = [Check("torch", "PASS", f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        kind = "ROCm" if torch.version.hip else "CUDA"
        properties = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        more = f" (+{count - 1} more)" if count > 1 else ""
        checks.append(
            Check(
                "device",
                "PASS",
                f"{kind}: {properties.name}, {properties.total_memory / _GIB:.1f} GiB VRAM{more}",
            )
        )
        return checks
    if torch.backends.mps.is_available():
        checks.append(Check("device", "PASS", "Apple MPS"))
        return checks
    import psutil

    cpu = f"CPU: {os.cpu_count() or '?'} cores, {psutil.virtual_memory().total / _GIB:.1f} GiB RAM"
    gpu = next((node for node in ("/dev/nvidia0", "/dev/kfd") if os.path.exists(node)), None)
    if gpu is not None:
        checks.append(
            Check(
                "device",
                "WARN",
                f"{cpu}; but {gpu} exists: this torch build cannot use the GPU",
                "install the torch build for your GPU (CUDA or ROCm; README: Install)",
            )
        )
    else:
        checks.append(Check("device", "PASS", f"{cpu} (no GPU: jobs run slowly)"))
    return checks


# -- the sandbox --------------------------------------------------------------------------


def check_sandbox() -> Check:
    """Whether engines can be confined (a real probe, see sandbox.confine)."""
    from sandbox.confine import check_confinement

    readiness = check_confinement()
    if readiness.ready:
        return Check("sandbox", "PASS", f"engines are confined with bubblewrap ({readiness.bwrap})")
    # each problem already names its fix
    return Check("sandbox", "FAIL", "engines cannot be confined", "; ".join(readiness.problems))


# -- the coordinator and the clock --------------------------------------------------------


def compatible(ours: str, theirs: str) -> bool:
    """Same major release (and, before 1.0, the same minor): the wire format may change
    between those, never within one."""
    try:
        mine = [int(part) for part in ours.split(".")[:2]]
        other = [int(part) for part in theirs.split(".")[:2]]
    except ValueError:
        return False
    if len(mine) < 2 or len(other) < 2:
        return False
    return mine[0] == other[0] and (mine[0] > 0 or mine[1] == other[1])


async def check_coordinator(url: str, wait: float = COORDINATOR_TIMEOUT) -> list[Check]:
    """`GET /healthz`: reachable, its release compatible with ours, its clock near ours."""
    from pydantic import ValidationError

    from client.api import AsyncApi, routes
    from protocol.version import VERSION
    from worker.common.link import WorkerErrors
    from worker.errors import CoordinatorUnavailable

    probe = routes.health()
    async with AsyncApi(url, None, WorkerErrors(), timeout=wait, connect_timeout=wait) as api:
        request = api.core.prepare(probe.request)
        health_url = request.url
        try:
            sent = time.time()
            response = await api.exchange(request)
            received = time.time()
        except CoordinatorUnavailable as exc:
            # what the transport met (the network's error), else the timeout
            cause = exc.__cause__ or exc
            cause = cause.__cause__ or cause
            return [
                Check(
                    "coordinator",
                    "FAIL",
                    f"cannot reach {health_url}: {cause or type(cause).__name__}",
                    "check the URL (--coordinator), that the coordinator runs, and the network "
                    "or firewall in between",
                )
            ]
    body, date, status = response.content, response.headers.get("Date"), response.status
    if status != 200:
        return [
            Check(
                "coordinator",
                "FAIL",
                f"{health_url} answered HTTP {status}",
                "check that the URL points at an idlegrid coordinator that is ready",
            )
        ]
    try:
        health = probe.decode(body)
    except ValidationError:
        return [
            Check(
                "coordinator",
                "FAIL",
                f"{health_url} did not answer like an idlegrid coordinator",
                "check that the URL points at an idlegrid coordinator",
            )
        ]
    if compatible(VERSION, health.version):
        checks = [Check("coordinator", "PASS", f"{url}: idlegrid {health.version}")]
    else:
        checks = [
            Check(
                "coordinator",
                "FAIL",
                f"{url} runs idlegrid {health.version}; this worker is {VERSION}",
                f"install idlegrid {health.version} on this machine (or ask the operator "
                "which release to use)",
            )
        ]
    checks.append(_clock(date, (sent + received) / 2))
    return checks


def _clock(date: str | None, local: float) -> Check:
    when = None
    if date:
        try:
            when = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            when = None
    if when is None or when.tzinfo is None:
        return Check(
            "clock",
            "WARN",
            "the coordinator sent no usable Date header: clock not compared",
            "check the system clock by hand",
        )
    # Date has whole seconds: the coordinator's clock read somewhere in [date, date + 1)
    skew = when.timestamp() + 0.5 - local
    detail = f"{abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the coordinator"
    fix = "synchronise the system clock (e.g. `sudo timedatectl set-ntp true`)"
    if abs(skew) > SKEW_FAIL:
        return Check("clock", "FAIL", detail, fix)
    if abs(skew) > SKEW_WARN:
        return Check("clock", "WARN", detail, fix)
    return Check("clock", "PASS", f"within {SKEW_WARN:.0f} s of the coordinator")


# -- disk ---------------------------------------------------------------------------------


def _disk_paths() -> list[tuple[str, Path]]:
    """Where models and caches go: the Hugging Face cache and idlegrid's data dir."""
    home = Path.home()
    hf_home = Path(os.environ.get("HF_HOME") or home / ".cache" / "huggingface")
    data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "idlegrid"
    return [("model cache", hf_home), ("data dir", data)]


def check_disk(paths: list[tuple[str, Path]], warn_below: int = DISK_WARN) -> list[Check]:
    """Free space on each filesystem that holds one of `paths` (one row per filesystem)."""
    checks: list[Check] = []
    # filesystem -> (free bytes, "label path" of each path on it)
    filesystems: dict[int, tuple[int, list[str]]] = {}
    for label, path in paths:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            device = existing.stat().st_dev
            free = shutil.disk_usage(existing).free
        except OSError as exc:
            checks.append(
                Check("disk", "WARN", f"cannot read {path}: {exc}", "check its permissions")
            )
            continue
        filesystems.setdefault(device, (free, []))[1].append(f"{label} {path}")
    for free, where in filesystems.values():
        detail = f"{free / _GIB:.1f} GiB free for {', '.join(where)}"
        if free < warn_below:
            fix = (
                "free space there (a model needs several GiB), or set HF_HOME / XDG_DATA_HOME "
                f"to a disk with {warn_below / _GIB:.0f} GiB or more free"
            )
            checks.append(Check("disk", "WARN", detail, fix))
        else:
            checks.append(Check("disk", "PASS", detail))
    return checks


# -- the model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRules:
    """How the workers judge a model, handed down by `worker.main`: worker.common sits below
    the services and may not import them (the import-linter layers)."""

    # the image worker's `resolve_model` (worker.image.model_source)
    resolve: Callable[[str, Path | None], _ModelSource]
    # suffixes of pickle-based weight files, which a worker never loads
    pickle_suffixes: frozenset[str]


def check_model(spec: str, config_dir: Path | None, rules: ModelRules) -> Check:
    """The checks a worker makes before loading `spec`: safetensors only, complete."""
    from worker.errors import ModelError, UnsafeWeights

    path = Path(spec).expanduser()
    row = f"model ({spec})"
    try:
        if path.is_dir() and not (path / "model_index.json").is_file():
            detail = _check_llm_folder(path, rules.pickle_suffixes)
        else:
            detail = {
                "folder": "diffusers folder with safetensors weights",
                "single_file": "single .safetensors file with its config folder",
                "hub": "Hugging Face id: only its safetensors files are downloaded",
            }.get(rules.resolve(spec, config_dir).kind, "usable")
    except UnsafeWeights as exc:
        return Check(row, "FAIL", f"pickle-based weights, never loaded: {exc}", _PICKLE_HINT)
    except ModelError as exc:
        return Check(row, "FAIL", str(exc), "pass --model a model folder or a .safetensors file")
    return Check(row, "PASS", detail)


def _check_llm_folder(path: Path, pickle_suffixes: frozenset[str]) -> str:
    """A folder without model_index.json: an LLM folder (config.json, safetensors weights
    as `model.safetensors` or shards named by `model.safetensors.index.json`)."""
    from worker.errors import ModelNotFound, UnsafeWeights

    safe = list(path.rglob("*.safetensors"))
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix.lower() in pickle_suffixes)
    if pickles and not safe:
        raise UnsafeWeights(
            f"refusing pickle-based weights in {path} ({', '.join(pickles[:3])}): they can run "
            "code when loaded"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{path} is neither a diffusers folder (model_index.json) nor an LLM folder "
            "(config.json)"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelNotFound(f"{index} is unreadable ({exc}): download it again") from None
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise ModelNotFound(
            f"{path} has neither model.safetensors nor model.safetensors.index.json"
        )
    for name in names:
        _read_safetensors_header(path / name)
    return f"LLM folder with safetensors weights ({len(names)} file{'s' * (len(names) > 1)})"


def _read_safetensors_header(path: Path) -> None:
    """Read a safetensors file's JSON header: catches missing and truncated downloads."""
    from worker.errors import ModelNotFound

    try:
        with path.open("rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            header = file.read(size) if size < 2**27 else b""
        if not isinstance(json.loads(header), dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as exc:
        raise ModelNotFound(f"{path} is missing or damaged ({exc}): download it again") from None
