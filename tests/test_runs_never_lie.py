"""Issue 28, "runs that never lie, round two": every CLI output written atomically and never over its own
input, every user-given size checked before work starts, one signal handling for every command, a run folder
that is a run or nothing, every checkpoint field validated, warnings folded into the one error line, and
messages that name the culprit.  Each case ran wrong before the fix; nothing here times anything."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivae.checkpoint import load_checkpoint
from minivae.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
SMALL = ["--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--hidden", "8",
         "--latent", "2", "--quiet"]


def run_main(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:                      # argparse's own errors
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err, *fragments):
    assert "Traceback" not in err and "Warning" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minivae: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (but a run folder's .lock, which names its last holder)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def temp_files(folder):
    return [p.name for p in Path(folder).rglob("*.tmp")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run (z_dim 2, with figures), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("r28") / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    return out


def copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------------------ 2: figures are atomic
def test_a_failed_figure_write_leaves_the_old_picture_whole(run, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure
    r = copy_run(run, tmp_path)
    old = snapshot(r)
    real = Figure.savefig

    def full_disk(self, fname, *a, **k):
        real(self, fname, *a, **k)                 # some bytes reach the file, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    for argv in (["sample", "--checkpoint", r, "--out", r / "figures" / "samples.png"],
                 ["interpolate", "--checkpoint", r, "--out", r / "figures"],
                 ["manifold", "--checkpoint", r, "--out", r / "figures"]):
        code, _, err = run_main(argv, capsys)
        assert code == 2, err
        one_error_line(err, "cannot write", str(r / "figures"), "No space left on device")
    assert snapshot(r) == old and temp_files(r) == []


# --------------------------------------------------------------- 5, 6: one signal handling everywhere
PATCHED = """
import os, signal, sys
import {module} as m
real = m.{func}
calls = [0]
def patched(*a, **k):
    calls[0] += 1
    if calls[0] == {when}:
        os.kill(os.getpid(), signal.{sig})
    out = real(*a, **k)
    if hasattr(out, "__next__"):          # a generator: signal after its first block
        def gen():
            for i, block in enumerate(out):
                yield block
                if i == 0:
                    os.kill(os.getpid(), signal.{sig})
        return gen()
    return out
m.{func} = patched
from minivae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_with_signal(module, func, sig, argv, when=1):
    code = PATCHED.format(module=module, func=func, sig=sig, when=when)
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=240)


@pytest.mark.parametrize("sig, rc", [("SIGTERM", 143), ("SIGINT", 130)])
def test_every_command_stops_cleanly_on_a_signal(run, tmp_path, sig, rc):
    r = copy_run(run, tmp_path)
    old = snapshot(r)
    cases = [
        ("minivae.figures", "sample_chunks", ["sample", "--checkpoint", r, "--n", "3000", "--out", r / "figures"]),
        ("minivae.figures", "sample_chunks", ["sample", "--checkpoint", r, "--out", r / "figures" / "samples.png"]),
        ("minivae.evaluate", "negative_elbo", ["eval", "--checkpoint", r, "--json", r / "eval.json"]),
        ("minivae.figures", "decode_chunks", ["interpolate", "--checkpoint", r, "--out", r / "figures"]),
        ("minivae.figures", "decode_chunks", ["manifold", "--checkpoint", r, "--out", r / "figures"]),
        ("minivae.notebook", "percent_to_notebook", ["lessons", tmp_path / "lessons"]),
    ]
    for module, func, argv in cases:
        p = run_with_signal(module, func, sig, argv)
        assert p.returncode == rc, (argv, p.returncode, p.stderr[-2000:])
        line = one_error_line(p.stderr)
        assert ("terminated (SIGTERM)" if rc == 143 else "interrupted") in line
        assert snapshot(r) == old and temp_files(r) == [], argv
    assert not (tmp_path / "lessons").exists()           # the export is all or nothing


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_sigterm_still_stops_the_run(tmp_path, capsys, monkeypatch):
    """numba's first compilation can swallow the exception a signal handler raises ("Exception ignored in ...");
    here a __del__ does the same with the very handler the CLI installed: the run must still stop, exit 143."""
    import minivae.train.loop as loop
    real = loop._Step.loss
    fired = []

    class Swallows:
        def __del__(self):                         # exceptions raised in __del__ are printed and dropped
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    def loss(self, *a, **k):
        if not fired:
            fired.append(1)
            Swallows()                             # collected at once: the handler's exception is swallowed
        return real(self, *a, **k)
    monkeypatch.setattr(loop._Step, "loss", loss)
    code, out, err = run_main(["train", *SMALL, "--epochs", "3", "--no-figures", "--out", tmp_path / "r"], capsys)
    assert fired and code == 143, (out, err)
    assert "terminated (SIGTERM) at epoch 1" in err.strip().splitlines()[-1]
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


# --------------------------------------------------------------- 9, 10, 11: a run folder is a run or nothing
def test_force_removes_the_previous_runs_figures(run, tmp_path, capsys):
    r = copy_run(run, tmp_path)
    assert (r / "figures" / "manifold.png").exists()
    (r / "figures" / "samples.npz").write_bytes(b"old samples")
    code, out, err = run_main(["train", *SMALL, "--latent", "3", "--out", r, "--force"], capsys)
    assert code == 0, err
    figs = sorted(p.name for p in (r / "figures").iterdir())
    assert "manifold.png" not in figs and "latent_scatter.png" not in figs and "samples.npz" not in figs
    assert "samples.png" in figs and load_checkpoint(r).config.z_dim == 3


def test_resume_with_fewer_epochs_is_refused_and_changes_nothing(tmp_path, capsys):
    r = tmp_path / "r"
    assert run_main(["train", *SMALL, "--epochs", "2", "--no-figures", "--out", r], capsys)[0] == 0
    old = snapshot(r)
    code, _, err = run_main(["train", "--resume", "--out", r, "--epochs", "1", "--quiet"], capsys)
    assert code == 2
    one_error_line(err, "already holds 2 epochs", "--epochs 1", "--epochs 2 or more")
    assert snapshot(r) == old
    assert json.loads((r / "settings.json").read_text())["epochs"] == 2


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    import minivae.train.loop as loop
    r = tmp_path / "r"
    r.mkdir()
    argv = ["train", *SMALL, "--no-figures", "--out", r]
    real = loop._Step.loss

    def ctrl_c(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop._Step, "loss", ctrl_c)
    code, _, err = run_main(argv, capsys)
    assert code == 130 and "no checkpoint was written yet" in err
    assert os.listdir(r) == [".lock"] or os.listdir(r) == []
    monkeypatch.setattr(loop._Step, "loss", real)
    code, _, err = run_main(argv, capsys)               # the same command again: no --force needed
    assert code == 0, err
    assert load_checkpoint(r).epoch == 1
    # a diverged first epoch leaves nothing either
    d = tmp_path / "div"
    code, _, err = run_main(["train", *SMALL, "--likelihood", "gaussian", "--binarize", "none", "--obs-var", "1e-12",
                             "--out", d], capsys)
    assert code == 1 and not (d / "settings.json").exists()


def test_epochs_0_is_a_run_and_an_orphan_settings_file_blocks_nothing(tmp_path, capsys):
    r = tmp_path / "r0"
    code, _, err = run_main(["train", *SMALL, "--epochs", "0", "--no-figures", "--out", r], capsys)
    assert code == 0, err
    assert load_checkpoint(r).epoch == 0 and json.loads((r / "settings.json").read_text())["epochs"] == 0
    code, _, err = run_main(["train", "--resume", "--out", r, "--epochs", "1", "--quiet", "--no-figures"], capsys)
    assert code == 0, err
    assert load_checkpoint(r).epoch == 1
    o = tmp_path / "orphan"                              # what an older minivae's failed run left
    o.mkdir()
    (o / "settings.json").write_text("{}")
    code, _, err = run_main(["train", "--resume", "--out", o, "--quiet"], capsys)
    assert code == 2
    one_error_line(err, "checkpoint not found", "stopped before its first checkpoint", "without --resume")
    code, _, err = run_main(["train", *SMALL, "--no-figures", "--out", o], capsys)
    assert code == 0, err
    assert load_checkpoint(o).epoch == 1


# ------------------------------------------------------------- 13: every checkpoint field, by type and range
def corrupt(path, key, change):
    """Rewrite one JSON entry of a checkpoint (``change(doc)`` edits it in place, or returns a replacement)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if key.startswith("opt/") and key != "opt/meta":
        arrays[key] = change(arrays[key])
    else:
        doc = json.loads(str(arrays[key]))
        new = change(doc)
        arrays[key] = np.array(json.dumps(doc if new is None else new))
    np.savez(path, **arrays)


def _drop(key):
    return lambda d: (d.pop(key), None)[1]


@pytest.mark.parametrize("key, change, field", [
    ("settings", lambda d: d.update(data="/some/folder"), "settings.data"),
    ("settings", lambda d: d.update(test_seed="12345"), "settings.test_seed"),
    ("settings", lambda d: d.update(warmup="2"), "settings.warmup"),
    ("settings", lambda d: d.update(n_test="32"), "settings.n_test"),
    ("settings", lambda d: d.update(hidden=[-8]), "settings.hidden"),
    ("settings", lambda d: d.update(lr=-1.0), "settings.lr"),
    ("settings", lambda d: d.update(momentum=1.0), "settings.momentum: expected a finite number in [0, 1)"),
    ("settings", lambda d: d.update(seed=None), "settings.seed"),
    ("settings", lambda d: d.update(dtype="x"), "settings.dtype"),        # eval once cast the data with it: TypeError
    ("settings", lambda d: d.update(binarize="x"), "settings.binarize"),  # eval once binarized for any name
    ("settings", lambda d: d.update(backend="x"), "settings.backend"),
    ("config", lambda d: d.update(dtype="float16"), "config.dtype"),
    ("opt/meta", _drop("t"), "opt/meta.t"),
    ("opt/meta", lambda d: d.update(t="many"), "opt/meta.t"),
    ("opt/meta", lambda d: d.update(lr=None), "opt/meta.lr"),
    ("rng", lambda d: {k: 7 for k in d}, "rng.init"),
    ("rng", lambda d: [1, 2], "rng"),
    ("rng", lambda d: d["eps"]["state"].update(state="x"), "rng.eps"),
    ("config", lambda d: d.update(z_dim="2"), "config.z_dim"),
    ("history", lambda d: d[0].update(epoch="one"), "history[0].epoch"),
    ("history", lambda d: d.clear(), "history: expected one record per epoch 1..1"),            # fewer than epoch
    ("history", lambda d: d.append(dict(d[0], epoch=2)), "history: expected one record per epoch 1..1"),   # more
    ("history", lambda d: d[0].update(epoch=3), "history: expected one record per epoch 1..1"),   # renumbered
    ("opt/0.m", lambda a: a.astype(np.int64), "opt/0.m"),
])
def test_every_corrupt_checkpoint_field_is_one_line_naming_it(run, tmp_path, capsys, key, change, field):
    r = copy_run(run, tmp_path)
    ckpt = r / "checkpoint.npz"
    corrupt(ckpt, key, change)
    for argv in (["eval", "--checkpoint", r, "--n", "16"], ["train", "--resume", "--out", r, "--epochs", "2"],
                 ["sample", "--checkpoint", r, "--out", tmp_path / "s"]):
        code, _, err = run_main(argv, capsys)
        assert code == 2, (argv, err)
        one_error_line(err, str(ckpt), f"corrupt field {field}")


def test_the_schema_covers_every_field():
    import dataclasses

    from minivae.checkpoint_schema import CONFIG, SETTINGS
    from minivae.model import MODEL_KINDS
    from minivae.train import TrainSettings
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(TrainSettings)}
    fields = {"kind"}.union(*({f.name for f in dataclasses.fields(k.config)} for k in MODEL_KINDS.values()))
    assert set(CONFIG) == fields
    from minivae import backend, checkpoint_schema, config, data        # the schema's names are the code's
    assert checkpoint_schema.DTYPES == config.DTYPES and checkpoint_schema.BINARIZE == data.BINARIZE
    assert checkpoint_schema.BACKENDS == backend.BACKENDS


# ------------------------------------------------------ 1, 4, 15: every size checked before work starts
def test_sample_that_cannot_fit_on_the_disk_is_refused_before_drawing(run, tmp_path, capsys, monkeypatch):
    import minivae.figures as figures
    monkeypatch.setattr(figures, "sample_chunks", lambda *a, **k: pytest.fail("samples were drawn"))
    code, _, err = run_main(["sample", "--checkpoint", run, "--n", "1e12", "--out", tmp_path], capsys)
    assert code == 2
    one_error_line(err, "sample --n 1000000000000 writes about", "free on that disk", "smaller --n")
    assert os.listdir(tmp_path) == []
    import minivae.limits as limits                      # a disk with 1 MB free refuses 3000 samples (9 MB)
    monkeypatch.setattr(limits, "free_disk_bytes", lambda folder: 1_000_000)
    code, _, err = run_main(["sample", "--checkpoint", run, "--n", "3000", "--out", tmp_path], capsys)
    assert code == 2
    one_error_line(err, "writes about 9.4 MB", "1.0 MB free")


def test_work_that_cannot_finish_is_refused_with_its_estimate(run, tmp_path, capsys, monkeypatch):
    import minivae.evaluate as evaluate
    monkeypatch.setattr(evaluate, "iw_log_likelihood", lambda *a, **k: pytest.fail("the IW bound was started"))
    code, _, err = run_main(["eval", "--checkpoint", run, "--iw-k", "1e12"], capsys)
    assert code == 2
    one_error_line(err, "eval --nll-k 1000000000000 on 10000 images needs at least", "multiply-adds", "smaller --nll-k")
    code, _, err = run_main(["train", *SMALL, "--iwae-k", "1e13", "--out", tmp_path / "t"], capsys)
    assert code == 2
    one_error_line(err, "--iwae-k 10000000000000", "needs at least", "multiply-adds")
    assert not (tmp_path / "t").exists()


def test_a_long_but_feasible_request_shows_its_estimate(run, tmp_path, capsys, monkeypatch):
    import minivae.limits as limits
    monkeypatch.setattr(limits, "SHOW_SECONDS", 0.0)      # every request counts as long here
    code, out, err = run_main(["eval", "--checkpoint", run, "--nll-k", "3", "--n", "16"], capsys)
    assert code == 0, err
    assert "minivae: estimate: eval --nll-k 3 on 16 images: at least" in err


def test_iwae_noise_is_drawn_in_chunks_whatever_k(monkeypatch):
    """The IWAE noise (K, N, L) was drawn in one piece: 25 GB for K = 2e6.  Now every draw is one chunk, and the
    loss and gradients are those of the one-piece draw (the same stream)."""
    from minivae import VAE, VAEConfig
    m = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = (np.random.default_rng(1).random((5, 16)) < 0.5).astype(np.float64)
    eps = np.random.default_rng(7).standard_normal((400, 5, 3))
    want, g_want = m.loss(x, eps=eps, iwae_k=400)
    m.IWAE_CHUNK_ELEMENTS = 16 * 5 * 10                  # 10 samples of 5 rows a chunk

    class Recording:
        def __init__(self, g):
            self.g, self.sizes = g, []

        def standard_normal(self, size, dtype=np.float64):
            self.sizes.append(size)
            return self.g.standard_normal(size, dtype=dtype)

        def __getattr__(self, name):
            return getattr(self.g, name)
    m.rng = Recording(np.random.default_rng(7))
    got, g_got = m.loss(x, iwae_k=400)
    assert max(s[0] for s in m.rng.sizes) == 10 and sum(s[0] for s in m.rng.sizes) == 2 * 400   # two passes
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert np.allclose(g_got.flat, g_want.flat, rtol=1e-9, atol=1e-12)
    follow = np.random.default_rng(7)
    follow.standard_normal((400, 5, 3))
    assert m.rng.g.bit_generator.state == follow.bit_generator.state   # the generator moved by one K draw


# --------------------------------------------------------------------- 3: never write over the input
def test_eval_json_never_replaces_the_checkpoint_it_reads(run, tmp_path, capsys):
    r = copy_run(run, tmp_path)
    old = snapshot(r)
    for target in (r / "checkpoint.npz", r / "." / "checkpoint.npz"):
        code, _, err = run_main(["eval", "--checkpoint", r, "--json", target], capsys)
        assert code == 2
        one_error_line(err, f"--json {target} is", "a file this command reads")
    link = tmp_path / "link.json"
    link.symlink_to(r / "checkpoint.npz")
    code, _, err = run_main(["eval", "--checkpoint", r / "checkpoint.npz", "--json", link], capsys)
    assert code == 2
    one_error_line(err, "a file this command reads")
    assert snapshot(r) == old


# ---------------------------------------------------------------- 7, 8, 12, 15: data and messages
def write_split(folder, split, x, y):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{split}.npz", x=x, y=y)


def test_conv_training_compares_the_test_images_shape(tmp_path, capsys):
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    write_split(d, "train", rng.random((16, 28, 28)), np.zeros(16, dtype=np.int64))
    write_split(d, "test", rng.random((8, 14, 56)), np.zeros(8, dtype=np.int64))
    code, _, err = run_main(["train", "--recipe", "conv", "--data-dir", d, "--epochs", "1", "--batch-size", "8",
                             "--quiet", "--out", tmp_path / "o"], capsys)
    assert code == 2
    one_error_line(err, "train images have shape (28, 28), test images (14, 56)")


@pytest.mark.parametrize("bad, shown", [(7.7, "7.7"), (np.nan, "nan")])
def test_float_labels_are_checked_not_truncated(tmp_path, capsys, bad, shown):
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    y = np.arange(16, dtype=np.float64) % 3
    write_split(d, "train", rng.random((16, 784)), y)
    y2 = y.copy()
    y2[5] = bad
    write_split(d, "test", rng.random((16, 784)), y2)
    code, _, err = run_main(["train", *SMALL, "--conditional", "--data-dir", d, "--out", tmp_path / "o"], capsys)
    assert code == 2
    one_error_line(err, str(d / "test.npz"), "not whole numbers", f"row 5: {shown}")
    write_split(d, "test", rng.random((16, 784)), y)      # whole numbers stored as floats are fine
    assert run_main(["train", *SMALL, "--conditional", "--no-figures", "--data-dir", d, "--out", tmp_path / "o"],
                    capsys)[0] == 0


def test_negative_labels_are_named_as_negative(tmp_path, capsys):
    """All-negative labels once read "the labels holds label -1, outside 0..-1 (0 classes)"."""
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    write_split(d, "train", rng.random((16, 784)), -(np.arange(16) % 3) - 1)
    write_split(d, "test", rng.random((16, 784)), np.arange(16) % 3)
    code, _, err = run_main(["train", *SMALL, "--conditional", "--data-dir", d, "--out", tmp_path / "o"], capsys)
    assert code == 2
    line = one_error_line(err, str(d / "train.npz"), "label -3 is negative", "class indices 0..K-1")
    assert "0..-1" not in line and "0 classes" not in line
    assert not (tmp_path / "o").exists()


def test_an_empty_npz_is_named(tmp_path, capsys):
    d = tmp_path / "d"
    write_split(d, "train", np.zeros((0, 784)), np.zeros(0, dtype=np.int64))
    write_split(d, "test", np.zeros((4, 784)), np.zeros(4, dtype=np.int64))
    code, _, err = run_main(["train", *SMALL, "--data-dir", d, "--out", tmp_path / "o"], capsys)
    assert code == 2
    one_error_line(err, str(d / "train.npz"), "holds no images")


def test_interpolate_out_of_range_index_is_one_line(run, tmp_path, capsys):
    for flags, flag in ((["--a", "99999"], "--a 99999"), (["--b", "32"], "--b 32")):
        code, _, err = run_main(["interpolate", "--checkpoint", run, *flags, "--out", tmp_path], capsys)
        assert code == 2
        one_error_line(err, f"{flag} is out of range", "32 images")


def test_a_negative_seed_names_the_flag(run, tmp_path, capsys):
    for argv in (["train", *SMALL, "--seed", "-1", "--out", tmp_path / "o"],
                 ["sample", "--checkpoint", run, "--seed", "-1", "--out", tmp_path]):
        code, _, err = run_main(argv, capsys)
        assert code == 2
        assert "argument --seed: expected an integer >= 0, got '-1'" in err and "Traceback" not in err


# ------------------------------------------------------------- 14, 15: one line, naming the culprit
WARNS_THEN_DIVERGES = """
import sys
import numpy as np
import minivae.train.loop as loop
def loss(self, xb, idx, beta):
    with np.errstate(all="warn"):
        v = np.exp(np.float32(1000.0)) - np.exp(np.float32(1000.0))      # overflow, then inf - inf
        np.log(np.float32(-1.0))
    return v, {"recon": v, "kl": v}
loop._Step.loss = loss
from minivae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_warnings_are_folded_into_the_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-c", WARNS_THEN_DIVERGES, "train", *SMALL, "--no-figures", "--out",
                        tmp_path / "o"], capture_output=True, text=True, env=ENV, timeout=240)
    assert p.returncode == 1, p.stderr
    line = one_error_line(p.stderr.replace("RuntimeWarning", "Runtime-warning"), "loss became nan at epoch 1, step 1")
    assert "after the warning Runtime-warning: overflow encountered in exp and 2 more" in line


def test_a_full_disk_names_the_file_and_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    real, calls = np.savez, []

    def savez(f, **arrays):
        calls.append(1)
        if len(calls) == 2:                        # the second epoch's checkpoint: the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(f, **arrays)
    monkeypatch.setattr(np, "savez", savez)
    r = tmp_path / "r"
    code, _, err = run_main(["train", *SMALL, "--epochs", "3", "--no-figures", "--out", r], capsys)
    assert code == 2
    one_error_line(err, f"cannot write {r / 'checkpoint.npz'} (No space left on device)",
                   "training stopped at epoch 2", f"last good checkpoint kept at {r / 'checkpoint.npz'} (epoch 1)")
    assert load_checkpoint(r).epoch == 1 and temp_files(r) == []
    assert [h["epoch"] for h in json.loads((r / "history.json").read_text())] == [1]


# ------------------------------------------------- fault injection: every output under a small ulimit -f
UNDER_ULIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG, not a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
from minivae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_every_output_under_a_small_ulimit_leaves_the_disk_as_it_was(run, tmp_path):
    """Each command that writes, run with every file limited to 200 bytes (``ulimit -f``): each fails with one
    line naming the file, and nothing that was on disk before has changed, no temporary file is left, and a
    new output folder holds nothing (a run or nothing)."""
    r = copy_run(run, tmp_path)
    assert main(["sample", "--checkpoint", str(r), "--n", "2000", "--out", str(r / "figures" / "big.npz")]) == 0
    (tmp_path / "mirror").mkdir()
    from minivae.data import embedded_dir
    for f in embedded_dir().iterdir():                      # a local mirror of the registry's files
        if f.is_file():
            shutil.copy(f, tmp_path / "mirror" / f.name)
    before = snapshot(tmp_path)
    cases = [
        ["train", *SMALL, "--out", tmp_path / "new"],                              # a new run
        ["train", "--resume", "--out", r, "--epochs", "2", "--quiet"],           # checkpoint, history, settings
        ["train", *SMALL, "--epochs", "0", "--out", r, "--force"],               # a forced run over the old one
        ["eval", "--checkpoint", r, "--n", "16", "--json", r / "eval.json"],
        ["sample", "--checkpoint", r, "--out", r / "figures" / "samples.png"],
        ["sample", "--checkpoint", r, "--n", "2000", "--out", r / "figures" / "big.npz"],
        ["sample", "--checkpoint", r, "--out", r / "figures"],                     # a new picture
        ["interpolate", "--checkpoint", r, "--out", r / "figures"],
        ["manifold", "--checkpoint", r, "--out", r / "figures"],
        ["lessons", tmp_path / "lessons"],
        ["download", "mnist", "--cache", tmp_path / "cache", "--url", (tmp_path / "mirror").as_uri()],
    ]
    for argv in cases:
        p = subprocess.run([sys.executable, "-c", UNDER_ULIMIT, *map(str, argv)], capture_output=True, text=True,
                           env=ENV, timeout=240)
        assert p.returncode == 2, (argv, p.returncode, p.stdout[-1000:], p.stderr[-2000:])
        line = one_error_line(p.stderr)
        assert "cannot write" in line and "File too large" in line, (argv, line)
        assert snapshot(tmp_path) == before, argv
        assert temp_files(tmp_path) == [], argv
    assert not (tmp_path / "lessons").exists()
    assert not (tmp_path / "new").exists() or [p.name for p in (tmp_path / "new").iterdir()] in ([], [".lock"])
    assert not (tmp_path / "cache" / "mnist").exists() or list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_iwae_memory_is_counted_for_what_each_model_kind_holds():
    """The plain VAE's IWAE holds one chunk of samples whatever K; a kind that holds all K at once (a flow) is
    counted with all K, so `--flow planar:2 --iwae-k 100000` is refused instead of allocating 250 GB."""
    from minivae.limits import training_bytes
    from minivae.train import TrainSettings
    vae = TrainSettings(hidden=(400,)).model_config(784)
    assert training_bytes(vae, 128, 10 ** 7) == training_bytes(vae, 128, 10 ** 4) < 2e9
    flow = TrainSettings(flow="planar:2").model_config(784)
    assert training_bytes(flow, 128, 10 ** 5) > 100 * training_bytes(flow, 128, 10 ** 2)
    with pytest.raises(ValueError, match=r"needs about .* of memory.*--iwae-k"):
        TrainSettings(flow="planar:2", iwae_k=10 ** 7).validate()


def test_figures_never_replace_the_checkpoint(run, tmp_path, capsys):
    r = copy_run(run, tmp_path)
    ckpt = r / "checkpoint.npz"
    old = snapshot(r)
    (tmp_path / "trap").mkdir()
    for name in ("interpolation.png", "manifold.png"):
        (tmp_path / "trap" / name).symlink_to(ckpt)       # the output file is the checkpoint itself
    for command in ("interpolate", "manifold"):
        code, _, err = run_main([command, "--checkpoint", r, "--out", tmp_path / "trap"], capsys)
        assert code == 2
        one_error_line(err, "--out", "a file this command reads")
    assert snapshot(r) == old


def test_an_unknown_settings_field_is_named_with_the_file(run, tmp_path, capsys):
    r = copy_run(run, tmp_path)
    corrupt(r / "checkpoint.npz", "settings", lambda d: d.update(bogus=1))
    for argv in (["train", "--resume", "--out", r, "--epochs", "2"], ["eval", "--checkpoint", r, "--n", "16"]):
        code, _, err = run_main(argv, capsys)
        assert code == 2
        one_error_line(err, str(r / "checkpoint.npz"), "settings", "bogus")


def test_a_signal_during_the_cleanup_still_removes_the_temporary_file(tmp_path):
    """Ctrl-C twice: the second arrives while atomic_write removes its temporary file after the first."""
    code = f"""
import os, signal, sys
from minivae import signals
from minivae.atomic import atomic_write
def write(f):
    f.write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGINT)
real = os.unlink
def unlink(p, *a, **k):                   # the second Ctrl-C lands just before the file is removed
    os.kill(os.getpid(), signal.SIGINT)
    return real(p, *a, **k)
os.unlink = unlink
try:
    with signals.handled():
        atomic_write({str(tmp_path / 'out.bin')!r}, write)
except KeyboardInterrupt:
    sys.exit(130)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 130, p.stderr
    assert os.listdir(tmp_path) == []


COMPILING = '''
import os, signal
def compile_kernel():
    """Stands in for numba's compiler: its LLVM callbacks swallow an exception and leave the compilation broken."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        done = True
    except BaseException:
        raise RuntimeError("no compiled object yet")
    return done
'''


def test_a_sigterm_during_numbas_compilation_waits_for_it_then_stops(tmp_path, capsys, monkeypatch):
    import minivae.train.loop as loop
    namespace = {"__name__": "numba.core.compiler_stand_in"}
    exec(COMPILING, namespace)
    real = loop._Step.loss
    compiled = []

    def loss(self, *a, **k):
        if not compiled:
            compiled.append(namespace["compile_kernel"]())       # the first step compiles the kernels
        return real(self, *a, **k)
    monkeypatch.setattr(loop._Step, "loss", loss)
    code, out, err = run_main(["train", *SMALL, "--epochs", "2", "--no-figures", "--out", tmp_path / "r"], capsys)
    assert compiled == [True] and code == 143, err
    one_error_line(err, "terminated (SIGTERM) at epoch 1, step 1; no checkpoint was written yet")


MAKE_INTERRUPTED = """
import os, signal, sys
import minivae.assignments.make as mk
real = mk._write
def _write(out, *a, **k):
    (out / "partial.txt").write_text("half a copy")
    os.kill(os.getpid(), signal.{sig})
    return real(out, *a, **k)
mk._write = _write
from minivae.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, rc, said", [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")])
@pytest.mark.parametrize("prog", [["assignments"], []], ids=["minivae-assignments", "minivae.assignments"])
def test_assignments_make_stopped_by_a_signal_leaves_no_half_made_copy(tmp_path, sig, rc, said, prog):
    """A SIGTERM during `make` once killed it mid-copy (no message): a half-made student copy that a rerun refused
    as "not an empty folder", and that could be handed out."""
    out = tmp_path / "hw1"
    code = MAKE_INTERRUPTED.format(sig=sig)
    if not prog:                                    # python -m minivae.assignments: its own main
        code = code.replace("from minivae.cli import main", "from minivae.assignments.__main__ import main")
    p = subprocess.run([sys.executable, "-c", code, *prog, "make", str(out)], capture_output=True, text=True,
                       env=ENV, timeout=240)
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and said in p.stderr.strip().splitlines()[-1], p.stderr
    assert not out.exists() and not (tmp_path / "hw1.manifest.json").exists(), os.listdir(tmp_path)


def test_train_out_that_is_a_file_is_named(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, err = run_main(["train", *SMALL, "--out", f], capsys)
    assert code == 2
    one_error_line(err, f"--out {f} exists and is not a folder")
    assert f.read_text() == "mine"


def test_the_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(run, tmp_path, capsys):
    """A SIGKILL during `sample` left `.samples.npz.<pid>.<random>.tmp` for ever; the next write of that file removes
    the temporary files of writers that are gone, and keeps a live writer's."""
    import itertools
    dead = next(pid for pid in itertools.count(4_000_000) if not os.path.exists(f"/proc/{pid}"))
    out = tmp_path / "s"
    out.mkdir()
    stale = out / f".samples.npz.{dead}.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)
    live = out / f".samples.npz.{os.getppid()}.w0rk1ng.tmp"
    live.write_bytes(b"\0" * 10)
    other = out / f".other.npz.{dead}.k1ll3d.tmp"
    other.write_bytes(b"\0" * 10)
    fresh = out / f".samples.npz.{dead}.fr3sh.tmp"         # dead to os.kill, but written a moment ago: kept
    fresh.write_bytes(b"\0" * 10)
    for p in (stale, live, other):
        os.utime(p, (1e9, 1e9))                             # untouched since 2001
    code, _, err = run_main(["sample", "--checkpoint", run, "--n", "1500", "--out", out / "samples.npz"], capsys)
    assert code == 0, err
    assert not stale.exists() and live.exists() and other.exists() and fresh.exists()
    assert (out / "samples.npz").exists()


# ------------------------------------------------------- round three: a command never writes over its run's files
@pytest.mark.parametrize("name", ["settings.json", "results.json", "history.json", "history.csv", ".lock"])
def test_eval_json_never_replaces_a_record_of_the_run_it_reads(run, tmp_path, capsys, name):
    r = copy_run(run, tmp_path)
    old = snapshot(r)
    code, _, err = run_main(["eval", r, "--json", r / name], capsys)
    assert code == 2
    one_error_line(err, f"--json {r / name} is", "a file this command reads")
    assert snapshot(r) == old


def test_force_never_removes_a_file_minivae_did_not_write(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "figures").mkdir(parents=True)
    (proj / "figures" / "my_plot.png").write_bytes(b"mine")
    (proj / "figures" / "samples.png").write_bytes(b"an old minivae sample grid")
    (proj / "notes.txt").write_text("precious")
    code, _, err = run_main(["train", *SMALL, "--no-figures", "--out", proj, "--force"], capsys)
    assert code == 0, err
    assert (proj / "figures" / "my_plot.png").read_bytes() == b"mine"
    assert (proj / "notes.txt").read_text() == "precious"
    assert not (proj / "figures" / "samples.png").exists()


def test_a_truncated_checkpoint_is_one_line_without_a_leaked_file(run, tmp_path):
    r = copy_run(run, tmp_path)
    data = (r / "checkpoint.npz").read_bytes()
    (r / "checkpoint.npz").write_bytes(data[:len(data) // 2])
    p = subprocess.run([sys.executable, "-X", "dev", "-m", "minivae", "eval", str(r)], capture_output=True,
                       text=True, env=ENV, timeout=240)
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr, "checkpoint.npz: not a readable .npz checkpoint")
    assert "unclosed file" not in p.stderr


def test_an_output_file_in_a_missing_folder_is_refused_not_created(run, tmp_path, capsys):
    typo = tmp_path / "typo_dir" / "a"
    for argv, flag in ((["eval", run, "--n", "16", "--json", typo / "x.json"], "--json"),
                       (["sample", run, "--out", typo / "x.png"], "--out")):
        code, _, err = run_main(argv, capsys)
        assert code == 2, err
        one_error_line(err, f"{flag} {typo}", f"the folder {typo} does not exist")
        assert not (tmp_path / "typo_dir").exists()
    out = tmp_path / "new" / "folder"                         # a folder sample --out DIR owns: made as documented
    code, _, err = run_main(["sample", run, "--out", out], capsys)
    assert code == 0 and (out / "samples.png").is_file(), err


def test_the_memory_check_counts_the_datas_own_width(tmp_path, capsys, monkeypatch):
    import minivae.limits as limits
    from minivae.train import TrainSettings
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    write_split(d, "train", rng.random((32, 16)), np.zeros(32, dtype=np.int64))
    write_split(d, "test", rng.random((16, 16)), np.zeros(16, dtype=np.int64))
    s = TrainSettings(hidden=(64,), latent=2, batch_size=8)
    narrow, mnist = (limits.training_bytes(s.model_config(w), 8) for w in (16, 784))
    monkeypatch.setattr(limits, "available_bytes", lambda: (narrow + mnist) // 2)   # fits 16 inputs, not 784
    code, out, err = run_main(["train", "--data-dir", d, "--epochs", "1", "--hidden", "64", "--latent", "2",
                               "--batch-size", "8", "--quiet", "--no-figures", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "o").config.x_dim == 16


def test_a_label_far_out_of_range_names_the_label_and_the_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    y = np.array([0, 1, 10 ** 9] * 20)
    write_split(d, "train", rng.random((60, 16)), y)
    write_split(d, "test", rng.random((60, 16)), y)
    code, _, err = run_main(["train", "--epochs", "1", "--hidden", "8", "--latent", "2", "--quiet", "--conditional",
                             "--no-figures", "--data-dir", d, "--out", tmp_path / "o"], capsys)
    assert code == 2
    one_error_line(err, str(d / "train.npz"), "label 1000000000 is out of range")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- leftovers: huge weights, optimizer state, temp files
def scaled_checkpoint(run, tmp_path, factor=1e30):
    """A copy of ``run`` whose every parameter is multiplied by ``factor``: finite, but overflowing when used."""
    r = copy_run(run, tmp_path)
    path = r / "checkpoint.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k in arrays:
        if k.startswith("param/"):
            arrays[k] = arrays[k] * arrays[k].dtype.type(factor)
    np.savez(path, **arrays)
    return r


@pytest.mark.parametrize("argv, what", [
    (["eval"], "the evaluation gave a non-finite neg_elbo"),
    (["sample"], "the sampling gave a non-finite value"),
    (["sample", "--n", "1100"], "the sampling gave a non-finite value"),          # the .npz path
    (["interpolate"], "the interpolation gave a non-finite value"),
    (["manifold", "--grid", "3"], "the manifold decoding gave a non-finite value")])
def test_a_checkpoint_whose_weights_overflow_is_refused_by_every_command(run, tmp_path, capsys, argv, what):
    """Parameters times 1e30 are finite, so the checkpoint loads; eval refused it, but sample, interpolate and
    manifold drew NaN (or saturated) pictures with NumPy RuntimeWarnings.  Now each refuses in one line, exit 2,
    without the warnings and without writing anything."""
    r = scaled_checkpoint(run, tmp_path)
    old = snapshot(r)
    code, out, err = run_main([argv[0], r, *argv[1:]], capsys)
    assert code == 2, (out, err)
    one_error_line(err, f"{r / 'checkpoint.npz'}: {what}", "the model overflows")
    assert "wrote" not in out
    assert snapshot(r) == old and temp_files(r) == []


def edit_checkpoint(path, change):
    """Rewrite the checkpoint at ``path`` with ``change(arrays)`` applied (arrays: {key: array})."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(path, **arrays)


def set_meta(**fields):
    def change(arrays):
        meta = json.loads(str(arrays["opt/meta"]))
        meta.update(fields)
        arrays["opt/meta"] = np.array(json.dumps(meta))
    return change


def negate_first(key):
    def change(arrays):
        a = arrays[key].copy()
        a.flat[0] = -1.0
        arrays[key] = a
    return change


@pytest.mark.parametrize("optimizer, change, fragment", [
    ("adam", set_meta(t=0), "corrupt field opt/meta.t: expected 2 (the optimizer steps of the 1 finished epoch), "
                            "got 0"),
    ("adam", set_meta(t=3), "corrupt field opt/meta.t: expected 2"),
    ("sgd", set_meta(t=1), "corrupt field opt/meta.t: expected 2"),
    ("adam", set_meta(lr=0.0), "corrupt field opt/meta.lr: expected 0.001"),
    ("adam", set_meta(lr=0.5), "corrupt field opt/meta.lr: expected 0.001"),
    ("adam", set_meta(lr=-1e-3), "corrupt field opt/meta.lr"),
    ("adam", negate_first("opt/0.v"), "corrupt field opt/0.v: expected entries >= 0"),
    ("adagrad", negate_first("opt/0.sum_sq"), "corrupt field opt/0.sum_sq: expected entries >= 0"),
])
def test_implausible_optimizer_state_is_refused_on_resume(tmp_path, capsys, optimizer, change, fragment):
    """Type-correct but impossible optimizer state (Adam's step count t = 0 after an epoch, a learning rate the
    settings never gave, a negative sum of squares) was resumed silently and trained differently; it is refused
    in one line naming the field and the value it must have, and the run folder is left as it was."""
    r = tmp_path / "r"
    code, _, err = run_main(["train", *SMALL, "--no-figures", "--optimizer", optimizer, "--out", r], capsys)
    assert code == 0, err
    edit_checkpoint(r / "checkpoint.npz", change)
    old = snapshot(r)
    code, _, err = run_main(["train", "--resume", "--out", r, "--epochs", "2", "--quiet"], capsys)
    assert code == 2
    one_error_line(err, f"{r / 'checkpoint.npz'}: ", fragment)
    assert snapshot(r) == old


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adagrad"])
def test_every_optimizer_resumes_bit_exactly_with_a_short_last_batch_and_a_schedule(tmp_path, optimizer):
    """The checks of the resumed optimizer state accept every honest checkpoint: 70 images in batches of 32 (a
    last batch of 6), a learning-rate schedule that changes between the epochs, each optimizer."""
    from minivae.train import TrainSettings, train
    kw = dict(n_train=70, n_test=16, batch_size=32, hidden=(8,), latent=2, figures=False, optimizer=optimizer,
              lr=2e-3, schedule=[[1, 2e-3], [1, 1e-3], [1, 5e-4]])
    train(TrainSettings.from_recipe("default", epochs=3, **kw), tmp_path / "full", progress=False, log=lambda m: 0)
    train(TrainSettings.from_recipe("default", epochs=2, **kw), tmp_path / "part", progress=False, log=lambda m: 0)
    assert load_checkpoint(tmp_path / "part").opt_meta["t"] == 2 * 3
    train(TrainSettings.from_recipe("default", epochs=3, **kw), tmp_path / "part", resume=True, progress=False,
          log=lambda m: 0)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.epoch == b.epoch == 3 and a.opt_meta == b.opt_meta == {"name": optimizer, "t": 9, "lr": 5e-4}
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    for k in a.opt_state:
        assert np.array_equal(a.opt_state[k], b.opt_state[k]), k


def dead_pid():
    import itertools
    return next(pid for pid in itertools.count(4_000_000) if not os.path.exists(f"/proc/{pid}"))


@pytest.mark.parametrize("argv", [["sample", "{r}", "--out", "{o}"], ["eval", "{r}", "--n", "8"],
                                  ["interpolate", "{r}", "--out", "{o}"],
                                  ["train", "--resume", "--out", "{r}", "--epochs", "2", "--quiet", "--no-figures"]])
def test_a_killed_writers_temporary_files_go_with_the_next_command_on_the_run(run, tmp_path, capsys, argv):
    """A SIGKILL during a save left `.checkpoint.npz.<pid>.<random>.tmp` (as large as the checkpoint) in the run
    folder until that same file was written again.  Now the next command on the run removes every temporary file
    of minivae's exact name whose writer is gone, when no run holds the folder's lock; never another file."""
    r = copy_run(run, tmp_path)
    dead = dead_pid()
    stale = [r / f".checkpoint.npz.{dead}.k1ll3d_0.tmp", r / "figures" / f".samples.png.{dead}.abcdefgh.tmp"]
    kept = [r / ".notes.tmp", r / f".checkpoint.npz.{dead}.short.tmp", r / ".checkpoint.npz.k1ll3d_0.tmp",
            r / f"checkpoint.npz.{dead}.k1ll3d_0.tmp", r / f".checkpoint.npz.{dead}.k1ll3d_0.tmp.bak",
            r / f".checkpoint.npz.{dead}.K1LL3D_0.tmp", r / f".history.json.{os.getppid()}.w0rk1ng_.tmp",
            r / "figures" / f".samples.png.x{dead}.abcdefgh.tmp"]
    for p in stale + kept:
        p.write_bytes(b"\0" * 4096)
    words = [a.format(r=r, o=tmp_path / "o") for a in argv]
    code, out, err = run_main(words, capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale), [p.name for p in stale if p.exists()]
    assert all(p.exists() for p in kept), [p.name for p in kept if not p.exists()]
    said = (out + err).replace(str(r), "RUN")
    assert f"removed 2 temporary file(s) left in RUN by an interrupted write: {stale[0].name}, figures/{stale[1].name}" \
        in said, said


def test_a_folder_a_run_is_writing_keeps_its_temporary_files(run, tmp_path, capsys):
    """While a run holds the folder's lock (it writes there), another command removes nothing in it."""
    from minivae.train import RunLock
    r = copy_run(run, tmp_path)
    stale = r / f".checkpoint.npz.{dead_pid()}.k1ll3d_0.tmp"
    with RunLock(r):
        stale.write_bytes(b"\0" * 4096)
        code, _, err = run_main(["sample", r, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert stale.exists() and "removed" not in err
    code, _, err = run_main(["sample", r, "--out", tmp_path / "o"], capsys)      # the lock is free: it goes
    assert code == 0 and not stale.exists() and "removed 1 temporary file(s)" in err


def test_a_forced_run_stopped_before_its_first_checkpoint_does_not_call_the_earlier_one_its_own(tmp_path, capsys,
                                                                                             monkeypatch):
    # train --force over a 2-epoch run, SIGTERM in the new run's first step: the message said "last good
    # checkpoint kept at .../checkpoint.npz (epoch 2)", as if this run had got that far; the file is the
    # earlier run's, kept whole
    import minivae.train.loop as loop
    out = tmp_path / "r"
    code, _, err = run_main(["train", *SMALL, "--epochs", "2", "--no-figures", "--out", out], capsys)
    assert code == 0, err
    before = (out / "checkpoint.npz").read_bytes()
    real = loop._Step.loss

    def loss(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)
    monkeypatch.setattr(loop._Step, "loss", loss)
    code, _, err = run_main(["train", *SMALL, "--epochs", "3", "--no-figures", "--force", "--out", out], capsys)
    assert code == 143, err
    one_error_line(err, f"this run wrote no checkpoint yet; the earlier run's {out / 'checkpoint.npz'} (epoch 2) "
                        "is kept as it was")
    assert (out / "checkpoint.npz").read_bytes() == before
    # a run that did write one names it as before
    calls = []

    def later(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:                        # epoch 3: this run has written two checkpoints
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)
    monkeypatch.setattr(loop._Step, "loss", later)
    code, _, err = run_main(["train", *SMALL, "--epochs", "9", "--no-figures", "--force", "--out", out], capsys)
    assert code == 143 and "last good checkpoint kept at" in err and "earlier run" not in err, err


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_anything_runs(tmp_path, capsys):
    # every size a user gives is checked: --batch-size 1e9 on the default model asks for terabytes of activations
    out = tmp_path / "r"
    code, _, err = run_main(["train", "--batch-size", "1e9", "--epochs", "1", "--no-figures", "--out", out], capsys)
    assert code == 2, err
    one_error_line(err, "memory")
    assert "TB" in err and not out.exists()
