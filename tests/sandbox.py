"""The system-call sandbox of ``systemd/postwarden.service``, without systemd.

There is no systemd to start the unit where the tests run, so this applies what the
unit asks of the kernel through seccomp, as systemd itself does it (with libseccomp,
which systemd links; reached here through ctypes), then execs the program:

* ``SystemCallFilter=``: the allow-list of the unit's groups, expanded with
  ``systemd-analyze syscall-filter`` (systemd's own tables), minus its ``~`` groups;
  anything else fails with ``SystemCallErrorNumber=`` (EPERM);
* ``SystemCallArchitectures=native``: the filter holds the native ABI only;
* ``MemoryDenyWriteExecute=``: mmap() of memory both writable and executable,
  mprotect()/pkey_mprotect() adding PROT_EXEC, shmat(SHM_EXEC) refused (the rules of
  systemd's seccomp-util.c);
* ``RestrictAddressFamilies=``: socket() only in the unit's families;
* ``RestrictNamespaces=true``: unshare(), setns() and clone() with a namespace flag
  refused, clone3() ENOSYS (its flags cannot be read by a filter; libc falls back to
  clone(), as under systemd);
* ``NoNewPrivileges=``: set by libseccomp before the filter is loaded.

``python sandbox.py SPEC -- PROGRAM ARGS...`` (SPEC: JSON from :func:`spec`). The
capabilities (``CapabilityBoundingSet=``) are dropped by ``setpriv`` before this runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
NAMESPACE_FLAGS |= 0x40000000 | 0x00000080


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def syscall_groups(systemd_analyze: str) -> dict[str, list[str]]:
    """Every ``@group`` and its members, from ``systemd-analyze syscall-filter``."""
    out = subprocess.run(
        [systemd_analyze, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return groups


def expand(groups: dict[str, list[str]], names: list[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(groups, groups[name]) if name.startswith("@") else {name}
    return found


def spec(unit: str, systemd_analyze: str) -> dict[str, Any]:
    """What ``unit`` (the text of a .service file) asks of seccomp."""

    def values(key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", unit, re.M)

    groups = syscall_groups(systemd_analyze)
    allow: set[str] = set()
    for line in values("SystemCallFilter"):
        if line.startswith("~"):
            allow -= expand(groups, line[1:].split())
        else:
            allow |= expand(groups, line.split())
    families = [int(getattr(socket, f)) for line in values("RestrictAddressFamilies")
                for f in line.split()]  # fmt: skip
    (err,) = values("SystemCallErrorNumber")
    assert values("SystemCallArchitectures") == ["native"]
    return {
        "allow": sorted(allow),
        "errno": int(getattr(errno, err)),
        "families": families,
        "mdwe": values("MemoryDenyWriteExecute") == ["true"],
        "allow_namespaces": values("RestrictNamespaces") != ["true"],
    }


def load(s: dict[str, Any]) -> None:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp),
    )  # fmt: skip
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    ctx = lib.seccomp_init(errno_action(s["errno"]))
    assert ctx, "seccomp_init failed"

    def rule(name: str, *cmps: tuple[int, int, int, int], action: int = SCMP_ACT_ALLOW) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a call of this architecture
        array = (ArgCmp * max(1, len(cmps)))(*(ArgCmp(*c) for c in cmps))
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        assert rc == 0, f"seccomp_rule_add {name}: {rc}"

    special = {"mmap", "mmap2", "mprotect", "pkey_mprotect", "shmat", "socket", "clone",
               "clone3", "unshare", "setns"}  # fmt: skip
    for name in s["allow"]:
        if name not in special:
            rule(name)
    allowed = set(s["allow"])
    for name in ("mmap", "mmap2"):
        if name in allowed:
            if s["mdwe"]:  # not both writable and executable
                rule(name, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0))
                rule(name, (2, SCMP_CMP_MASKED_EQ, PROT_WRITE, 0))
            else:
                rule(name)
    for name, arg, flag in (("mprotect", 2, PROT_EXEC), ("pkey_mprotect", 2, PROT_EXEC),
                            ("shmat", 2, SHM_EXEC)):  # fmt: skip
        if name in allowed:
            rule(name, (arg, SCMP_CMP_MASKED_EQ, flag, 0)) if s["mdwe"] else rule(name)
    if "socket" in allowed:
        for family in s["families"]:
            rule("socket", (0, SCMP_CMP_EQ, family, 0))
    if "clone" in allowed:
        rule("clone", (0, SCMP_CMP_MASKED_EQ, NAMESPACE_FLAGS, 0))
    if "clone3" in allowed:
        rule("clone3", action=errno_action(errno.ENOSYS))
    if s["allow_namespaces"]:
        for name in ("unshare", "setns"):
            if name in allowed:
                rule(name)
    rc = lib.seccomp_load(ctx)
    assert rc == 0, f"seccomp_load: {rc}"


if __name__ == "__main__":
    split = sys.argv.index("--")
    load(json.loads(Path(sys.argv[1]).read_text()))
    argv = sys.argv[split + 1 :]
    os.execv(argv[0], argv)
