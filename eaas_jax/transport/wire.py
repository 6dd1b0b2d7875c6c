"""The wire format of the expert transport, in Python: the mirror of
``ffi/wire_format.h`` (message header, kinds, hidden dtypes, checksum) and of
the combine status codes of ``ffi/transport_common.h``, for every backend.

Only constants, the header codec and the status table live here, with no
dependency on the native library or on JAX: every other transport module
builds on this one. ``tests/test_transport_backends.py`` parses the C headers
and checks that these values equal theirs.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

# --- checksum and ids (ffi/wire_format.h: Fnv1a32) ---------------------------

#: 32-bit FNV-1a (http://www.isthe.com/chongo/tech/comp/fnv/): the header checksum.
FNV1A32_OFFSET_BASIS = 0x811C9DC5
FNV1A32_PRIME = 0x01000193
#: 64-bit FNV-1a: the default deployment id (computed in Python only).
_FNV1A64_OFFSET_BASIS = 0xCBF29CE484222325
_FNV1A64_PRIME = 0x100000001B3
_U64 = 0xFFFFFFFFFFFFFFFF

#: kWireFormatVersion: of the message header and slot layout.
WIRE_FORMAT_VERSION = 2


def fnv1a32(rows: np.ndarray) -> np.ndarray:
    """FNV-1a 32 of each row of ``uint8[N, H]``: ``uint32[N]``."""
    out = np.full(rows.shape[0], FNV1A32_OFFSET_BASIS, dtype=np.uint32)
    prime = np.uint32(FNV1A32_PRIME)
    for col in range(rows.shape[1]):
        out ^= rows[:, col]
        out *= prime  # uint32 array arithmetic wraps modulo 2**32
    return out


def endpoint_identity(deployment: str, deployment_id: int | None, dispatch_dtype: str) -> tuple[str, int]:
    """(name, 64-bit id) of the deployment an endpoint opens: what every
    backend's endpoint checks of its arguments before opening anything.

    Raises:
      ValueError: `dispatch_dtype` is not one of DISPATCH_DTYPES.
    """
    if dispatch_dtype not in DISPATCH_DTYPES:
        raise ValueError(f"dispatch_dtype must be one of {sorted(DISPATCH_DTYPES)}, got {dispatch_dtype!r}")
    deployment = str(deployment)
    return deployment, (default_deployment_id(deployment) if deployment_id is None else int(deployment_id)) & _U64


def default_deployment_id(deployment: str) -> int:
    """64-bit FNV-1a of the deployment name: the id when none is given."""
    h = _FNV1A64_OFFSET_BASIS
    for b in deployment.encode():
        h ^= b
        h = (h * _FNV1A64_PRIME) & _U64
    return h


# --- message header (MessageHeader) ------------------------------------------

#: MessageHeader: seq, deployment_id, ticket (u64); kind, hidden_dtype (u16);
#: sender, layer, micro_batch, num_tokens, reserved[4], checksum (u32).
HEADER = struct.Struct("<QQQHHIIII4II")
assert HEADER.size == 64
HEADER_FIELDS = (
    "seq", "deployment_id", "ticket", "kind", "hidden_dtype", "sender", "layer",
    "micro_batch", "num_tokens", "reserved", "checksum",
)
#: Bytes the checksum covers: the header up to its checksum field.
CHECKSUM_OFFSET = 60

#: MessageKind.
KIND_REQUEST = 1
KIND_REPLY = 2
#: HiddenDtype.
HIDDEN_F32 = 1
HIDDEN_BF16 = 2
HIDDEN_F8E4M3 = 3
#: dtype of dispatched hidden states -> MessageHeader.hidden_dtype code
DISPATCH_DTYPES = {"float32": HIDDEN_F32, "bfloat16": HIDDEN_BF16, "float8_e4m3fn": HIDDEN_F8E4M3}


def message_checksum(header: bytes) -> int:
    """FNV-1a 32 of the first 60 header bytes (the checksum field excluded)."""
    row = np.frombuffer(bytes(header[:CHECKSUM_OFFSET]), dtype=np.uint8)[None, :]
    return int(fnv1a32(row)[0])


def pack_header(
    *,
    seq: int,
    deployment_id: int,
    kind: int,
    sender: int,
    layer: int,
    micro_batch: int,
    num_tokens: int,
    ticket: int | None = None,
    hidden_dtype: int = HIDDEN_F32,
    reserved: tuple[int, int, int, int] = (0, 0, 0, 0),
    checksum: int | None = None,
) -> bytes:
    """A 64-byte message header (checksum computed unless given): for tools and tests."""
    ticket = seq if ticket is None else ticket
    fields = (seq, deployment_id, ticket, kind, hidden_dtype, sender, layer,
              micro_batch, num_tokens, *reserved)
    body = HEADER.pack(*fields, 0)
    if checksum is None:
        checksum = message_checksum(body)
    return HEADER.pack(*fields, checksum)


def unpack_header(data: bytes) -> dict[str, Any]:
    """Fields of a 64-byte message header, plus ``checksum_ok``."""
    values = HEADER.unpack(bytes(data[:64]))
    out = dict(zip(HEADER_FIELDS[:9], values[:9]))
    out["reserved"] = tuple(values[9:13])
    out["checksum"] = values[13]
    out["checksum_ok"] = message_checksum(data) == values[13]
    return out


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What every endpoint of a deployment must agree on (a peer whose inbox
    differs is refused), whatever its backend."""

    max_endpoints: int
    num_channels: int
    capacity: int
    hidden_size: int
    top_k: int
    num_layers: int
    num_experts: int
    deployment_id: int
    dispatch_dtype: str = "float32"  #: of the hidden states in requests


# --- combine status, per server (transport_common.h: CombineStatus) ----------

STATUS_OK = 0
STATUS_TIMEOUT = 1
STATUS_BAD_REPLY = 2
STATUS_NOTHING_SENT = 3
STATUS_UNAVAILABLE = 4


@dataclasses.dataclass(frozen=True)
class Status:
    """What one combine status code means."""

    name: str  #: CombineStatus's name, in snake case (kStatusBadReply: "bad_reply")
    failed: bool  #: the server did not deliver what it owed (its tokens' rows are zero)
    #: What the server did, as failure messages say it after naming it;
    #: ``{timeout_ms}`` stands for the exchange's deadline.
    text: str


#: Every combine status code, the one table of their meanings.
STATUSES = {
    STATUS_OK: Status("ok", False, "replied within the {timeout_ms:g} ms deadline"),
    STATUS_TIMEOUT: Status("timeout", True, "did not reply within the {timeout_ms:g} ms deadline"),
    STATUS_BAD_REPLY: Status(
        "bad_reply", True, "sent no valid reply within the {timeout_ms:g} ms deadline, only invalid ones"),
    STATUS_NOTHING_SENT: Status("nothing_sent", False, "was sent no token (or is no server)"),
    STATUS_UNAVAILABLE: Status("unavailable", True, "could not be reached (no mailbox to write to)"),
}
#: The codes of a server that did not deliver what it owed.
FAILED_STATUSES = tuple(code for code, status in STATUSES.items() if status.failed)
