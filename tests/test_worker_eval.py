"""Evaluation on the workers: the chief asks every ``evaluate_every`` rounds (and for the final
model), workers that offer ``evaluate`` answer on their own held-out data, and the metrics line
carries every key's example-weighted mean; a worker without evaluate is not waited for, a late
answer is dropped, and the protocol holds an EVAL_RESULT to its checks."""

import threading
import time

import numpy as np
import pytest

from fedberry import Worker, serve
from fedberry.chief.evaluation import FederatedEvaluation, weighted_means
from fedberry.protocol.connection import (
    Auth,
    Challenge,
    ChiefConnection,
    Hello,
    LocalProtocolError,
    Welcome,
    WorkerConnection,
)
from fedberry.protocol.frames import ProtocolError, spec_of
from fedberry.protocol.messages import EvalResult, Global, to_frame

DIM = 3


def _held_out(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x @ np.arange(1, DIM + 1) + rng.normal(size=n)).astype(np.float32)


def _evaluator(seed: int, n: int, log: list, extra: bool = False, pause: float = 0.0):
    x, y = _held_out(seed, n)

    def evaluate(arrays):
        time.sleep(pause)
        err = x @ arrays[0] - y
        metrics = {"mse": float(np.mean(err ** 2)), "mae": np.float32(np.mean(np.abs(err)))}
        if extra:
            metrics["only_here"] = 0.25
        log.append(metrics)
        return n, metrics
    return evaluate


def _train(worker: Worker, seed: int, errors: list) -> None:
    try:
        x, y = _held_out(1000 + seed, 30)  # the training shard
        (w,) = worker.join([np.zeros(DIM, np.float32)])
        while not worker.done:
            w = w - 0.1 * (2 * x.T @ (x @ w - y) / len(y))
            (w,) = worker.sync([w.astype(np.float32)], len(y))
        worker.close()
    except Exception as exc:  # surfaced by the test
        errors.append(exc)


def _run(handle, workers: list[tuple[Worker, int]]) -> list:
    errors: list = []
    threads = [threading.Thread(target=_train, args=(w, s, errors)) for w, s in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert handle.wait(10)
        return handle.metrics
    finally:
        handle.stop()


def test_weighted_means_average_each_key_over_those_that_report_it():
    got = weighted_means([(10, {"a": 1.0, "b": 4.0}), (30, {"a": 3.0})])
    assert got == {"a": pytest.approx((10 + 90) / 40), "b": 4.0}
    ev = FederatedEvaluation(every=2, timeout=5.0)
    assert [r for r in range(1, 6) if ev.asks(r, done=False)] == [2, 4] and ev.asks(5, True)
    ev.sent(2, ["a", "b"], now=0.0)
    assert ev.pending(2, 1.0) and ev.report("a", 2, 10, {"x": 1.0}, 1.0)
    ev.left("b")  # gone: not waited for
    assert not ev.pending(2, 1.5)
    assert not ev.report("a", 3, 10, {"x": 1.0}, 1.0)  # never asked: dropped
    ev.sent(4, ["a"], now=2.0)
    assert not ev.pending(4, 7.5) and not ev.report("a", 4, 1, {}, 7.5)  # past its timeout
    ev.sent(6, ["late-joiner"], now=8.0)  # asked after round 6's line was written
    ev.sent(8, ["a"], now=8.0)
    assert ev.take(8) is None and not ev.open  # closing round 8 forgets round 6 too


def test_two_workers_give_the_example_weighted_mean_of_their_metrics():
    handle = serve("127.0.0.1:0", workers=3, rounds=3, token="t", evaluate_every=2,
                   evaluate_timeout=30.0)
    logs: dict[str, list] = {"a": [], "b": []}
    a = Worker(handle.url, token="t", worker_id="a", evaluate=_evaluator(1, 50, logs["a"],
                                                                          extra=True))
    b = Worker(handle, worker_id="b", evaluate=_evaluator(2, 150, logs["b"]))  # in-process
    c = Worker(handle.url, token="t", worker_id="c")  # offers no evaluation: not waited for
    metrics = _run(handle, [(a, 0), (b, 1), (c, 2)])
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert "federated_eval" not in metrics[0]
    assert len(logs["a"]) == len(logs["b"]) == 2  # asked at round 2 and for the final model
    for line, la, lb in zip(metrics[1:], logs["a"], logs["b"]):
        fe = line["federated_eval"]
        assert fe["workers"] == 2 and fe["num_examples"] == 200
        for key in ("mse", "mae"):
            expect = np.average([la[key], lb[key]], weights=[50, 150])
            assert fe[key] == pytest.approx(expect, rel=1e-6), key
        assert fe["only_here"] == 0.25  # only a reports it: a's value
    # Beside the chief's own evaluation columns, in the same line.
    assert "test_accuracy" in metrics[1]


def test_a_late_evaluation_is_dropped_and_the_line_is_not_held_for_it():
    written: list[float] = []
    handle = serve("127.0.0.1:0", workers=2, rounds=1, token="t", evaluate_every=1,
                   evaluate_timeout=0.3, on_round=lambda line: written.append(time.monotonic()))
    slow_log: list = []
    fast = Worker(handle.url, token="t", worker_id="fast",
                  evaluate=_evaluator(1, 20, []))
    slow = Worker(handle.url, token="t", worker_id="slow",
                  evaluate=_evaluator(2, 20, slow_log, pause=1.0))
    started = time.monotonic()
    metrics = _run(handle, [(fast, 0), (slow, 1)])
    assert metrics[0]["federated_eval"]["workers"] == 1 and len(slow_log) == 1
    assert written[0] - started < 1.0  # written at the timeout, before the slow answer
    assert not fast.session.warnings and not slow.session.warnings


def test_the_torch_drop_in_evaluates_the_global_model():
    torch = pytest.importorskip("torch", reason="the torch extra")
    from fedberry.integrations.torch import FederatedOptimizer, get_arrays

    handle = serve("127.0.0.1:0", workers=1, rounds=2, token="t", evaluate_every=1)
    x, y = (torch.tensor(a) for a in _held_out(3, 40))
    seen: list = []

    def evaluate(model):
        seen.append([a.copy() for a in get_arrays(model)])
        return len(x), {"mse": float(torch.mean((model(x).squeeze(1) - y) ** 2))}

    model = torch.nn.Linear(DIM, 1)
    with FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model,
                            chief=handle.url, sync_every=1, token="t",
                            evaluate=evaluate) as opt:
        while not opt.done:
            opt.zero_grad()
            torch.mean((model(x).squeeze(1) - y) ** 2).backward()
            opt.step()
    try:
        assert handle.wait(10)
        metrics = handle.metrics
        final = handle.chief.global_arrays
    finally:
        handle.stop()
    assert [m["federated_eval"]["num_examples"] for m in metrics] == [40, 40]
    for got, want in zip(seen[-1], final):  # the final evaluation saw the final model
        np.testing.assert_array_equal(got, want)


def test_an_evaluation_result_is_held_to_the_protocols_checks():
    assert EvalResult(2, 10, {"acc": 1}).metrics == {"acc": 1.0}
    for kwargs, why in [(dict(num_examples=0), "num_examples"),
                        (dict(metrics={"acc": float("nan")}), "finite"),
                        (dict(metrics={"acc": "high"}), "must be a number"),
                        (dict(metrics={f"m{i}": 1.0 for i in range(40)}), "more than"),
                        (dict(round=-1), "round")]:
        args = {"round": 1, "num_examples": 5, "metrics": {}, **kwargs}
        with pytest.raises(ProtocolError, match=why):
            EvalResult(**args)


def test_the_keras_callback_applies_the_lr_and_evaluates():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip(os.environ["KERAS_BACKEND"], reason="the Keras backend")
    keras = pytest.importorskip("keras", reason="the keras extra")
    from fedberry.chief.round_config import Schedule
    from fedberry.integrations.keras import FederatedCallback

    schedule = Schedule({"lr": {0: 0.05, 1: 0.02}})
    handle = serve("127.0.0.1:0", workers=1, rounds=2, token="t", evaluate_every=1,
                   round_config=schedule)
    x, y = _held_out(5, 32)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    lrs: list[float] = []

    def evaluate(m):
        lrs.append(float(m.optimizer.learning_rate))
        return len(x), {"mse": float(np.mean((m.predict(x, verbose=0)[:, 0] - y) ** 2))}

    cb = FederatedCallback(chief=handle.url, sync_every=2, token="t", evaluate=evaluate)
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[cb])
    try:
        assert handle.wait(10)
        metrics = handle.metrics
    finally:
        handle.stop()
    assert [m["federated_eval"]["num_examples"] for m in metrics] == [32, 32]
    # The lr set with the model of the last round is the optimizer's now.
    assert float(model.optimizer.learning_rate) == pytest.approx(schedule(2)["lr"])
    assert lrs  # evaluate ran inside fit


def _joined(evaluates: bool):
    spec = spec_of([np.zeros(DIM, np.float32)])
    c, w = ChiefConnection("tok"), WorkerConnection("tok", spec)

    def deliver(sender, receiver, msg):
        return receiver.receive_data(sender.send(msg).tobytes())

    deliver(w, c, Hello("w"))
    deliver(c, w, Challenge())
    deliver(w, c, Auth(spec, evaluates=evaluates))
    deliver(c, w, Welcome(0))
    return c, w, deliver


def test_the_chief_takes_one_evaluation_per_request_and_only_from_evaluators():
    c, w, deliver = _joined(evaluates=True)
    assert c.evaluates
    (g,) = deliver(c, w, Global(1, [np.zeros(DIM, np.float32)], evaluate=True))
    assert g.evaluate and w.eval_asked == 1
    (ev,) = deliver(w, c, EvalResult(1, 10, {"acc": 0.5}))
    assert isinstance(ev, EvalResult) and ev.metrics == {"acc": 0.5}
    with pytest.raises(LocalProtocolError):  # our own side sends one answer per request
        w.send(EvalResult(1, 10, {"acc": 0.5}))
    with pytest.raises(ProtocolError, match="did not ask"):  # nor takes a second one
        c.receive_data(to_frame(EvalResult(1, 10, {})).tobytes())

    c, w, _ = _joined(evaluates=False)  # said at join that it does not evaluate
    with pytest.raises(ProtocolError, match="not allowed"):
        c.receive_data(to_frame(EvalResult(0, 10, {})).tobytes())


def test_an_evaluation_claiming_more_examples_than_the_sample_bound_is_refused(caplog):
    from fedberry.chief.admission import AdmissionPolicy

    # The bound on an update's samples (max_samples) holds for an evaluation's examples too:
    # a worker claiming more would own the federated mean.
    # Two rounds: the first line is not held for the refused answer (30 s timeout).
    written: list[float] = []
    handle = serve("127.0.0.1:0", workers=2, rounds=2, token="t", evaluate_every=1,
                   evaluate_timeout=30.0, admission=AdmissionPolicy(max_samples=1000),
                   on_round=lambda line: written.append(time.monotonic()))
    started = time.monotonic()

    def poison(arrays):
        return 5000, {"mse": 1e9}
    honest = Worker(handle.url, token="t", worker_id="honest", evaluate=_evaluator(1, 40, []))
    liar = Worker(handle.url, token="t", worker_id="liar", evaluate=poison)
    with caplog.at_level("WARNING", logger="fedberry.chief"):
        metrics = _run(handle, [(honest, 0), (liar, 1)])
    assert written[0] - started < 20
    for line in metrics:
        fe = line["federated_eval"]
        assert fe["workers"] == 1 and fe["num_examples"] == 40 and fe["mse"] < 1e3
    refused = [r.getMessage() for r in caplog.records if "liar" in r.getMessage()]
    assert refused[0] == ("worker liar: its evaluation of round 1 is refused and not counted: "
                          "it claims 5000 samples, more than the chief admits (max_samples "
                          "1000)") and len(refused) == 2
