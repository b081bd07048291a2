"""A worker that reconnects while its round is open, is sent the round's model when it closes,
and whose resent update arrives after that, gets ONE model (the state machine, no sockets).

A second one would sit in the worker's queue and answer its next update at once: it would
skip a round (seen in tests/test_secagg_wire.py under load, when a worker reconnected just
before a failed secure round closed)."""

from __future__ import annotations

import numpy as np

from fedberry.chief.state import Chief, ChiefConfig, SendError, SendGlobal
from fedberry.protocol.frames import spec_of
from fedberry.strategies import FedAvg

SPEC = spec_of([np.zeros(3, np.float32)])


def _sent_to(actions: list) -> list[str]:
    return sorted(w for a in actions if isinstance(a, SendGlobal) for w in a.worker_ids)


def _chief() -> Chief:
    chief = Chief(ChiefConfig(2, 3), FedAvg(), initial=[np.zeros(3, np.float32)])
    for w in ("a", "b"):
        assert _sent_to(chief.join(w, SPEC, 0)) == [w]
    return chief


def test_a_resend_that_crosses_the_rounds_model_gets_no_second_model() -> None:
    chief = _chief()
    chief.update("a", 0, 1, [np.ones(3, np.float32)], {}, 1)
    chief.leave("a", 2)
    assert chief.join("a", SPEC, 3, want_model=False) == []  # back, still waiting
    assert _sent_to(chief.update("b", 0, 1, [np.ones(3, np.float32)], {}, 4)) == ["a", "b"]
    # a's resend, sent on its new connection before the model above reached it
    acts = chief.update("a", 0, 1, [np.ones(3, np.float32)], {}, 5)
    assert acts == []


def test_a_resend_on_a_connection_made_after_the_close_still_gets_the_model() -> None:
    chief = _chief()
    chief.update("a", 0, 1, [np.ones(3, np.float32)], {}, 1)
    chief.update("b", 0, 1, [np.ones(3, np.float32)], {}, 2)  # closes; a's model may be lost
    assert chief.join("a", SPEC, 3, want_model=False) == []
    acts = chief.update("a", 0, 1, [np.ones(3, np.float32)], {}, 4)
    assert _sent_to(acts) == ["a"] and not [x for x in acts if isinstance(x, SendError)]
