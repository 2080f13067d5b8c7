"""Pure encodings every backend shares: batches of bodies, keyed-batch plans, notices.

Owns: how a batch's JSON bodies travel as one text value (:func:`pack_bodies`) and
are decoded in one go (:func:`decode_bodies`), how a keyed batch splits into stored
and new messages (:func:`plan_keyed_batch`), and the notice payload
(``{"stream": …, "last_id": …}``: :func:`encode_notice`, :func:`parse_notice`).
No I/O; imports only :mod:`chatbus._message` and :mod:`chatbus._event`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, final

import attrs

from ._event import from_micros
from ._message import Draft, Message, check_stream, make_message

#: Joins the bodies of a batch into one value. A control character: valid JSON text
#: never contains it raw (not even inside strings), so splitting on it gives back
#: exactly the bodies.
BODY_SEPARATOR: Final = "\x1e"


class BadBody(ValueError):
    """A draft's body is not exactly one JSON value a server will accept."""


def pack_bodies(drafts: Sequence[Draft]) -> tuple[str, list[Any]]:
    """Return the bodies of ``drafts`` joined into one value, and decoded.

    One :func:`json.loads` of the whole batch instead of one per body. Raises
    :class:`BadBody` unless the bodies are exactly ``len(drafts)`` JSON values with
    no separator inside (a server still checks each piece on its own).
    """
    texts = [draft.body_json for draft in drafts]
    packed = BODY_SEPARATOR.join(texts)
    document = "[" + ",".join(texts) + "]"
    try:
        # The decoder's scanner, not json.loads: that builds a decoder per call when
        # given parse_constant, then checks for whitespace we never put around.
        bodies, end = _SCAN_STRICT(document, 0)
    except StopIteration as stop:  # a value missing (json.loads says it so, too)
        error = json.JSONDecodeError("Expecting value", document, stop.value)
        raise BadBody(f"a message body is not valid JSON: {error}") from None
    except (ValueError, RecursionError) as exc:
        raise BadBody(f"a message body is not valid JSON: {exc}") from None
    if (
        end != len(document)
        or len(bodies) != len(texts)
        or packed.count(BODY_SEPARATOR) != len(texts) - 1
    ):
        raise BadBody("a message body is not exactly one JSON value")
    return packed, bodies


def _reject_json_constant(name: str) -> Any:
    # NaN, Infinity, -Infinity: Python's json accepts them, a server's json does not.
    raise ValueError(f"{name} is not valid JSON")


#: Decodes a batch of bodies, refusing the constants a server's json does not accept.
_STRICT_DECODER: Final[Any] = json.JSONDecoder(parse_constant=_reject_json_constant)
_SCAN_STRICT: Final[Callable[[str, int], tuple[Any, int]]] = _STRICT_DECODER.scan_once


def decode_bodies(texts: Sequence[str]) -> list[Any]:
    """Decode stored bodies (each one valid JSON value) with one :func:`json.loads`."""
    if not texts:
        return []
    bodies: list[Any] = json.loads("[" + ",".join(texts) + "]")
    if len(bodies) != len(texts):  # pragma: no cover - the store validated them
        raise BadBody("a stored message body is not exactly one JSON value")
    return bodies


def plan_keyed_batch(
    drafts: Sequence[Draft], existing: dict[str, Message]
) -> tuple[list[Message | int], list[Draft]]:
    """Split a batch into already-stored messages and new drafts.

    Returns ``slots`` (per draft: the existing message, or the index of the new draft
    it resolves to) and the new drafts in order. A key used earlier in the stream
    resolves to the stored message; a key repeated within the batch to its first use.
    """
    slots: list[Message | int] = []
    new: list[Draft] = []
    first_new_with_key: dict[str, int] = {}
    for draft in drafts:
        if draft.key is not None:
            if (old := existing.get(draft.key)) is not None:
                slots.append(old)
                continue
            if (index := first_new_with_key.get(draft.key)) is not None:
                slots.append(index)
                continue
            first_new_with_key[draft.key] = len(new)
        slots.append(len(new))
        new.append(draft)
    return slots, new


def encode_notice(stream: str, last_id: int) -> str:
    """The notice payload: ``{"stream": stream, "last_id": last_id}`` as compact JSON."""
    return json.dumps({"stream": stream, "last_id": last_id}, ensure_ascii=False)


def _json_object(payload: bytes | str) -> dict[str, Any] | None:
    """``payload`` decoded, if it is a JSON object; None for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


#: A notice as the stores write it (:func:`encode_notice`, Postgres's json_build_object:
#: ``{"stream" : "s", "last_id" : 1}``), with no escape in the stream name: read
#: without a JSON decoder (one notice per stream per commit). Anything else (or what
#: this cannot read) goes the exact way.
_NOTICE_PATTERN: Final = r'\{"stream" ?: "([^"\\\x00-\x1f]+)", "last_id" ?: ([1-9][0-9]{0,18})\}'
_NOTICE_BYTES: Final = re.compile(_NOTICE_PATTERN.encode("ascii"))
_NOTICE_TEXT: Final = re.compile(_NOTICE_PATTERN)


def parse_notice(payload: bytes | str) -> tuple[str, int] | None:
    """Decode a notice payload; ``None`` for anything that is not a valid notice."""
    if isinstance(payload, bytes):
        if (match := _NOTICE_BYTES.fullmatch(payload)) is not None:
            try:
                return check_stream(match[1].decode("utf-8")), int(match[2])
            except ValueError:  # UnicodeDecodeError, InvalidStream: the exact way says
                pass
    elif (text_match := _NOTICE_TEXT.fullmatch(payload)) is not None:
        try:
            return check_stream(text_match[1]), int(text_match[2])
        except ValueError:
            pass
    data = _json_object(payload)
    if data is None:
        return None
    stream = data.get("stream")
    last_id = data.get("last_id")
    if not isinstance(stream, str) or type(last_id) is not int or last_id < 1:
        return None
    try:
        check_stream(stream)
    except ValueError:
        return None
    return stream, last_id


#: At most this many bytes of bodies and keys ride in a notice (see
#: :class:`CommittedNotice`): with the header and the longest stream name, escaped,
#: a payload stays well under Postgres's 8,000-byte limit on one NOTIFY.
NOTICE_DATA_BYTES: Final = 4096
#: How a committed notice begins (a plain one has a space after ``"stream"``).
COMMITTED_NOTICE_PREFIX: Final = b'{"stream":"'
_COMMITTED_HEADER: Final = re.compile(
    rb'\{"stream":"([^"\\\x00-\x1f]+)","last_id":([1-9][0-9]{0,18}),"epoch":([1-9][0-9]{0,18}),'
    rb'"at":(-?[0-9]{1,19}),"n":([1-9][0-9]{0,6}),'
)


@final
@attrs.frozen
class CommittedNotice:
    """A notice that carries the messages it announces: ``count`` messages ending at
    ``last_id``, committed in ``epoch`` at ``micros`` (µs since the Unix epoch).

    Written by the append itself (Postgres: the append statement's NOTIFY, in its
    transaction; Redis: the append script), so it exists only if they committed, for a
    stream whose new bodies and keys come to at most :data:`NOTICE_DATA_BYTES`. Its
    text: ``{"stream":…,"last_id":…,"epoch":…,"at":…,"n":…,"bodies":[…],"keys":[…]}``
    (``keys`` may be left out: none). A subscriber in another process can then take
    them without reading the store; the bodies are decoded only then
    (:meth:`messages`), never by a bus that has no use for them.
    """

    stream: str
    last_id: int
    epoch: int
    count: int
    micros: int
    payload: bytes

    def messages(self) -> list[Message] | None:
        """The announced messages, decoded; None if the payload does not hold them."""
        data = _json_object(self.payload)
        if data is None:
            return None
        bodies, keys = data.get("bodies"), data.get("keys", [None] * self.count)
        if not (isinstance(bodies, list) and isinstance(keys, list)):
            return None
        if not len(bodies) == len(keys) == self.count:
            return None
        if not all(key is None or type(key) is str for key in keys):
            return None
        created_at = from_micros(self.micros)
        stream, first = self.stream, self.last_id - self.count + 1
        return [
            make_message(stream, first + offset, body, key, created_at)
            for offset, (body, key) in enumerate(zip(bodies, keys, strict=True))
        ]


def parse_committed_notice(payload: bytes) -> CommittedNotice | None:
    """Read the header of a :class:`CommittedNotice` (its bodies wait); None if
    ``payload`` is not one."""
    if (match := _COMMITTED_HEADER.match(payload)) is not None:
        try:
            stream = check_stream(match[1].decode("utf-8"))
        except ValueError:  # UnicodeDecodeError, InvalidStream
            return None
        last_id, count = int(match[2]), int(match[5])
        if count > last_id:
            return None
        return CommittedNotice(stream, last_id, int(match[3]), count, int(match[4]), payload)
    if not payload.startswith(COMMITTED_NOTICE_PREFIX):
        return None
    data = _json_object(payload)  # a stream name with escapes: the exact way
    if data is None:
        return None
    fields = [data.get(name) for name in ("last_id", "epoch", "n", "at")]
    if not all(type(value) is int for value in fields):
        return None
    ints: list[int] = fields  # type: ignore[assignment]  # checked just above
    last_id, epoch, count, micros = ints
    if not (1 <= count <= last_id and epoch >= 1):
        return None
    try:
        stream = check_stream(data.get("stream"))
    except ValueError:
        return None
    return CommittedNotice(stream, last_id, epoch, count, micros, payload)


def encode_reset(stream: str, first_id: int | None = None) -> str:
    """A history-change payload: ``stream`` was deleted (``first_id`` None) or trimmed
    to begin at ``first_id``."""
    data: dict[str, object] = {"stream": stream, "reset": True}
    if first_id is not None:
        data["first_id"] = first_id
    return json.dumps(data, ensure_ascii=False)


def parse_reset(payload: bytes | str) -> tuple[str, int | None] | None:
    """``(stream, first_id or None)`` of a history-change payload; None otherwise."""
    data = _json_object(payload)
    if data is None or data.get("reset") is not True:
        return None
    first_id = data.get("first_id")
    if first_id is not None and (type(first_id) is not int or first_id < 1):
        return None
    try:
        return check_stream(data.get("stream")), first_id
    except ValueError:
        return None


def parse_redacted(payload: bytes | str) -> tuple[str, int] | None:
    """``(stream, id)`` of a redaction payload, ``{"stream": stream, "redacted": id}``
    (message ``id`` is a tombstone now; the Postgres redact statement sends it); None
    otherwise."""
    data = _json_object(payload)
    if data is None:
        return None
    id = data.get("redacted")
    if type(id) is not int or id < 1:
        return None
    try:
        return check_stream(data.get("stream")), id
    except ValueError:
        return None
