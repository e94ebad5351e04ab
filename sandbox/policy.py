"""What a sandboxed engine may see and use: environment, working directory, limits, time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = ["DEFAULT_POLICY", "RESERVED_ENV", "SandboxPolicy"]

# Set by the sandbox itself (see `SandboxPolicy.child_env`); a policy may not override
# them, because the private workdir and the unbuffered stderr are what the rest relies on.
RESERVED_ENV = frozenset({"HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"})


def _empty_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SandboxPolicy:
    """Restrictions for one sandboxed engine; the defaults suit a diffusers engine."""

    # Variables copied from the parent's environment. Everything else (API keys, tokens,
    # proxy credentials, PYTHONPATH) is scrubbed so an engine cannot read the worker's secrets.
    env_allow: tuple[str, ...] = (
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "HF_HUB_OFFLINE",
    )
    # Set in the child after scrubbing and after env_allow, e.g. {"HF_HUB_OFFLINE": "1"}.
    # Stored as a read-only copy; not part of the hash (a mapping is not hashable).
    extra_env: Mapping[str, str] = field(default_factory=_empty_env, hash=False)
    # A private working dir is made under here (tempfile.mkdtemp) and removed by aclose();
    # it is the child's cwd and HOME. None = the system temp dir.
    workdir_root: Path | None = None
    # RLIMIT_AS of the child. None = unlimited, because torch and CUDA map far more
    # virtual memory than they use, so any useful cap is model-specific.
    memory_bytes: int | None = None
    # RLIMIT_CPU: CPU seconds over the child's whole life, model loading included; reaching
    # it kills the child (EngineCrashed) and the next call starts a fresh one. None = unlimited.
    cpu_seconds: int | None = None
    # RLIMIT_NOFILE (soft and hard) of the child.
    open_files: int = 1024
    # RLIMIT_FSIZE: the largest file the child may write (4 GiB). None = unlimited.
    file_size_bytes: int | None = 2**32
    # Seconds for the child to import and construct the engine; loading a model is slow.
    start_timeout: float = 300.0
    # Default per-call timeout in seconds (Sandbox.call's `timeout` overrides it).
    job_timeout: float = 600.0
    # Seconds aclose() waits for the child to exit after asking it to, before killing it.
    shutdown_timeout: float = 5.0
    # Largest frame either side may send (header plus blobs); guards the parent against a
    # runaway engine and gives an oversized result a clear error instead of a stall.
    max_frame_bytes: int = 256 * 2**20
    # Command prefix (e.g. a profiler or `nice`); the child command line, bubblewrap's
    # included, is appended to it. Empty = nothing before it.
    wrapper: tuple[str, ...] = ()
    # Confine the child (sandbox.confine): its own user, pid, mount, ipc, uts and network
    # namespaces, a seccomp filter, no_new_privs, and a filesystem holding only /usr, the
    # Python environment, `packages`, `read_only` and a private tmpfs workdir. Without it
    # the child shares the worker's user, files and network: only for `--unsandboxed`.
    confine: bool = True
    # Paths the engine may read (the model folder, a config folder), bound read-only.
    read_only: tuple[Path, ...] = ()
    # Top-level packages the child imports, bound read-only where they are not already
    # inside the Python environment (editable installs). The engine's own package is added.
    packages: tuple[str, ...] = ("sandbox", "protocol")
    # Keep the network (only for engines that must reach peers; the image engine never does).
    network: bool = False
    # Size of the private tmpfs workdir (also /tmp): what the engine may write in all.
    disk_bytes: int = 2**30
    # RLIMIT_NPROC inside the sandbox: processes and threads (torch starts one per core).
    # None = unlimited.
    processes: int | None = 1024

    def __post_init__(self) -> None:
        for name in (*self.env_allow, *self.extra_env):
            if name in RESERVED_ENV:
                raise ValueError(
                    f"SandboxPolicy may not set {name!r}: the sandbox sets it itself; "
                    f"remove it from env_allow/extra_env (reserved: {sorted(RESERVED_ENV)})"
                )
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"SandboxPolicy: {name!r} is not a valid environment name")
        for name, value in self.extra_env.items():
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"SandboxPolicy.extra_env[{name!r}] must be a str without NUL")
        for attr in ("start_timeout", "job_timeout", "open_files", "max_frame_bytes", "disk_bytes"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"SandboxPolicy.{attr} must be > 0, got {getattr(self, attr)}")
        if self.shutdown_timeout < 0:
            raise ValueError(
                f"SandboxPolicy.shutdown_timeout must be >= 0, got {self.shutdown_timeout}"
            )
        for attr in ("memory_bytes", "cpu_seconds", "file_size_bytes", "processes"):
            value = getattr(self, attr)
            if value is not None and value <= 0:
                raise ValueError(
                    f"SandboxPolicy.{attr} must be > 0 or None (unlimited), got {value}"
                )
        for path in self.read_only:
            if not Path(path).is_absolute():
                raise ValueError(f"SandboxPolicy.read_only: {str(path)!r} must be an absolute path")
        # A private copy, so a caller mutating its dict later cannot change a running policy.
        object.__setattr__(self, "extra_env", MappingProxyType(dict(self.extra_env)))

    def child_env(self, parent_env: Mapping[str, str], workdir: Path) -> dict[str, str]:
        """The complete environment of the child: allowed variables, extras, then ours."""
        env = {name: parent_env[name] for name in self.env_allow if name in parent_env}
        env.update(self.extra_env)
        env.update(
            HOME=str(workdir),
            TMPDIR=str(workdir / "tmp"),
            PYTHONDONTWRITEBYTECODE="1",
            # Engine logs go to the inherited stderr; unbuffered so they interleave in order.
            PYTHONUNBUFFERED="1",
        )
        return env


DEFAULT_POLICY = SandboxPolicy()
