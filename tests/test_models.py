"""Reference models: shapes, parameter counts, weights <-> arrays, and a short training run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedberry.data.fashion_mnist import DEFAULT_DATA_DIR, load_fashion_mnist  # noqa: E402
from fedberry.demo.models import (  # noqa: E402
    array_names,
    build_model,
    evaluate,
    get_arrays,
    model_input,
    set_arrays,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Reproducible timing on a shared machine; restored so other test modules are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "count"), [("mlp", 199_210), ("cnn", 1_663_370)])
def test_shapes_and_parameter_counts(name, count):
    model = build_model(name, seed=0)
    assert n_params(model) == count  # both numbers are quoted in the FedAvg paper
    x = model_input(name, np.random.default_rng(0).random((3, 784), dtype=np.float32))
    assert x.shape == ((3, 784) if name == "mlp" else (3, 1, 28, 28))
    assert model(x).shape == (3, 10)


def test_model_input_shares_memory_and_accepts_read_only():
    x = np.zeros((4, 784), np.float32)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = model_input("cnn", x)
    assert t.dtype == torch.float32 and t.data_ptr() == x.ctypes.data


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model("mlp", 7), build_model("mlp", 7), build_model("mlp", 8)
    assert torch.rand(1) == expected
    for x, y in zip(get_arrays(a), get_arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(get_arrays(a)[0], get_arrays(c)[0])


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 0)


def test_get_set_round_trip():
    src, dst = build_model("cnn", 1), build_model("cnn", 2)
    arrays = get_arrays(src)
    assert len(arrays) == len(array_names(src)) == 8
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
    # Read-only views, as a transport would deliver them straight from a frame.
    received = [np.frombuffer(a.tobytes(), np.float32).reshape(a.shape) for a in arrays]
    set_arrays(dst, received)
    x = model_input("cnn", np.random.default_rng(0).random((2, 784), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(src(x), dst(x), rtol=0, atol=0)


def test_get_arrays_are_copies():
    model = build_model("mlp", 0)
    arrays = get_arrays(model)
    arrays[1][:] = 42.0
    assert not torch.any(model.state_dict()[array_names(model)[1]] == 42.0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not np.array_equal(get_arrays(model)[0], arrays[0])


def test_set_arrays_mismatch_names_the_tensor_and_changes_nothing():
    model = build_model("mlp", 0)
    before = get_arrays(model)
    good = get_arrays(build_model("mlp", 1))
    assert array_names(model)[3] == "3.bias"
    bad_shape = good[:3] + [np.zeros(5, np.float32)] + good[4:]
    with pytest.raises(ValueError, match=r"3\.bias: expected shape \(200,\), got \(5,\)"):
        set_arrays(model, bad_shape)
    bad_dtype = good[:-1] + [good[-1].astype(np.float64)]
    with pytest.raises(ValueError, match=r"5\.bias: expected a float32 .* got float64"):
        set_arrays(model, bad_dtype)
    with pytest.raises(ValueError, match="expected 6 arrays"):
        set_arrays(model, good[:-1])
    for x, y in zip(get_arrays(model), before, strict=True):
        np.testing.assert_array_equal(x, y)


def test_evaluate_untrained_is_chance_level():
    rng = np.random.default_rng(0)
    x, y = rng.random((500, 784), dtype=np.float32), rng.integers(0, 10, 500)
    model = build_model("mlp", 0).train()
    acc, loss = evaluate(model, model_input("mlp", x), y, batch_size=64)
    assert 0.0 <= acc <= 0.3 and abs(loss - np.log(10)) < 0.3
    assert model.training  # mode restored


@pytest.mark.skipif(not DEFAULT_DATA_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_mlp_learns_fashion_mnist_in_one_epoch():
    ds = load_fashion_mnist(DEFAULT_DATA_DIR)
    model = build_model("mlp", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = model_input("mlp", ds.x_train[:20_000]), torch.from_numpy(ds.y_train[:20_000].copy())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for batch in order.split(32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    acc, loss = evaluate(model, model_input("mlp", ds.x_test), ds.y_test)
    # Seeds 0-7 give 0.767-0.815 on 20k samples; 0.7 leaves room for other CPUs' rounding.
    assert acc > 0.7, (acc, loss)
