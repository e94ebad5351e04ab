"""Confinement of an engine process with bubblewrap: namespaces, a minimal filesystem, seccomp.

Why bubblewrap rather than our own namespace code: it is a small, audited setuid-free tool
(Flatpak's sandbox) that does the fiddly, order-sensitive parts right: a new root on a
tmpfs with only the named paths bound in, its own /proc and /dev, pid 1 reaping and
taking every process with it when the engine exits, `--die-with-parent`, dropping
capabilities, `no_new_privs`, and loading our seccomp program (sandbox.seccomp) just before
the engine starts. Doing that by hand in Python would mean forking into a new user
namespace, writing uid maps and pivoting roots ourselves; one mistake there is an escape.

An engine sees: /usr (and the /bin, /lib... links to it), the Python installation and
environment it runs from, the directories of the packages it imports, the read-only
paths its policy names (the model), GPU device nodes if there are any, its own /proc,
a minimal /dev, and its working directory, a size-capped tmpfs that also serves as /tmp.
It does not see the donor's home, the worker's identity or key files, other processes, or
any network (not even loopback) unless its policy grants the network.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandbox.seccomp import filter_program, supported

__all__ = [
    "BWRAP_ENV",
    "PidsCgroup",
    "Readiness",
    "bwrap_argv",
    "check_confinement",
    "package_dirs",
    "seccomp_pipe",
]

logger = logging.getLogger(__name__)

# names a bubblewrap binary to use instead of the one on PATH
BWRAP_ENV = "IDLEGRID_BWRAP"
# small files of /etc that programs read at start (the dynamic loader, time zone,
# Debian's alternatives links, e.g. for the BLAS library numpy loads)
_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
# where the root directory's usual links point on merged-/usr systems
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# GPU device nodes: NVIDIA, AMD (ROCm) and DRM render nodes
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/kfd")
_GPU_DEVICE_GLOBS = ("nvidia[0-9]*", "dri")
_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: "
    "`sudo dnf install bubblewrap`; Arch: `sudo pacman -S bubblewrap`)"
)


@dataclass(frozen=True)
class Readiness:
    """Whether engines can be confined here, and if not, what is missing and the fix."""

    bwrap: str | None
    problems: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        return "; ".join(self.problems)


def find_bwrap() -> str | None:
    named = os.environ.get(BWRAP_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def check_confinement() -> Readiness:
    """Try it: start `python -c pass` confined as an engine would be (cached per process)."""
    if not sys.platform.startswith("linux"):
        return Readiness(
            None,
            (
                f"engine confinement needs Linux namespaces; this is {sys.platform}: run the "
                "worker in a Linux VM or container, or pass --unsandboxed at your own risk",
            ),
        )
    if not supported():
        return Readiness(
            None,
            (
                f"no seccomp syscall table for the {platform.machine()} architecture (x86_64 "
                "and aarch64 are supported); pass --unsandboxed at your own risk",
            ),
        )
    bwrap = find_bwrap()
    if bwrap is None:
        where = os.environ.get(BWRAP_ENV) or "PATH"
        return Readiness(None, (f"bubblewrap (bwrap) is not on {where}: {_INSTALL_HINT}",))
    workdir = Path(tempfile.mkdtemp(prefix="idlegrid-probe-"))
    read_end = seccomp_pipe()
    try:
        argv = bwrap_argv(
            bwrap, workdir, read_only=(), packages=(), network=False, disk_bytes=2**20
        )
        probe = subprocess.run(
            [*argv, "--seccomp", str(read_end), sys.executable, "-I", "-c", "pass"],
            pass_fds=(read_end,),
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Readiness(bwrap, (f"{bwrap} could not be run: {exc}; {_INSTALL_HINT}",))
    finally:
        os.close(read_end)
        shutil.rmtree(workdir, ignore_errors=True)
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        if not any(word in said for word in ("namespace", "not permitted", "uid map")):
            return Readiness(bwrap, (f"bubblewrap cannot create the sandbox here: {said}",))
        return Readiness(
            bwrap,
            (
                f"bubblewrap cannot create the sandbox here ({said}): unprivileged user "
                "namespaces are probably disabled; enable them (`sudo sysctl -w "
                "kernel.unprivileged_userns_clone=1`, or on Ubuntu 24.04+ "
                "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), or when "
                "running in a container allow them (e.g. Docker's --security-opt "
                "seccomp=unconfined)",
            ),
        )
    return Readiness(bwrap, ())


def seccomp_pipe() -> int:
    """The read end of a pipe holding the seccomp program, for `bwrap --seccomp FD`: pass
    it to the child, and close it once the child is started."""
    program = filter_program()
    read_end, write_end = os.pipe()
    try:
        # a few hundred bytes: far below a pipe's buffer, so this never blocks
        os.write(write_end, program)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def package_dirs(names: Iterable[str]) -> list[Path]:
    """The directories holding these top-level packages (found without importing them)."""
    found: list[Path] = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"package {name!r} is not installed", name=name)
        if spec.submodule_search_locations:
            found.extend(Path(p).resolve() for p in spec.submodule_search_locations)
        elif spec.origin:
            found.append(Path(spec.origin).resolve())
    return found


def _python_dirs() -> list[Path]:
    dirs = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    dirs.add(Path(sys.executable).resolve().parent.parent)
    return sorted(p.resolve() for p in dirs)


def _gpu_devices() -> list[str]:
    found = [path for path in _GPU_DEVICES if os.path.exists(path)]
    dev = Path("/dev")
    for pattern in _GPU_DEVICE_GLOBS:
        found.extend(str(path) for path in sorted(dev.glob(pattern)))
    return found


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def bwrap_argv(
    bwrap: str,
    workdir: Path,
    *,
    read_only: Iterable[Path],
    packages: Iterable[Path],
    network: bool,
    disk_bytes: int,
) -> list[str]:
    """The bubblewrap command line up to (not including) `--seccomp FD` and the command.

    /tmp is a tmpfs of at most `disk_bytes`; `workdir` (cwd and HOME, with TMPDIR in
    `workdir/tmp`) is made on it when it lies under /tmp, else it is a tmpfs of its own
    of the same size. `read_only` and `packages` are bound read-only at their own paths.
    """
    argv = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--hostname",
        "sandbox",
    ]
    if not network:
        argv.append("--unshare-net")
    # /tmp is a tmpfs of its own (programs such as hivemind's p2p daemon put sockets there);
    # a workdir under /tmp (the usual case) lies on the same tmpfs, so one quota holds both.
    # Mounted first: what is bound later (a model under /tmp) goes on top of it.
    argv += ["--size", str(disk_bytes), "--tmpfs", "/tmp"]
    if Path("/tmp") not in workdir.parents:
        argv += ["--size", str(disk_bytes), "--tmpfs", str(workdir)]
    argv += ["--dir", str(workdir), "--dir", str(workdir / "tmp")]
    argv += ["--ro-bind", "/usr", "/usr"]
    for link in _ROOT_LINKS:
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    for etc in _ETC:
        argv += ["--ro-bind-try", etc, etc]
    bound: list[Path] = [Path("/usr")]
    for path in [*_python_dirs(), *packages, *read_only]:
        resolved = path.resolve()
        if _inside(resolved, bound):
            continue
        bound.append(resolved)
        argv += ["--ro-bind", str(resolved), str(resolved)]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    gpus = _gpu_devices()
    for device in gpus:
        argv += ["--dev-bind", device, device]
    if gpus:
        # the GPU libraries find their devices through sysfs
        argv += ["--ro-bind-try", "/sys", "/sys"]
    # nothing else is writable: the root bubblewrap builds is made read-only
    argv += ["--remount-ro", "/", "--chdir", str(workdir)]
    return argv


class PidsCgroup:
    """A pids cgroup holding one sandbox, to cap its processes when the worker runs as root.

    RLIMIT_NPROC (set by the child) caps the processes of an ordinary user's sandbox, but
    the kernel never applies it to root's processes, user namespace or not. For root, the
    sandbox goes into a cgroup of its own with `pids.max` (cgroup v1's pids hierarchy, or
    v2 under the worker's own cgroup), entered in the forked child before bubblewrap runs,
    so nothing escapes it by forking early.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, limit: int) -> PidsCgroup | None:
        """A new cgroup capped at `limit` processes, or None where there is none to make."""
        for parent in _pids_hierarchies():
            path = parent / f"idlegrid-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                (path / "pids.max").write_text(str(limit))
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            return cls(path)
        return None

    def enter(self) -> None:
        """Move the calling process into the cgroup (for subprocess's preexec_fn)."""
        with open(self.path / "cgroup.procs", "w") as procs:
            procs.write("0")

    def remove(self) -> None:
        """Kill whatever is left in it and remove it."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                pass
            with contextlib.suppress(OSError):
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.02)
        logger.warning("could not remove cgroup %s", self.path)


def _pids_hierarchies() -> list[Path]:
    """Where a pids cgroup could be made: cgroup v1's pids hierarchy, or v2 beside us."""
    candidates = [Path("/sys/fs/cgroup/pids")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                if "pids" in (own.parent / "cgroup.subtree_control").read_text().split():
                    candidates.append(own.parent)
    except OSError:
        pass
    return [path for path in candidates if os.access(path, os.W_OK)]
