"""Every limit of the protocol, once, with where its value comes from.

What a misbehaving peer can make us do is bounded by these numbers: every length on the wire is
checked against them before anything is allocated. ``model_limits`` derives the limits of a
joined connection from the model both sides announced; chief and worker both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedberry.protocol import encodings

# -- tensors ---------------------------------------------------------------------------------
# dtypes a model may carry. Object, string, void and structured dtypes are excluded on purpose:
# they are the ones numpy can only build from Python objects. Big-endian is refused rather than
# swapped so that every receiver can read straight into a native (little-endian) buffer.
ALLOWED_DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)
MAX_DIMS = 8  # torch and numpy models stay far below this; numpy's own limit is 64.
MAX_ELEMENTS = 1 << 40  # per tensor: 4 TiB of float32, far past any payload limit

# -- frames ----------------------------------------------------------------------------------
# Metadata is JSON of a few hundred bytes plus ~30 bytes per tensor; 1 MiB covers 10k tensors
# with room to spare.
MAX_META_BYTES = 1 << 20
# Large vision models have ~1k state tensors.
MAX_TENSORS = 10_000
# One frame's tensor bytes: a 1B-parameter float32 model, far past what a Raspberry Pi trains.
# Both sides clamp a model's frames to it (``model_limits``).
MAX_PAYLOAD = 4 << 30
# Metadata per tensor of a joined connection's frames: a description is ~40 bytes
# ({"dtype":"<f4","shape":[200,784]}); 128 leaves room for long shapes.
META_BYTES_PER_TENSOR = 128
# Before authentication only small tensor-free frames: an anonymous connection (or a wrong
# address, for a worker) cannot make us allocate more than this for metadata. 256 KiB holds a
# model spec (in AUTH) of ~8k tensors at about 30 bytes each.
PREAUTH_META_BYTES = 256 << 10

# -- fields ----------------------------------------------------------------------------------
MAX_WORKER_ID = 128  # characters; a host name is at most 253, a certificate CN at most 64
# HELLO's agent ("fedberry/0.1.0 python/3.11.7"): shown on the chief's status page, no more.
MAX_AGENT = 64
MAX_METRICS = 32  # metrics an UPDATE may carry: a few numbers (loss, accuracy); the rest dropped
MAX_METRIC_NAME = 64  # characters of a metric's name kept
# A sample count is a count: at most 2**53, the largest integer a float64 holds exactly. Past
# that no data set exists, and such a weight would only drown every other worker's update.
MAX_NUM_SAMPLES = float(2 ** 53)
MAX_ERROR_CODE = 64  # characters: codes are short words ("auth_failed")
MAX_ERROR_MESSAGE = 8192  # characters of an ERROR's sentence kept (ours are under 500)
DIGEST_CHARS = 64  # a SHA-256 in hex (codecs.digest)
# The tensors' names a worker's AUTH may carry (torch state_dict keys, Keras weight paths), used
# only to name the tensors of the chief's model file. A torch key is rarely past 100 characters;
# all of them together stay far inside the pre-authentication metadata (PREAUTH_META_BYTES),
# next to the spec: a model whose names are longer is sent without them.
MAX_TENSOR_NAME = 256  # characters
MAX_TENSOR_NAMES_CHARS = 64 << 10  # characters of all the names together
# A GLOBAL's round configuration (``config``): a few hyperparameters for the round (a learning
# rate, local epochs), not a data channel. 32 keys of 64-character names and 256-character
# strings keep a GLOBAL's metadata under ~12 KiB, well inside the frame's metadata limit.
MAX_CONFIG_KEYS = 32
MAX_CONFIG_STRING = 256

# -- connections (the TCP chief's defaults; ``ListenOptions`` takes them) --------------------
# Seconds a frame of tensors may take to arrive once the chief has let it into its receive
# memory. Not the round timeout: a round below --min-workers waits past its deadline anyway, and
# an honest Pi on Wi-Fi can need minutes for a large model (40 MB over a 1 Mbit/s uplink: about
# 5 minutes; 10 leave room).
UPDATE_DEADLINE = 600.0
# What stops a worker that trickles its update sooner: bytes/s below which an update in flight
# is dropped, once UPDATE_RATE_GRACE seconds have passed. 8 KiB/s is 64 kbit/s, far below the
# worst Wi-Fi or mobile uplink an honest worker has, and 8,000 times a 1 byte/s trickler; the
# grace lets TCP's slow start and a busy Pi's first second pass.
MIN_UPDATE_RATE = 8192.0
UPDATE_RATE_GRACE = 10.0
# Bytes the chief keeps queued for one peer beyond two global models (which a worker that
# reads may have in flight: the one it is reading and the next round's). Every other frame is
# small (PONG, ERROR, WELCOME, an unchanged GLOBAL): 1 MiB of them is a peer that sends and
# never reads, and each such peer could otherwise grow the chief without bound.
SEND_QUEUE_SLACK = 1 << 20
# Refused connections (busy, handshake not completed in time) are logged at most once per
# this many seconds per reason, with how many more there were: a flood of connections must
# not become a flood of log lines (88 MB a minute was measured).
REFUSAL_LOG_INTERVAL = 1.0
# Failed authentications, all addresses together, before every answer to an AUTH is held for
# the longest delay (auth_delay_max): the per-address delay alone lets a spray of addresses
# guess at ~1,000 per second; with this budget spent, at most max_connections guesses are
# answered per auth_delay_max (256 / 8 s = 32 per second by default).
AUTH_FAILURES_GLOBAL = 100
AUTH_FAILURES_GLOBAL_WINDOW = 60.0  # seconds over which those failures are counted
# Connections from one address whose answer to AUTH is held back. They do not take the
# address's handshake slots (a storm of 16 guesses at a time must not keep an honest worker
# behind the same address out), but one address must not hold all 256 connection slots either:
# 64 is four storms of 16, and caps one address's guessing at 64 per auth_delay_max (8/s).
MAX_AUTH_WAITING_PER_ADDRESS = 64
# A worker id held by a joined connection is handed to a new connection only if the holder
# says nothing for this long after a PING (then it is a link that died without a FIN, which a
# reconnecting worker leaves behind). A live worker answers within a round trip: its I/O runs
# on its own thread, whatever it computes; bytes of an update it is sending count as an answer.
TAKEOVER_PROBE = 2.0


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts in one frame. Checked before allocating.

    max_payload: the receiver lowers this to its model's size once it knows the model
    (``model_limits``); before authentication it is 0, so an unauthenticated peer cannot make
    us allocate tensors.
    """

    max_meta_bytes: int = MAX_META_BYTES
    max_tensors: int = MAX_TENSORS
    max_payload: int = MAX_PAYLOAD


PREAUTH_LIMITS = Limits(max_meta_bytes=PREAUTH_META_BYTES, max_tensors=MAX_TENSORS,
                        max_payload=0)


def model_limits(spec: Sequence[Any], codecs: Iterable[str], cap: Limits | None = None) -> Limits:
    """The limits of a joined connection whose frames carry the model ``spec`` in one of
    ``codecs`` (``encodings.FRAME_CODECS`` of the frames it receives): exactly the largest of
    those frames, with a payload never past ``cap.max_payload`` (the receiver's own ceiling,
    ``MAX_PAYLOAD`` when ``cap`` is None). Metadata and tensor counts follow the model alone:
    a model of many tensors must not be refused for having them."""
    cap = cap or Limits()
    wires = [encodings.wire_spec(c, spec) for c in codecs]
    tensors = max((len(w) for w in wires), default=0)
    payload = max((sum(t.nbytes for t in w) for w in wires), default=0)
    return Limits(max_meta_bytes=max(PREAUTH_META_BYTES, META_BYTES_PER_TENSOR * tensors),
                  max_tensors=max(tensors, 1),
                  max_payload=min(cap.max_payload, payload))
