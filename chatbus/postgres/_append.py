"""The Postgres append path: one statement per batch of the group commit.

Owns: how a batch of appends, keyed or not, becomes one append statement (which keys
a keyed batch looks up first, its re-runs after a refused key), what the reply
settles, and how a lost reply is resolved from the batch's token. Imports this
package's :mod:`._pq`, :mod:`._sql`, :mod:`._events`, :mod:`._rows`,
:mod:`._connections`; the store (:mod:`._store`) hands it its statement runners.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple, final

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg import pq

from .._coalesce import PendingAppend, settle
from .._exceptions import OutcomeUnknown, StoreError
from .._message import Message
from . import _pq
from ._connections import LentConnections
from ._events import CarriedEvents, event_statements
from ._pq import DB_ERRORS
from ._rows import Found, KeyedRequest, compact_json, joined_bodies, replays, sent_by_key
from ._sql import Queries

#: How often a keyed statement runs again after losing a same-key race.
_KEYED_ATTEMPTS: Final = 5
#: How many ``(stream, key)`` pairs a store remembers having sent: a batch with none
#: of them is inserted without looking its keys up first (see _sql_append._APPEND_KEYED_NEW).
_SENT_KEYS: Final = 16384
#: After the unique index refused a key this store had not sent, this many keyed
#: statements look their keys up first: a workload where other processes send the
#: same keys (deduplication) pays for a refused insert once in a while, not each time.
_LOOKUP_AFTER_REFUSAL: Final = 64


class _Outcome(NamedTuple):
    """What an append statement settled for one stream (see _coalesce.settle)."""

    stream: str
    #: None: the statement stored nothing in the stream (every draft a replay).
    last_id: int | None
    created_at: datetime.datetime
    #: The messages found under the batch's keys (None: none, no key repeated).
    found: dict[str, Message] | None
    #: The epoch the statement wrote to (None: it wrote nothing).
    epoch: int | None


class _MaybeCommitted(Exception):
    """The append statement reached the server and its reply was lost."""


@final
@attrs.define(eq=False)
class Appends:
    """A :class:`PostgresStore`'s append path; its :meth:`send_batch` is the group
    commit's ``send``. The store hands it its statement runners and its read."""

    _connections: LentConnections
    _channel: str
    _queries: Queries
    _run_prepared: Callable[..., Awaitable[pq.abc.PGresult]]
    _run_pipeline: Callable[..., Awaitable[list[pq.abc.PGresult]]]
    _read: Callable[[str, int, int], Awaitable[list[Message]]]
    keyed_reruns: int = attrs.field(default=0, init=False)
    #: The ``(stream, key)`` pairs sent lately (oldest first), at most _SENT_KEYS.
    _sent_keys: OrderedDict[tuple[str, str], None] = attrs.field(factory=OrderedDict, init=False)
    #: Keyed statements still to look their keys up first (see _LOOKUP_AFTER_REFUSAL).
    _lookups_due: int = attrs.field(default=0, init=False)
    #: Events carried by appends waiting or running (see PostgresStore.append_carrying).
    carried: dict[PendingAppend, CarriedEvents] = attrs.field(factory=dict, init=False)

    async def send_batch(self, batch: list[PendingAppend]) -> None:
        """One statement for ``batch``, keyed or not; settle each member.

        If the reply is lost after the statement reached the server, find out from
        the batch's token whether it committed (see :meth:`_resolve`).
        """
        groups: dict[str, list[PendingAppend]] = {}
        for member in batch:
            groups.setdefault(member.stream, []).append(member)
        token = random.getrandbits(63)
        keyed = any(member.payload.keyed for member in batch)
        carry = CarriedEvents.joined([self.carried[m] for m in batch if m in self.carried])
        rows: Sequence[_Outcome]
        try:
            if keyed:
                request = KeyedRequest.of(groups)
                look = self._keys_to_look_up(request)
                for attempt in range(_KEYED_ATTEMPTS):
                    try:
                        rows = await self._append_keyed_rows(groups, request, token, look, carry)
                        break
                    except psycopg.errors.UniqueViolation:
                        # A key stored before that this store had not sent (see
                        # _sql_append._APPEND_KEYED_NEW), or a same-key append that committed
                        # while this one waited for the lock (see _sql_append._APPEND_KEYED);
                        # nothing was stored: again, looking every key up.
                        if attempt == _KEYED_ATTEMPTS - 1:
                            raise
                        if look is None or b"f" in look:
                            self._lookups_due = _LOOKUP_AFTER_REFUSAL
                        look = b"t" * len(request.keys)
                        self.keyed_reruns += 1
            else:
                rows = await self._append_rows(groups, token, carry)
        except _MaybeCommitted as lost:
            await self._resolve(groups, token, lost)
            return
        for stream, last_id, created_at, found, epoch in rows:
            members = groups.pop(stream)
            settle(stream, members, last_id, created_at, found)
            for member in members:
                member.epoch = epoch
        if groups:  # pragma: no cover - every upsert returns its row
            raise psycopg.DataError(f"no counter row returned for {len(groups)} streams")

    async def _append_rows(
        self,
        groups: dict[str, list[PendingAppend]],
        token: int,
        carry: CarriedEvents | None,
    ) -> list[_Outcome]:
        """The unkeyed append statement's outcome per stream (nothing found)."""
        channel = self._channel.encode("utf-8")
        request = [
            (stream, sum(m.drafts for m in members), joined_bodies(members))
            for stream, members in groups.items()
        ]
        if len(request) == 1:
            ((stream, n, packed),) = request
            params = [stream.encode("utf-8"), b"%d" % n, packed.encode("utf-8"), channel]
            params.append(b"%d" % token)
            result = await self._run_append(self._queries.append_unkeyed, params, carry)
            if result.ntuples != 1:  # pragma: no cover - the upsert returns its row
                return []
            last_id, micros = _pq.value(result, 0, 0), _pq.value(result, 0, 1)
            created_at = _pq.from_epoch_micros(int(micros))
            return [_Outcome(stream, int(last_id), created_at, None, int(_pq.value(result, 0, 3)))]
        document = compact_json(request)
        result = await self._run_append(
            self._queries.append_streams, [document.encode("utf-8"), channel, b"%d" % token], carry
        )
        return [
            _Outcome(
                _pq.value(result, row, 0).decode("utf-8"),
                int(_pq.value(result, row, 1)),
                _pq.from_epoch_micros(int(_pq.value(result, row, 2))),
                None,
                int(_pq.value(result, row, 4)),
            )
            for row in range(result.ntuples)
        ]

    def _keys_to_look_up(self, request: KeyedRequest) -> bytes | None:
        """Which keys of ``request`` to look up before inserting; remember its keys.

        Those this store sent lately (a retry: the original is likely stored), per
        draft sent ``t`` (look up) or ``f``; every one for a while after the unique
        index refused a key not looked up. None if there is none: the batch goes in at
        once and the unique index checks its keys (the cheaper statement).
        """
        sent = self._sent_keys
        if self._lookups_due > 0:
            self._lookups_due -= 1
            look = bytearray(b"t" * len(request.keys))
            suspects = len(look)
        else:
            look = bytearray(b"f" * len(request.keys))
            suspects = 0
        for number, (stream, key) in enumerate(zip(request.streams, request.keys, strict=True)):
            if key is None:
                continue
            pair = (stream, key)
            if pair in sent:
                look[number] = 0x74  # "t"
                suspects += 1
                sent.move_to_end(pair)
            else:
                sent[pair] = None
        while len(sent) > _SENT_KEYS:
            sent.popitem(last=False)
        return bytes(look) if suspects else None

    async def _append_keyed_rows(
        self,
        groups: dict[str, list[PendingAppend]],
        request: KeyedRequest,
        token: int,
        look: bytes | None,
        carry: CarriedEvents | None,
    ) -> list[_Outcome]:
        """A keyed append statement; per stream, also the messages found for its keys
        (None: none found, and no key repeated in the statement).

        ``look``: the statement that looks up the keys marked ``t`` (_sql_append._APPEND_KEYED);
        None: the one that inserts every key at once (_sql_append._APPEND_KEYED_NEW, or its
        one-stream form). Each raises UniqueViolation if a key not looked up was
        stored before. A stream the statement stored nothing in has no last id (None).
        """
        channel, queries = self._channel.encode("utf-8"), self._queries
        if look is not None:
            query, params = queries.append_keyed, request.params(channel, token, look)
        elif len(groups) == 1:
            query, params = queries.append_keyed_new_one, request.params_one(channel, token)
        else:
            query, params = queries.append_keyed_new, request.params(channel, token, None)
        result = await self._run_append(query, params, carry)
        bumped: dict[str, tuple[int, datetime.datetime, int]] = {}
        found: dict[str, list[Found]] = {}
        for row in range(result.ntuples):
            name = result.get_value(row, 0)
            if name is None:  # the one row of keys found
                found = request.found(json.loads(_pq.value(result, row, 3)))
            else:
                bumped[name.decode("utf-8")] = (
                    int(_pq.value(result, row, 1)),
                    _pq.from_epoch_micros(int(_pq.value(result, row, 2))),
                    int(_pq.value(result, row, 4)),
                )
        rows = []
        for stream, members in groups.items():
            head, created_at, epoch = bumped.get(stream, (None, _pq.EPOCH, None))
            replayed: dict[str, Message] | None
            if stream_found := found.get(stream):
                replayed = await self._replays(stream, stream_found, members)
            else:  # None: no key found nor repeated, every draft is new (see settle)
                replayed = {} if stream in request.repeating else None
            rows.append(_Outcome(stream, head, created_at, replayed, epoch))
        return rows

    async def _replays(
        self, stream: str, found: list[Found], members: list[PendingAppend]
    ) -> dict[str, Message]:
        """The messages a batch found under its keys, with their bodies.

        A draft that sent the stored text sent the same body: that is the body. For a
        key reused with another body (a conflict the publisher then reports), the
        original body came with the reply, unless it is bigger than
        :data:`._sql.CONFLICT_INLINE_BYTES`: then it is read now, with no lock held; should
        that read fail, the replay's body is None (still not the draft's: still a
        conflict).
        """
        sent = sent_by_key(members)
        bodies: dict[str, Any] = {}
        differing = [f.key for f in found if not f.same and not f.inline and not f.redacted]
        if differing:
            with contextlib.suppress(*DB_ERRORS):
                params = [
                    stream.encode("utf-8"),
                    json.dumps(differing, ensure_ascii=False).encode("utf-8"),
                ]
                result = await self._run_prepared(self._queries.bodies_of_keys, params)
                text = result.get_value(0, 0)
                bodies = {} if text is None else dict(json.loads(text))
        return replays(stream, found, sent, bodies)

    async def _run_append(
        self, query: bytes, params: list[bytes], carry: CarriedEvents | None = None
    ) -> pq.abc.PGresult:
        """:meth:`_run_prepared` for an append: a reply lost once sent is _MaybeCommitted.

        With ``carry``, the events' statements go first in the same transaction and
        round trip (a pipeline): their NOTIFYs precede the append's.
        """
        sent: list[bool] = []
        try:
            if carry is not None:
                before = event_statements(self._queries, self._channel, carry)
                results = await self._run_pipeline([*before, (query, params)], sent=sent)
                return results[-1]
            return await self._run_prepared(query, params, sent=sent)
        except DB_ERRORS as exc:
            refused = isinstance(exc, psycopg.Error) and exc.sqlstate is not None
            if sent and not refused:
                raise _MaybeCommitted(exc) from exc
            raise

    async def _resolve(
        self, groups: dict[str, list[PendingAppend]], token: int, lost: _MaybeCommitted
    ) -> None:
        """After a lost reply: settle the streams the batch is known to have committed.

        The batch's token is in a stream's counter row if the batch committed and
        nothing stored in that stream since: then its messages are the last ones, and
        are read back. Anything else (a keyed stream, a later append, the lookup
        failing too) stays unknown: :class:`~chatbus.OutcomeUnknown`.
        """
        streams = list(groups)
        resolved: dict[str, int] = {}
        with trio.move_on_after(self._connections.acquire_timeout):
            try:
                document = json.dumps(streams, ensure_ascii=False).encode("utf-8")
                result = await self._run_prepared(self._queries.outcome, [document])
                found = result.get_value(0, 0)
                for stream, last_id, last_token in [] if found is None else json.loads(found):
                    members = groups[stream]
                    if last_token == token and not any(m.payload.keyed for m in members):
                        resolved[stream] = last_id
                for stream, last_id in resolved.items():
                    members = groups[stream]
                    count = sum(member.drafts for member in members)
                    page = await self._read(stream, last_id - count, count)
                    if [m.id for m in page] != list(range(last_id - count + 1, last_id + 1)):
                        del resolved[stream]  # pragma: no cover - trimmed meanwhile
                        continue
                    first = 0
                    for member in members:
                        member.settle(page[first : first + member.drafts])
                        first += member.drafts
            except (*DB_ERRORS, StoreError):
                pass
        for stream, members in groups.items():
            for member in members:
                if member.result is None:
                    member.cause = unknown = OutcomeUnknown(
                        f"append on stream {stream!r}: the connection was lost after the"
                        f" append reached the server ({lost.__cause__!r}); it may or may"
                        " not have been committed. Retry with the same key to find out."
                    )
                    unknown.__cause__ = lost.__cause__
