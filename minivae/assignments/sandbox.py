"""Run student code in a child process that can do nothing to the verdict.

The parent starts ``python -I -B -c BOOT`` in a throwaway working folder.
BOOT is the grader's own code and runs before any student code:

* resource limits: address space, file size, CPU time, processes;
* its own session (``start_new_session``), closed stdin, an allow-listed
  environment, stdout/stderr into a file that the file-size limit bounds
  (the parent reads only its last lines, as text to show);
* on Linux, as root (or wherever ``unshare`` is allowed): a private mount
  namespace where every mount is read-only except the working folder, the
  grader's files (the installed reference package) and the parent's private
  folders are covered by empty read-only ``tmpfs`` mounts, and a new PID
  namespace (with its own ``/proc``) whose first process is the student's:
  when it ends, the kernel kills every process left in the namespace,
  double-forked daemons included.  Then every capability is dropped (and
  ``no_new_privs`` set), so the student's code cannot undo any of it.

On Linux the processes are forked by a :class:`Zygote`, a trusted fork server started once per
run with Python and NumPy loaded and nothing else; each forked process then runs BOOT exactly as a
new interpreter would.  Elsewhere each check starts its own interpreter.

Whatever of this the OS refused is listed in ``Child.isolation`` and ends up
in the report.  Independently of the namespace, the parent is a child
subreaper (``PR_SET_CHILD_SUBREAPER``) and, after each check, kills the
child's process group and every orphan that was re-parented to it.

Requests and replies are ``.npz`` messages (8-byte length + bytes) on two
pipes; replies are read with ``allow_pickle=False``, only stored members,
and a size cap.  No pickle crosses from the child to the parent.
"""
from __future__ import annotations

import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

MAX_MESSAGE = 256 << 20          # bytes of one reply
OUTPUT_TAIL = 2000               # characters of the child's output shown in a message
LINUX = sys.platform.startswith("linux")

LIMITS = {                       # resource limits of a child (soft = hard)
    "RLIMIT_AS": 4 << 30,        # address space: 4 GiB
    "RLIMIT_FSIZE": 64 << 20,    # any file it writes, its captured output included: 64 MiB
    "RLIMIT_NPROC": 256,         # processes of the same user (not enforced for root)
    "RLIMIT_CORE": 0,
}

ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "SYSTEMROOT")

BOOT = r'''
import json, os, sys, resource, signal
if "cfg" not in globals():
    cfg = json.loads(sys.argv[1])
notes = []
for name, value in cfg["limits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError, AttributeError) as e:
        notes.append(f"no {name}")
isolated = False
if cfg["namespace"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    def mount(src, tgt, fs, flags, data=None):
        if libc.mount(src and src.encode(), tgt.encode(), fs and fs.encode(), flags, data and data.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount {tgt}: {os.strerror(ctypes.get_errno())}")
    try:
        if libc.unshare(0x00020000 | 0x20000000) != 0:          # CLONE_NEWNS | CLONE_NEWPID
            raise OSError(ctypes.get_errno(), "unshare: " + os.strerror(ctypes.get_errno()))
        mount("none", "/", None, MS_REC | MS_PRIVATE)
        work_fd = os.open(".", os.O_RDONLY)
        points = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if not mp.startswith(("/proc", "/dev")):
                    points.append(mp)
        for mp in points:                                        # the whole file system read-only
            try:
                mount(None, mp, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
            except OSError:
                if mp == "/":
                    raise
        cover = cfg["cover"]
        if cover:                                                # the run's private folder: only our work dir
            mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            os.mkdir(os.path.join(cover, "work"))
            mount(f"/proc/self/fd/{work_fd}", os.path.join(cover, "work"), None, MS_BIND)
            mount(None, os.path.join(cover, "work"), None, MS_BIND | MS_REMOUNT | MS_NOSUID)
            mount(None, cover, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.chdir(os.path.join(cover, "work"))
        for path in cfg["hide"]:
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=000")
        isolated = True
    except OSError as e:
        notes.append(str(e))
    if isolated:
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)                  # PR_SET_PDEATHSIG
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
        except OSError:
            pass
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)                        # PR_CAPBSET_DROP
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(hdr, data) != 0:
            os._exit(70)
        libc.prctl(38, 1, 0, 0, 0)                              # PR_SET_NO_NEW_PRIVS
import struct
hello = json.dumps({"isolated": isolated, "notes": notes}).encode()
os.write(cfg["wfd"], struct.pack("<Q", len(hello)) + hello)          # before any student code runs
sys.argv = ["runner.py", str(cfg["rfd"]), str(cfg["wfd"])]
del cfg, notes
sys.path.insert(0, os.getcwd())
src = open("runner.py").read()
g = {"__name__": "__main__", "__file__": os.path.abspath("runner.py")}
exec(compile(src, "runner.py", "exec"), g)
'''

ZYGOTE = r'''
import ctypes, io, json, os, signal, socket, struct, sys, traceback, types, importlib, resource
import numpy
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)                       # PR_SET_CHILD_SUBREAPER: orphans come here
boot = sys.argv[1]
sock = socket.socket(fileno=int(sys.argv[2]))

def reap(*_):
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
signal.signal(signal.SIGCHLD, reap)
while True:
    try:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
    except OSError:
        break
    if not msg:
        break
    cfg = json.loads(msg)
    pid = os.fork()
    if pid == 0:                                                # the new student process
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sock.close()
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fds[2], 1)
            os.dup2(fds[2], 2)
            for fd in (null, fds[2]):
                os.close(fd)
            cfg["rfd"], cfg["wfd"] = fds[0], fds[1]
            os.chdir(cfg["work"])
            os.environ.clear()
            os.environ.update(cfg["env"])
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            g = {"__name__": "__boot__", "cfg": cfg}
            exec(compile(boot, "<boot>", "exec"), g)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    for fd in fds:
        os.close(fd)
    sock.sendall(struct.pack("<q", pid))
'''


class Zygote:
    """A trusted fork server: Python and NumPy loaded once, one fresh forked process per check.

    It knows nothing of the grading (no reference, no seed): it receives a child's settings and its three
    file descriptors (request pipe, reply pipe, output file) and forks; the new process then runs BOOT
    exactly as a freshly started interpreter would.  Saves the interpreter start-up of every check.
    """

    def __init__(self):
        import socket
        self._sock, theirs = socket.socketpair()
        with _live_lock:
            self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", ZYGOTE, BOOT, str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True, env=_env())
            _live.add(self.proc.pid)
            _zygotes.add(str(self.proc.pid))
        theirs.close()
        self._lock = threading.Lock()

    def spawn(self, cfg, fds):
        import socket
        with self._lock, _live_lock:
            socket.send_fds(self._sock, [json.dumps(cfg).encode()], list(fds))
            data = b""
            while len(data) < 8:
                chunk = self._sock.recv(8 - len(data))
                if not chunk:
                    raise ChildError("the grader's fork server stopped")
                data += chunk
            pid = struct.unpack("<q", data)[0]
            _live.add(pid)
            return pid

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        with _live_lock:
            _live.discard(self.proc.pid)
            _zygotes.discard(str(self.proc.pid))


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
_zygotes = set()                 # pids (as text) of fork servers: their orphans are ours to kill too
_live_lock = threading.Lock()
_namespace_ok = None


def namespaces_available():
    """Whether a child can get the private mount and PID namespaces (probed once)."""
    global _namespace_ok
    if _namespace_ok is None:
        _namespace_ok = False
        if LINUX:
            code = ("import ctypes,sys;l=ctypes.CDLL(None,use_errno=True);"
                    "sys.exit(0 if l.unshare(0x00020000|0x20000000)==0 and "
                    "l.mount(b'none',b'/',None,16384|(1<<18),None)==0 else 1)")
            try:
                with _live_lock:     # not an orphan to another thread's scan
                    _namespace_ok = subprocess.run([sys.executable, "-I", "-c", code], timeout=30,
                                                   capture_output=True).returncode == 0
            except (OSError, subprocess.SubprocessError):
                _namespace_ok = False
    return _namespace_ok


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
        if len(fields) > 1 and (fields[1] == str(me) or fields[1] in _zygotes):
            pid = int(name)
            with _live_lock:
                if pid not in _live:
                    found.append(pid)
    return found


def reap_orphans(rounds=20):
    """Kill and reap every process re-parented to us (the double-forked daemons of finished checks)."""
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
                os.waitpid(pid, 0)
            except OSError:          # a fork server's orphan: it reaps it
                pass
    return killed


def _alive(pid):
    """Whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


class ChildError(Exception):
    """The child broke the protocol, died or ran out of time (message for the report)."""


def _env():
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    return env


class Child:
    """One student process: ``call(request, timeout)`` sends a request and returns the checked reply."""

    def __init__(self, workdir, output_file, hide=(), cover=None, cpu_seconds=120, namespace=True, zygote=None):
        become_subreaper()
        self.workdir = Path(workdir)
        self.namespace = bool(namespace and namespaces_available())
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        limits = dict(LIMITS, RLIMIT_CPU=int(cpu_seconds))
        cfg = {"limits": limits, "namespace": self.namespace, "rfd": req_r, "wfd": rep_w,
               "hide": [str(h) for h in hide if Path(h).exists()],
               "cover": str(cover) if cover else None}
        self.output_file = Path(output_file)
        self._out = open(self.output_file, "wb")
        self.proc = None
        if zygote is not None:  # forked by the fork server: no interpreter start-up
            cfg.update(work=str(self.workdir), env=_env())
            try:
                self.pid = zygote.spawn(cfg, (req_r, rep_w, self._out.fileno()))
            finally:
                os.close(req_r)
                os.close(rep_w)
        else:
            with _live_lock:    # registered before another thread's orphan scan can see it
                self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOT, json.dumps(cfg)],
                                             cwd=str(workdir), env=_env(), stdin=subprocess.DEVNULL,
                                             stdout=self._out, stderr=subprocess.STDOUT, pass_fds=(req_r, rep_w),
                                             start_new_session=True)
                _live.add(self.proc.pid)
                self.pid = self.proc.pid
            os.close(req_r)
            os.close(rep_w)
        self._init_rest(cfg)

    def _init_rest(self, cfg):
        self.isolation = {"namespaces": self.namespace, "subreaper": bool(_SUBREAPER),
                          "hidden": cfg["hide"] if self.namespace else []}
        self.closed = False
        self._hello = None

    def hello(self, timeout=60):
        """The first message, written by BOOT before any student code ran: what isolation is in force."""
        if self._hello is None:
            deadline = time.monotonic() + timeout
            try:
                (n,) = struct.unpack("<Q", self._read(8, deadline))
                if n > 65536:
                    raise ChildError("bad start message")
                info = json.loads(self._read(n, deadline).decode())
            except TimeoutError:
                raise ChildError("the student's process did not start") from None
            self._hello = info
            self.isolation["namespaces"] = bool(info.get("isolated"))
            self.isolation["notes"] = [str(x)[:200] for x in info.get("notes", [])][:10]
            if not self.isolation["namespaces"]:
                self.isolation["hidden"] = []
        return self._hello

    # ------------------------------------------------------------ messages
    def send(self, arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        try:
            os.write(self._req_w, struct.pack("<Q", len(data)))
            view = memoryview(data)
            while view:
                n = os.write(self._req_w, view)
                view = view[n:]
        except (BrokenPipeError, OSError):
            raise ChildError(self._died("stopped reading its requests")) from None

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
        data = self._read(n, deadline)
        return parse_npz(data)

    def _died(self, what):
        code = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            code = self.proc.returncode
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
        except OSError:
            return ""
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""

    def request(self, arrays, timeout, handler=None):
        """Send a request; answer the child's op questions with ``handler(msg) -> reply``; return the final reply."""
        self.hello()
        deadline = time.monotonic() + timeout
        self.send(arrays)
        while True:
            try:
                msg = self.recv(deadline)
            except TimeoutError:
                raise ChildError("timeout") from None
            if text_of(msg.get("status")) == "op" and handler is not None:
                self.send(handler(msg))
                continue
            return msg

    # ------------------------------------------------------------- ending
    def close(self):
        """Kill the child, its process group, its namespace, and every orphan it left."""
        if self.closed:
            return
        self.closed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.proc is not None:
            self.proc.wait()
        else:                    # the fork server reaps it: wait until it is gone
            end = time.monotonic() + 10
            while time.monotonic() < end and _alive(self.pid):
                time.sleep(0.002)
        with _live_lock:
            _live.discard(self.pid)
        for fd in (self._req_w, self._rep_r):
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
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ChildError(f"the student's process sent a malformed reply ({e})") from None
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
