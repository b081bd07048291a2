"""The chief's average, with real worker processes over real TCP sockets, equals numpy's
sample-weighted mean of what each worker sent; every worker gets the same global model back."""

import subprocess
import textwrap

import numpy as np
from helpers import fedberry_env, processes, python

from fedberry.serve import serve

SHAPES = [(64, 33), (33,), (3, 4, 5), (1,)]

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from fedberry import Worker

    url, index, n, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    shapes = {shapes!r}
    with Worker(url, worker_id=f"avg-{{index}}") as w:
        start = w.join([np.zeros(s, np.float32) for s in shapes])
        rng = np.random.default_rng(index)
        mine = [(g + rng.standard_normal(g.shape)).astype(np.float32) for g in start]
        new = w.sync(mine, n)
        np.savez(out, *mine, *new, done=np.array(w.done))
""").format(shapes=SHAPES)


def test_chief_average_matches_numpy_weighted_mean(tmp_path):
    rounds = 1
    rng = np.random.default_rng(99)
    initial = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    samples = [5, 120, 33]
    env = fedberry_env(FEDBERRY_TOKEN="average-test-token")
    handle = serve("127.0.0.1:0", workers=3, rounds=rounds, initial=initial,
                   token="average-test-token")
    try:
        with processes() as procs:
            for i, n in enumerate(samples):
                procs.append(subprocess.Popen(
                    python("-c", WORKER, handle.url, str(i), str(n), str(tmp_path / f"w{i}.npz")),
                    env=env))
            for p in procs:
                assert p.wait(60) == 0
        assert handle.wait(10)
        chief_model = handle.chief.global_arrays
    finally:
        handle.stop()

    sent, got = [], []
    for i in range(3):
        with np.load(tmp_path / f"w{i}.npz") as z:
            k = len(SHAPES)
            sent.append([z[f"arr_{j}"] for j in range(k)])
            got.append([z[f"arr_{j}"] for j in range(k, 2 * k)])
            assert bool(z["done"])
    for t in range(len(SHAPES)):
        ref = sum(n * s[t].astype(np.float64) for n, s in zip(samples, sent)) / sum(samples)
        np.testing.assert_allclose(chief_model[t], ref, rtol=1e-6, atol=1e-6)
        for g in got:
            np.testing.assert_array_equal(g[t], chief_model[t])
    # The workers' updates were built on the chief's initial weights (seeded noise added).
    noise0 = np.random.default_rng(0).standard_normal(SHAPES[0])
    np.testing.assert_allclose(sent[0][0], initial[0] + noise0, rtol=1e-6, atol=1e-6)
