"""The Lightning drop-in: a ``Trainer`` with ``FederatedCallback`` in two worker processes over
real TCP averages like numpy, records the training loss, and ends on the federation's model,
which the chief writes as OUT/model.safetensors under the module's state_dict keys."""

import subprocess
import textwrap

import numpy as np
import pytest
from helpers import fedberry_env, processes, python

torch = pytest.importorskip("torch", reason="the torch extra")
pytest.importorskip("lightning", reason="the lightning extra")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="the torch extra")

from fedberry import serve  # noqa: E402
from fedberry.chief import model_file  # noqa: E402

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    import lightning
    from fedberry.integrations.torch import get_arrays
    from fedberry.lightning import FederatedCallback

    url, index, n, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    SYNC_EVERY = {sync_every}

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(),
                                           torch.nn.Linear(4, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Snapshot(lightning.Callback):
        # Listed before the federated callback: sees the weights it is about to send.
        def __init__(self, fed):
            self.fed, self.sent = fed, []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (not self.fed.done
                    and trainer.global_step - self.fed._synced_at >= self.fed.sync_every):
                self.sent.append(get_arrays(module))

    torch.manual_seed(index)  # a different local start: the join must replace it
    g = torch.Generator().manual_seed(100 + index)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g),
                                          torch.randint(0, 2, (64,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = Tiny()
    fed = FederatedCallback(url, sync_every=SYNC_EVERY, num_samples=n,
                            worker_id=f"lightning-{{index}}")
    snap = Snapshot(fed)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=100, enable_progress_bar=False,
                                logger=False, enable_checkpointing=False,
                                enable_model_summary=False, callbacks=[snap, fed])
    trainer.fit(module, loader)
    final = get_arrays(module)
    np.savez(out, sent=np.stack([np.concatenate([a.ravel() for a in s]) for s in snap.sent]),
             final=np.concatenate([a.ravel() for a in final]), syncs=np.array(fed.syncs),
             step=np.array(trainer.global_step), done=np.array(fed.done))
""")


@pytest.mark.heavy
def test_a_lightning_trainer_in_two_tcp_worker_processes_averages_like_numpy(tmp_path):
    rounds, sync_every, samples = 3, 3, [10, 30]
    env = fedberry_env(FEDBERRY_TOKEN="lightning-token")
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, token="lightning-token",
                   out_dir=tmp_path / "out")
    try:
        with processes() as procs:
            for i, n in enumerate(samples):
                procs.append(subprocess.Popen(
                    python("-c", WORKER.format(sync_every=sync_every), handle.url, str(i),
                           str(n), str(tmp_path / f"w{i}.npz")), env=env))
            for p in procs:
                assert p.wait(240) == 0
        assert handle.wait(30)
        final = np.concatenate([a.ravel() for a in handle.chief.global_arrays])
        records = handle.metrics
    finally:
        handle.stop()
    got = [np.load(tmp_path / f"w{i}.npz") for i in range(2)]
    for w in got:
        assert int(w["syncs"]) == rounds and bool(w["done"])
        # The trainer stopped at the last round: not a step past it.
        assert int(w["step"]) == rounds * sync_every
        np.testing.assert_array_equal(w["final"], final)  # every worker ends on the chief's
    # Every round's model is the sample-weighted mean of what the two sent (numpy, float64).
    total = sum(samples)
    ref = sum(samples[i] * got[i]["sent"][-1].astype(np.float64) for i in range(2)) / total
    np.testing.assert_allclose(final, ref, rtol=1e-5, atol=1e-6)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["train_loss"] is not None and r["train_loss"] > 0 for r in records)
    # The chief's model file, named by the module's state_dict keys, loads in one line.
    path = tmp_path / "out" / model_file.FILE_NAME
    net = torch.nn.Module()
    net.net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net.load_state_dict(safetensors_torch.load_file(path))
    loaded = np.concatenate([t.detach().numpy().ravel() for t in net.state_dict().values()])
    np.testing.assert_array_equal(loaded, final)


def test_the_callback_applies_the_rounds_lr_and_answers_evaluation_requests() -> None:
    """In process (one worker, a Trainer in this process): the chief's round config sets the
    optimizer's lr when each round's model arrives, and ``evaluate=`` answers the chief's
    ``--evaluate-every`` requests, which land in the metrics line."""
    import lightning

    from fedberry.chief.round_config import Schedule
    from fedberry.lightning import FederatedCallback

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Lrs(lightning.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    handle = serve("127.0.0.1:0", workers=1, rounds=3, evaluate_every=1,
                   round_config=Schedule({"lr": {0: 0.05, 1: 0.02}}))
    try:
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g),
                                              torch.randint(0, 2, (32,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        asked = []

        def evaluate(module):
            asked.append(torch.is_grad_enabled())
            module.eval()  # the callback puts train mode back after
            return 32, {"accuracy": 0.5}

        lrs = Lrs()
        fed = FederatedCallback(handle, sync_every=2, evaluate=evaluate)
        trainer = lightning.Trainer(accelerator="cpu", max_epochs=20, enable_progress_bar=False,
                                    logger=False, enable_checkpointing=False,
                                    enable_model_summary=False, callbacks=[lrs, fed])
        trainer.fit(Tiny(), loader)
        assert handle.wait(30) and fed.done
    finally:
        handle.stop()
    # Round 1's model (lr 0.05) at the join, 0.02 from round 2's on; never the module's 0.5.
    assert lrs.seen[:2] == [0.05, 0.05] and set(lrs.seen[2:]) == {0.02}, lrs.seen
    assert asked and not any(asked)  # called under torch.no_grad()
    evals = [m.get("federated_eval") for m in handle.metrics]
    assert all(e and e["workers"] == 1 and e["accuracy"] == 0.5 for e in evals), evals
