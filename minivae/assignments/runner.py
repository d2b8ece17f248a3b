"""The child side of grading: run student code on given inputs, return raw outputs.

This file is copied into each throwaway working copy and run there (NumPy
and the standard library only).  It knows no reference value, no tolerance,
no seed and no report path: the parent sends it requests and judges what
comes back.  Everything it sends back is an ``.npz`` of plain arrays, framed
by an 8-byte length, on the response pipe; the parent reads it with
``allow_pickle=False`` and a size cap, and trusts none of it.

A request is an ``.npz`` with a ``job`` string and arrays:

``call``   import ``fn`` (``module:function``) from the student's package and
           call it on the arguments (a tree of arrays described by ``spec``);
           send back the result and the arguments as they are afterwards
           (so the parent can see side effects).  The ops named in ``proxy``
           (those of other exercises that ``fn`` calls) ask the parent, as in
           ``vae``.
``adam``   run the package's ``Adam`` for a few steps; send back the
           parameters and the moments after each step.
``vae``    build the package's ``VAE`` with given parameters, run
           ``loss`` with the gradients; every op named in ``proxy`` is
           replaced, wherever the package refers to it, by a stub that asks
           the parent for the result (the parent keeps the caches and hands
           back opaque handles).
``exit``   stop.

The student's code runs in this process and can change anything here; that
only changes what this process sends back, which the parent checks.
"""
import importlib
import io
import json
import os
import struct
import sys
import traceback
import types

import numpy as np


def send(fd, arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    os.write(fd, struct.pack("<Q", len(data)))
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd, n):
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("the grader closed the pipe")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def recv(fd):
    (n,) = struct.unpack("<Q", _read_exact(fd, 8))
    with np.load(io.BytesIO(_read_exact(fd, n)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def text(s):
    return np.array(str(s)[:4000])


# ------------------------------------------------------------------ trees
def build(spec, arrays, prefix="a"):
    """Rebuild the argument tree: spec is "array", "none", a number, or a list of specs (tuple)."""
    if spec == "array":
        return arrays[prefix]
    if spec == "none":
        return None
    if isinstance(spec, list):
        return tuple(build(s, arrays, f"{prefix}.{i}") for i, s in enumerate(spec))
    if isinstance(spec, dict) and "number" in spec:
        return spec["number"]
    raise ValueError(f"bad spec {spec!r}")


def flatten(value, prefix, out, depth=0):
    """Put a result tree into ``out``: plain ndarrays as they are, tuples/lists as ``len:``, the rest by type name."""
    if type(value) is np.ndarray:
        out[prefix] = value.copy()          # a snapshot: the student's code may change the array later
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        out["num:" + prefix] = np.array(value)
    elif isinstance(value, (tuple, list)) and depth < 4 and len(value) <= 64:
        out["len:" + prefix] = np.array(len(value))
        for i, v in enumerate(value):
            flatten(v, f"{prefix}.{i}", out, depth + 1)
    else:
        out["type:" + prefix] = text(type(value).__name__)


# --------------------------------------------------------------- student
def where(exc):
    root = os.path.abspath(os.getcwd()) + os.sep
    if isinstance(exc, SyntaxError) and exc.filename and os.path.abspath(exc.filename).startswith(root):
        return f" (at {os.path.relpath(os.path.abspath(exc.filename), root[:-1])}:{exc.lineno})"
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.abspath(fr.filename)
        if path.startswith(root):
            return f" (at {os.path.relpath(path, root[:-1])}:{fr.lineno})"
    return ""


def error_reply(exc):
    if isinstance(exc, NotImplementedError):
        return {"status": text("not_implemented"), "message": text(str(exc))}
    return {"status": text("error"), "message": text(f"{type(exc).__name__}: {exc}{where(exc)}".replace("\n", " "))}


def resolve(name):
    mod, _, fn = name.partition(":")
    return getattr(importlib.import_module(mod), fn)


class ForwardInBackward(Exception):
    pass


def _forward_tripwire(name):
    """During a backward call, every ``*_forward`` function of the package is replaced by one that records the
    call and raises: a backward that calls a forward op is finite differences (nudging all entries at once
    is as cheap as backprop for an elementwise op), not a derived gradient.  Returns (called, undo)."""
    called = []
    if not name.endswith("_backward"):
        return called, lambda: None
    saved = []

    def trip(fname):
        def tripped(*args, **kwargs):
            called.append(fname)
            raise ForwardInBackward(f"{name.split(':')[-1]} called {fname}: a backward must derive its gradient, "
                                    "not run a forward op (finite differences)")
        return tripped

    for mname, mod in list(sys.modules.items()):
        if mod is None or not (mname == "minivae" or mname.startswith("minivae.")):
            continue
        for k, v in list(vars(mod).items()):
            if isinstance(v, types.FunctionType) and v.__name__.endswith("_forward"):
                saved.append((mod, k, v))
                setattr(mod, k, trip(v.__name__))

    def undo():
        for mod, k, v in saved:
            setattr(mod, k, v)
    return called, undo


def job_call(req, io_fds):
    spec = json.loads(str(req["spec"]))
    args = build(spec, req)
    fn = resolve(str(req["fn"]))
    if "proxy" in req:        # the ops of other exercises that this one calls: the parent answers them
        install_proxies(_proxy_table(req["proxy"], io_fds))
    called, undo = _forward_tripwire(str(req["fn"]))
    try:
        with np.errstate(all="ignore"):
            result = fn(*args)
    except ForwardInBackward as e:
        return {"status": text("fail"), "message": text(str(e))}
    except BaseException:
        if called:
            return {"status": text("fail"), "message": text(f"{str(req['fn']).split(':')[-1]} called "
                                                            f"{called[0]}: a backward must derive its gradient, "
                                                            "not run a forward op (finite differences)")}
        raise
    finally:
        undo()
    if called:
        return {"status": text("fail"), "message": text(f"{str(req['fn']).split(':')[-1]} called {called[0]}: a "
                                                        "backward must derive its gradient, not run a forward op "
                                                        "(finite differences)")}
    out = {"status": text("ok")}
    flatten(result, "r", out)
    if "result_only" not in req:       # the cost check: its large arguments are not sent back
        flatten(args, "after", out)
    return out


def job_adam(req):
    optim = importlib.import_module("minivae.optim")
    names = [str(n) for n in req["names"]]
    params = {k: req[f"p0/{k}"].copy() for k in names}
    opt = optim.Adam(lr=float(req["lr"]), betas=tuple(float(b) for b in req["betas"]), eps=float(req["eps"]))
    out = {"status": text("ok")}
    for t in range(int(req["steps"])):
        opt.step(params, {k: req[f"g/{t}/{k}"].copy() for k in names})
        for i, k in enumerate(names):
            flatten(params[k], f"p/{t}/{k}", out)
            st = opt.state[i] if isinstance(opt.state, list) and len(opt.state) > i else {}
            for s in ("m", "v"):
                if isinstance(st, dict) and s in st:
                    flatten(st[s], f"{s}/{t}/{k}", out)
    return out


# ------------------------------------------------------------ op proxies
class Handle:
    """An opaque reference to a cache the parent keeps."""
    __slots__ = ("id",)

    def __init__(self, i):
        self.id = i


def _encode_args(args, out, prefix="a"):
    spec = []
    for i, a in enumerate(args):
        key = f"{prefix}.{i}"
        if isinstance(a, Handle):
            out[key] = np.array(a.id)
            spec.append("handle")
        elif isinstance(a, (tuple, list)):
            spec.append(_encode_args(a, out, key))
        elif a is None:
            spec.append("none")
        else:
            out[key] = np.asarray(a)
            spec.append("array")
    return spec


def make_proxy(io_fds, name, n_out):
    rfd, wfd = io_fds

    def proxy(*args):
        msg = {"status": text("op"), "op": text(name)}
        msg["spec"] = text(json.dumps(_encode_args(args, msg)))
        send(wfd, msg)
        rep = recv(rfd)
        if "error" in rep:
            raise ValueError(str(rep["error"]))
        outs = [rep[f"out.{i}"] for i in range(n_out)]
        res = outs[0] if n_out == 1 else tuple(outs)
        if "handle" in rep:
            return res, Handle(int(rep["handle"]))
        return res
    proxy.__name__ = name
    proxy._grader_proxy = True
    return proxy


def _replace(value, table, depth=0, seen=None):
    """Return value with every function in ``table`` replaced (lists and dicts in place)."""
    if seen is None:
        seen = set()
    try:
        if value in table:
            return table[value]
    except TypeError:
        pass
    if depth > 4 or id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, tuple):
        new = tuple(_replace(v, table, depth + 1, seen) for v in value)
        return new if any(a is not b for a, b in zip(new, value)) else value
    if isinstance(value, list):
        value[:] = [_replace(v, table, depth + 1, seen) for v in value]
    elif isinstance(value, dict):
        for k in list(value):
            value[k] = _replace(value[k], table, depth + 1, seen)
    elif isinstance(value, types.ModuleType) or isinstance(value, np.ndarray):
        return value
    elif isinstance(value, type) and value.__module__.startswith("minivae"):
        for k, v in list(vars(value).items()):
            inner = v.__func__ if isinstance(v, staticmethod) else v
            new = _replace(inner, table, depth + 1, seen)
            if new is not inner:
                setattr(value, k, staticmethod(new) if isinstance(v, staticmethod) else new)
    elif hasattr(value, "__dict__") and type(value).__module__.startswith("minivae") and not callable(value):
        for k, v in list(vars(value).items()):
            new = _replace(v, table, depth + 1, seen)
            if new is not v:
                setattr(value, k, new)
    return value


def install_proxies(table):
    """Replace each op in ``table`` wherever a loaded minivae module refers to it."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "minivae" or name.startswith("minivae.")):
            continue
        for k, v in list(vars(mod).items()):
            if k.startswith("__"):
                continue
            new = _replace(v, table)
            if new is not v:
                setattr(mod, k, new)


def _proxy_table(entries, io_fds):
    """{the package's op: its proxy} for entries ``module:function/n_out``."""
    table = {}
    for entry in entries:
        qual, n_out = str(entry).rsplit("/", 1)
        table[resolve(qual)] = make_proxy(io_fds, qual, int(n_out))
    return table


def job_vae(req, io_fds):
    for m in ("config", "layers", "gaussian", "likelihoods", "objectives", "model"):
        try:
            importlib.import_module(f"minivae.{m}")
        except ImportError:
            if m in ("config", "model"):
                raise
    table = _proxy_table(req["proxy"], io_fds)
    install_proxies(table)
    model_mod = importlib.import_module("minivae.model")
    cfg = importlib.import_module("minivae.config").VAEConfig(**json.loads(str(req["config"])))
    model = model_mod.VAE(cfg, rng=np.random.default_rng(0))
    _replace(model, table)
    for k in [str(n) for n in req["names"]]:
        model.params[k][...] = req[f"param/{k}"]
    kwargs = json.loads(str(req["kwargs"]))
    with np.errstate(all="ignore"):
        _, grads = model.loss(req["x"], eps=req["eps"], **kwargs)
    out = {"status": text("ok")}
    if not isinstance(grads, dict):
        out["type:grads"] = text(type(grads).__name__)
        return out
    for k, v in grads.items():
        flatten(v, f"grad/{k}", out)
    return out


def main():
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    sys.path[:] = [os.getcwd()] + [p for p in sys.path if p not in ("", ".")]
    # an editable install of the reference adds a finder after the path finder: never fall back on it
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.dont_write_bytecode = True
    me = os.getpid()
    while True:
        try:
            req = recv(rfd)
        except EOFError:
            return 0
        job = str(req["job"])
        if job == "exit":
            return 0
        try:
            if job == "call":
                out = job_call(req, (rfd, wfd))
            elif job == "adam":
                out = job_adam(req)
            elif job == "vae":
                out = job_vae(req, (rfd, wfd))
            else:
                out = {"status": text("error"), "message": text(f"unknown job {job}")}
        except BaseException as e:   # the student's code failed: say how, and go on
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            out = error_reply(e)
        if os.getpid() != me:        # a process the student's code forked (its exec failed, or it returned): it
            os._exit(0)              # must not answer too; two answers on one pipe interleave into garbage
        send(wfd, out)


if __name__ == "__main__":
    sys.exit(main())
