"""More attacks on the grader (round 3): each once got past it, and each test fails without its fix.

The attack code sits in an exercise region, the only student code the grader runs, and reports what it saw in
the message of its exception, which the report shows.
"""
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from minivae.assignments import grade, make_starter, sandbox
from minivae.assignments.markers import find_regions


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubbed3") / "course"
    make_starter(out, ("kl_forward",), record_expected=False, lessons=False)
    return out


def with_body(src, dst, exercise, body):
    """A copy of the starter ``src`` at ``dst`` with ``body`` in the first region of ``exercise``."""
    shutil.copytree(src, dst)
    for path in sorted((dst / "minivae").glob("*.py")):
        text = path.read_text()
        regions = [r for r in find_regions(text) if r.id == exercise]
        if regions:
            r = regions[0]
            lines = text.splitlines(keepends=True)
            new = textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", r.indent)
            path.write_text("".join(lines[:r.begin + 1]) + new + "".join(lines[r.end:]))
            return dst
    raise AssertionError(f"no region {exercise}")


# Memory that no rlimit of the sandbox bounds: a memfd is capped only by RLIMIT_FSIZE per file (64 MiB) times the
# open files (tens of thousands), a System V segment by the IPC namespace's limits (the whole machine), and its
# pages stay after shmdt; a socket's send buffer holds what its peer has not read.  Before the fix, one check
# pinned 6 GiB of the grading machine's memory with 48 memfds and 6 segments, past the 4 GiB a check may map, and
# one process 6 GiB more in 930 socket pairs.
UNBOUNDED_MEMORY = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
seen = []
try:
    os.close(os.memfd_create("x"))
    seen.append("memfd ok")
except OSError as e:
    seen.append(f"memfd errno {e.errno}")
shmid = libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1600)          # IPC_PRIVATE, IPC_CREAT | 0600
addr = libc.shmat(shmid, None, 0)
seen.append(f"shmat {'ok' if addr not in (None, 2 ** 64 - 1) else 'errno %d' % ctypes.get_errno()}")
r = libc.msgget(0, 0o1600)
seen.append(f"msgget {'ok' if r >= 0 else 'errno %d' % ctypes.get_errno()}")
import resource, socket
try:
    socket.socketpair()
    seen.append("socketpair ok")
except OSError as e:
    seen.append(f"socketpair errno {e.errno}")
seen.append(f"nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")
done = []
t = threading.Thread(target=lambda: done.append(1))
t.start()
t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
seen.append(f"thread {len(done)} fork {os.waitpid(pid, 0)[1] >> 8}")
raise RuntimeError("; ".join(seen))
"""


def test_memory_no_rlimit_bounds_is_refused(stubbed, tmp_path):
    d = with_body(stubbed, tmp_path / "mem", "kl_forward", UNBOUNDED_MEMORY)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    msg = res["message"]
    for what in ("memfd", "shmat", "msgget", "socketpair"):
        assert re.search(rf"\b{what} errno 1\b", msg), (what, msg)        # EPERM from the second filter
    assert int(re.search(r"nofile (\d+)", msg).group(1)) <= 256, msg        # and the other fds: few
    assert "thread 1 fork 7" in msg, msg                                 # threads and processes still work
    assert len(sandbox.resource_filter("x86_64")) % 8 == 0 and sandbox.resource_filter("aarch64")
    with pytest.raises(sandbox.SandboxError, match="no seccomp filter"):
        sandbox.resource_filter("mips")


def test_a_child_without_the_second_filter_is_not_used(stubbed, tmp_path, monkeypatch):
    allow_all = (0x06).to_bytes(2, "little") + bytes(2) + (0x7FFF0000).to_bytes(4, "little")    # ret ALLOW
    monkeypatch.setattr(sandbox, "resource_filter", lambda machine=None: allow_all)
    with pytest.raises(sandbox.SandboxError, match="seccomp filter is not in force"):
        grade(stubbed, ["kl_forward"])


# Kernel memory that no size cap bounds: bwrap sizes a tmpfs but leaves its count of files at the kernel's
# default (half the machine's pages), and an empty file holds about 1 KiB of kernel memory.  Before the fix one
# process made 947,000 files in 8 s (+945 MiB of the machine's slab), and a check has three such tmpfs.
MANY_FILES = """
import os
n = {}
for root in ("/tmp", "/dev/shm", "/work"):
    k = 0
    try:
        os.mkdir(f"{root}/many")
        while k < 20000:
            os.close(os.open(f"{root}/many/{k}", os.O_CREAT | os.O_WRONLY))
            k += 1
    except OSError:
        pass
    n[root.strip("/").replace("/", "_")] = k
raise RuntimeError(" ".join(f"{k}={v}" for k, v in n.items()))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the grader caps a tmpfs's files where it runs as root")
def test_the_files_of_each_tmpfs_are_capped(stubbed, tmp_path):
    d = with_body(stubbed, tmp_path / "files", "kl_forward", MANY_FILES)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    counts = dict(re.findall(r"(\w+)=(\d+)", res["message"]))
    assert set(counts) == {"tmp", "dev_shm", "work"}, res
    for where, k in counts.items():
        assert 0 < int(k) < 20000, (where, res["message"])              # stopped by the cap, not by the loop
        assert int(k) < sandbox.TMPFS_INODES, (where, res["message"])


# A process the student's code forks is a copy of the runner: if its exec fails (there is no /bin/sleep in the
# sandbox) or it returns, it went on to answer the request too, on the same pipe, and two answers interleave
# (test_nothing_outlives_a_check failed about one run in two this way).  The parent waits here so that the
# child's answer would come first: the honest kl_forward must pass all the same.
FORKED_HELPER = """
import os
pid = os.fork()
if pid == 0:
    raise OSError("the exec of a helper failed")
os.waitpid(pid, 0)
var = xp.exp(logvar)
kl = 0.5 * (mu * mu + var - 1.0 - logvar).sum(axis=1)
"""


def test_a_forked_copy_of_the_runner_never_answers(stubbed, tmp_path):
    d = with_body(stubbed, tmp_path / "fork", "kl_forward", FORKED_HELPER)
    (res,) = grade(d, ["kl_forward"])["exercises"]
    assert res["passed"], res
