"""A seccomp filter for engine processes, built as a classic BPF program by hand.

Confined engines run under this filter from their first instruction: bubblewrap loads it
(`--seccomp FD`) just before it starts the engine. It refuses, with EPERM, the system calls
that reach out of a sandbox or into the kernel's most attacked corners: ptrace and the
process_vm_* calls (reading other processes), mount and the new mount API, unshare/setns
(new namespaces), pivot_root/chroot, keyctl and friends, bpf, perf_event_open, userfaultfd,
io_uring (which runs calls the filter never sees), kexec, module loading, swap and reboot.
`clone` with any namespace flag is refused too; `clone3`, whose flags sit in memory a
filter cannot read, answers ENOSYS so the C library falls back to `clone`. A call from
another ABI than the native one (x32 on x86-64, or a foreign architecture) kills the
process, so the numbers below cannot be dodged.

No libseccomp is needed: the program is a few dozen instructions, and a test reads
`Seccomp: 2` in the engine's /proc status and watches each refused call fail.
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["DENIED", "SeccompUnsupported", "filter_program", "supported"]

# the calls refused, by name (numbers per architecture below)
DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "swapon",
    "swapoff",
    "reboot",
    "open_by_handle_at",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
)

# calls numbered alike on every architecture since Linux 5.1 (the "generic" table)
_COMMON = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
}

_X86_64 = {
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "open_by_handle_at": 304,
    "clone": 56,
    **_COMMON,
}

_AARCH64 = {
    "ptrace": 117,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "mount": 40,
    "umount2": 39,
    "pivot_root": 41,
    "chroot": 51,
    "unshare": 97,
    "setns": 268,
    "keyctl": 219,
    "add_key": 217,
    "request_key": 218,
    "bpf": 280,
    "perf_event_open": 241,
    "userfaultfd": 282,
    "kexec_load": 104,
    "kexec_file_load": 294,
    "init_module": 105,
    "finit_module": 273,
    "delete_module": 106,
    "swapon": 224,
    "swapoff": 225,
    "reboot": 142,
    "open_by_handle_at": 265,
    "clone": 220,
    **_COMMON,
}

# AUDIT_ARCH_* (linux/audit.h) and each architecture's syscall table
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64),
    "aarch64": (0xC00000B7, _AARCH64),
}

# the namespace flags of clone(2): CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID, NEWNET, NEWTIME
_CLONE_NAMESPACES = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
    | 0x40000000 | 0x00000080
)  # fmt: skip
_X32_BIT = 0x40000000

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
_ALLOW = 0x7FFF0000
# offsets in struct seccomp_data: nr, arch, instruction_pointer, args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16


class SeccompUnsupported(RuntimeError):
    """No syscall table for this machine's architecture."""


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in _ARCHES


def filter_program(machine: str | None = None) -> bytes:
    """The filter as `struct sock_filter[]` bytes, for bwrap's `--seccomp FD`."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompUnsupported(
            f"no seccomp syscall table for the {machine} architecture (known: "
            f"{', '.join(sorted(_ARCHES))})"
        )
    audit_arch, table = _ARCHES[machine]
    # (code, k, jump-if-true label, jump-if-false label); None = the next instruction
    Jump = str | None
    code: list[tuple[int, int, Jump, Jump]] = [
        (_LD_W_ABS, _ARCH, None, None),
        (_JEQ_K, audit_arch, "native", "kill"),
    ]
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(code)

    label("native")
    code.append((_LD_W_ABS, _NR, None, None))
    if machine == "x86_64":
        code.append((_JGE_K, _X32_BIT, "kill", None))
    for number in sorted({table[name] for name in DENIED}):
        code.append((_JEQ_K, number, "deny", None))
    code.append((_JEQ_K, table["clone3"], "enosys", None))
    code.append((_JEQ_K, table["clone"], None, "allow"))
    code.append((_LD_W_ABS, _ARG0_LOW, None, None))
    code.append((_JSET_K, _CLONE_NAMESPACES, "deny", "allow"))
    label("allow")
    code.append((_RET_K, _ALLOW, None, None))
    label("deny")
    code.append((_RET_K, _ERRNO | errno.EPERM, None, None))
    label("enosys")
    code.append((_RET_K, _ERRNO | errno.ENOSYS, None, None))
    label("kill")
    code.append((_RET_K, _KILL_PROCESS, None, None))

    def offset(at: int, target: Jump) -> int:
        if target is None:
            return 0
        distance = labels[target] - at - 1
        assert 0 <= distance < 256, (target, distance)
        return distance

    return b"".join(
        struct.pack("=HBBI", op, offset(at, jt), offset(at, jf), k)
        for at, (op, k, jt, jf) in enumerate(code)
    )
