"""The global model on its way out: encoded once per round in each form it takes, with the chief's
own copy kept equal, bit for bit, to what the workers decode.

Keeping them equal is what makes lossy downlinks safe: the chief evaluates and checkpoints the
model the workers train from, and decodes their q8 updates against it.

* ``none``: the model as it is.
* ``fp16``: the chief rounds its model to half precision in place, then sends the halves.
* ``q8``: the change since the previous round's model, quantized (codecs.Q8) with error feedback
  kept here; the chief's model becomes previous + decoded change, which every worker computes the
  same way. Only a connection that was sent the previous round's model can take it; any other
  (a worker that joined, reconnected or fell behind) gets the whole model as it is.

Round 0, the model everyone starts from, always goes whole: workers built from the same seed hold
it already (and get ``unchanged``), and every worker's first reference must be exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from fedberry import codecs
from fedberry.chief.state import Chief
from fedberry.protocol.frames import EncodedFrame, MsgType, encode, spec_of

log = logging.getLogger("fedberry.chief")


class Broadcast:
    def __init__(self, downlink: str = "none") -> None:
        self.codec = codecs.get(codecs.check_name(downlink, codecs.DOWNLINK_CODECS, "downlink"))
        self._round: int | None = None  # the round prepared
        self._fits = False  # fp16: this round's model fits half precision
        self._delta: list[np.ndarray] | None = None  # q8: this round's change, encoded
        self._prev: tuple[int, list[np.ndarray]] | None = None  # q8: the last round's model
        self._residual: list[np.ndarray] | None = None  # q8: what rounding has not sent yet
        self._frames: dict[tuple[int, bool, bool], EncodedFrame] = {}
        self._digest: str | None = None
        # The round's metadata beyond the model (``messages.round_extras``: its config, whether
        # it asks for evaluations), given by the runtime: (round, done) -> metadata entries.
        self.extras: Callable[[int, bool], dict[str, Any]] = lambda r, done: {}

    def prepare(self, chief: Chief) -> None:
        """Bring the chief's model to what the workers will decode; once per round, before it is
        checkpointed, evaluated or sent."""
        r, model = chief.round, chief.global_arrays
        if self._round == r or model is None:
            return
        self._round, self._fits, self._delta = r, False, None
        self._frames, self._digest = {}, None
        if r > 0 and isinstance(self.codec, codecs.Fp16):
            self._fits = self.codec.project(model)
            if not self._fits:
                log.warning("round %d: the model does not fit in float16; sent as it is", r)
        elif r > 0 and self.codec.name == "q8" and self._prev and self._prev[0] == r - 1:
            prev = self._prev[1]
            if self._residual is None:
                self._residual = [np.zeros(a.shape, np.result_type(a.dtype, np.float32))
                                  if a.dtype.kind == "f" else np.zeros(0) for a in model]
            self._delta = self.codec.encode(model, prev, self._residual)
            for a, d in zip(model, self.codec.decode(self._delta, spec_of(model), prev)):
                if a.dtype.kind == "f":
                    np.copyto(a, d)
        if self.codec.name == "q8":
            self._prev = (r, model)  # strategies return fresh arrays: this one stays as it is

    def frame(self, chief: Chief, holds_round: int | None = None) -> EncodedFrame:
        """GLOBAL for a connection that was last sent the model of ``holds_round``."""
        self.prepare(chief)
        delta = self._delta is not None and holds_round == chief.round - 1
        key = (chief.round, chief.done, delta)
        frame = self._frames.get(key)
        if frame is None:
            meta: dict[str, Any] = {"round": chief.round, "done": chief.done,
                                    **self.extras(chief.round, chief.done)}
            arrays: list[np.ndarray] = chief.global_arrays or []
            if delta:
                meta.update(codec="q8", base=chief.round - 1)
                arrays = self._delta  # type: ignore[assignment]
            elif self._fits:
                meta["codec"] = self.codec.name
                arrays = self.codec.encode(arrays)
            frame = self._frames[key] = encode(MsgType.GLOBAL, meta, arrays)
        return frame

    def unchanged(self, chief: Chief) -> EncodedFrame:
        """GLOBAL for a worker that holds the model already (its digest matched)."""
        return encode(MsgType.GLOBAL, {"round": chief.round, "done": chief.done,
                                       "codec": "unchanged",
                                       **self.extras(chief.round, chief.done)})

    def digest(self, chief: Chief) -> str | None:
        """SHA-256 of the current model (codecs.digest), once per round."""
        if chief.global_arrays is None:
            return None
        self.prepare(chief)
        if self._digest is None:
            self._digest = codecs.digest(chief.global_arrays)
        return self._digest
