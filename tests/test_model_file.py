"""The trained model as a file: OUT/model.safetensors, written by every chief, named by the
workers' tensor names; ``fedberry export`` for checkpoints of before."""

import logging
import socket
import subprocess
import threading

import numpy as np
import pytest
from helpers import fedberry_env, processes, python

from fedberry import Worker, serve
from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief import model_file
from fedberry.chief.export import export_checkpoint
from fedberry.errors import FederationError
from fedberry.protocol.limits import MAX_TENSOR_NAME
from fedberry.protocol.messages import Auth, check_tensor_names, to_frame
from fedberry.protocol.spec import ProtocolError, spec_of

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
          np.uint16, np.uint32, np.uint64, np.bool_]


def _arrays():
    rng = np.random.default_rng(0)
    out = [(rng.standard_normal((3, 5)) * 100).astype(dt) for dt in DTYPES]
    return out + [np.zeros((0, 4), np.float32), np.array(7.5, np.float32)]


# -- the format ------------------------------------------------------------------------------
def test_what_we_write_the_safetensors_package_reads_and_the_other_way(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package")
    arrays = _arrays()
    names = [f"layer.{i}.weight" for i in range(len(arrays))]
    ours = tmp_path / "ours.safetensors"
    model_file.save(ours, arrays, names, {"round": "3"})
    back = st.load_file(str(ours))
    assert set(back) == set(names)
    for n, a in zip(names, arrays):
        assert back[n].dtype == a.dtype and back[n].shape == a.shape
        np.testing.assert_array_equal(back[n], a)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(dict(zip(names, arrays)), str(theirs))
    read = model_file.load(theirs)
    for n, a in zip(names, arrays):
        np.testing.assert_array_equal(read[n], a)
    # Ours lists the tensors in the model's order (the package sorts them): load keeps it.
    assert list(model_file.load(ours)) == names


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="x.safetensors is not a safetensors file"):
        model_file.load(bad)


def test_a_failed_write_leaves_the_old_file_and_no_leftover(tmp_path):
    path = tmp_path / "model.safetensors"
    model_file.save(path, [np.ones(3, np.float32)])
    with pytest.raises(ValueError):
        model_file.save(path, [np.ones(3, np.float32), np.ones(2, np.float32)], ["a", "a"])
    with pytest.raises(ValueError, match="has no safetensors name"):
        model_file.save(path, [np.array(["s"])])
    assert list(model_file.load(path)) == ["global.0"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# -- names on the wire -----------------------------------------------------------------------
@pytest.mark.parametrize("names, why", [
    (["a"], "list of the model's 2 tensor names"),
    ("ab", "list of the model's 2 tensor names"),
    (["a", "a"], "'a' is given twice"),
    (["a", "b\n"], "printable"),
    (["a", ""], "printable"),
    (["a", 3], "printable"),
    (["a", "x" * (MAX_TENSOR_NAME + 1)], "printable"),
])
def test_bad_tensor_names_are_refused_with_a_sentence(names, why):
    spec = spec_of([np.zeros(2, np.float32), np.zeros(3, np.float32)])
    with pytest.raises(ProtocolError, match=why):
        Auth(spec, names=names)


def test_names_travel_in_auth_and_are_optional():
    spec = spec_of([np.zeros(2, np.float32), np.zeros(3, np.float32)])
    for names in (("fc.weight", "fc.bias"), None):
        msg = Auth(spec, proof="ab", names=names)
        frame = to_frame(msg)
        assert ("names" in frame.meta) == (names is not None)
        assert check_tensor_names(frame.meta.get("names", ["x", "y"]), 2)
        assert Auth.from_meta(frame.meta, None).names == names


# -- every chief writes it -------------------------------------------------------------------
def _run_numpy_workers(target, samples, steps, names=None):
    """Workers in threads: worker i sends arrays of value i+1+round, weighted by samples[i]."""
    errors = []

    def run(i):
        try:
            with Worker(target, token="t") as w:
                w.join([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], names=names)
                for r in range(steps):
                    w.sync([np.full((2, 3), i + 1 + r, np.float32),
                            np.full(4, -(i + 1 + r), np.float32)], samples[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_serve_writes_the_model_every_n_rounds_and_at_the_end_with_the_names(tmp_path):
    seen = {}

    def on_round(record):  # in round order, after that round's model file (chief.runtime)
        path = tmp_path / "model.safetensors"
        seen[record["round"]] = model_file.load(path) if path.exists() else None

    handle = serve("127.0.0.1:0", workers=2, rounds=3, token="t", out_dir=tmp_path,
                   save_every=2, on_round=on_round)
    try:
        _run_numpy_workers(handle.url, [1, 3], 3, names=["fc.weight", "fc.bias"])
        assert handle.wait(30)
        final = handle.chief.global_arrays
    finally:
        handle.stop()
    assert seen[1] is None
    # Round 2 is the weighted mean of (i+1+1): (1*2 + 3*3)/4.
    np.testing.assert_allclose(seen[2]["fc.weight"], np.full((2, 3), 11 / 4))
    got = model_file.load(tmp_path / "model.safetensors")
    assert list(got) == ["fc.weight", "fc.bias"]
    for a, b in zip(got.values(), final):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got["fc.bias"], np.full(4, -(1 * 3 + 3 * 4) / 4))
    assert handle.server.model_file.written == 3


def test_without_names_the_tensors_are_global_i_and_an_unfinished_run_still_writes(tmp_path):
    # No rounds limit: the run ends when both have left, at round 2, which save_every=5 skips.
    handle = serve(None, workers=2, out_dir=tmp_path, save_every=5)
    try:
        _run_numpy_workers(handle, [1, 1], 2)
        assert handle.wait(30)
    finally:
        handle.stop()
    got = model_file.load(tmp_path / "model.safetensors")
    assert list(got) == ["global.0", "global.1"]
    np.testing.assert_allclose(got["global.0"], np.full((2, 3), 2.5))


@pytest.mark.parametrize("policy", ["warn", "stop"])
def test_a_model_file_that_cannot_be_written_follows_the_checkpoint_policy(tmp_path, policy,
                                                                           caplog):
    (tmp_path / "model.safetensors").mkdir()  # os.replace cannot put a file there
    handle = serve(None, workers=1, rounds=2, out_dir=tmp_path, save_every=1,
                   on_checkpoint_error=policy)
    caplog.set_level(logging.WARNING, "fedberry.chief")
    try:
        errors = []
        try:
            _run_numpy_workers(handle, [1], 2)
        except AssertionError as exc:
            errors.append(exc)
        if policy == "warn":
            assert not errors
            assert handle.wait(30)
            assert handle.chief.round == 2  # every round went on
            assert "cannot write its model file" in caplog.text
        else:
            with pytest.raises(FederationError, match="cannot write its model file .*stop"):
                handle.wait(30)
    finally:
        handle.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_chief_ends_with_the_model_line_and_export_converts_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    with processes() as procs:
        procs.append(subprocess.Popen(
            python("-m", "fedberry", "chief", "--listen", f"127.0.0.1:{port}", "--workers", "1",
                   "--rounds", "2", "--model", "none", "--out", str(out), "--save-every", "0"),
            env=fedberry_env(FEDBERRY_TOKEN="t"), stdout=subprocess.PIPE, text=True))
        with Worker(f"tcp://127.0.0.1:{port}", token="t", connect_timeout=30) as w:
            w.join([np.zeros(3, np.float32)], names=["w"])
            for r in range(2):
                w.sync([np.full(3, r + 1, np.float32)], 1)
        stdout, _ = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 0, stdout
    assert stdout.strip().splitlines()[-1] == f"model: {out / 'model.safetensors'}"
    np.testing.assert_array_equal(model_file.load(out / "model.safetensors")["w"],
                                  np.full(3, 2, np.float32))
    # The checkpoint of the same run, exported: the same tensors, named global.<i>.
    proc = subprocess.run(python("-m", "fedberry", "export", str(out / "checkpoint.npz"), "-o",
                                 str(tmp_path / "x.safetensors")), env=fedberry_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"model: {tmp_path / 'x.safetensors'}"
    np.testing.assert_array_equal(model_file.load(tmp_path / "x.safetensors")["global.0"],
                                  np.full(3, 2, np.float32))


def test_export_defaults_beside_the_checkpoint_and_refuses_what_is_not_one(tmp_path):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float64)]
    ckpt_io.save(tmp_path / "checkpoint.npz", ckpt_io.Checkpoint(4, arrays, {}, {}))
    path = export_checkpoint(tmp_path / "checkpoint.npz")
    assert path == tmp_path / "model.safetensors"
    got = model_file.load(path)
    assert list(got) == ["global.0", "global.1"]
    for a, b in zip(got.values(), arrays):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    (tmp_path / "other.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="other.npz is not a readable fedberry checkpoint"):
        export_checkpoint(tmp_path / "other.npz")


def test_keras_load_weights_matches_by_path_else_by_the_files_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    pytest.importorskip("keras", reason="the keras extra")
    pytest.importorskip("torch", reason="the torch extra (the Keras backend here)")
    import keras

    import fedberry.keras
    from fedberry.integrations.keras import get_arrays, weight_names

    def build(seed):
        init = keras.initializers.GlorotUniform(seed)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, kernel_initializer=init),
                                 keras.layers.BatchNormalization(), keras.layers.Dense(2)])

    src, dst = build(1), build(2)
    arrays = [a + i for i, a in enumerate(get_arrays(src))]
    named, unnamed = tmp_path / "named.safetensors", tmp_path / "unnamed.safetensors"
    # Reversed in the file: matching by path must undo it.
    model_file.save(named, arrays[::-1], weight_names(dst)[::-1])
    model_file.save(unnamed, arrays)
    for path in (named, unnamed):
        fedberry.keras.load_weights(dst, path)
        for a, b in zip(get_arrays(dst), arrays):
            np.testing.assert_array_equal(a, b)
    model_file.save(unnamed, arrays[:-1])
    with pytest.raises(ValueError, match="holds 7 tensors, the model has 8"):
        fedberry.keras.load_weights(dst, unnamed)
