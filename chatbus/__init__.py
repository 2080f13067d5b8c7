"""chatbus: a trio message bus for chat-like streams.

Publishers append durable messages with dense per-stream ids; subscribers get the
history after a cursor, then every new message live, exactly once and in id order.
"""

# Layering (a module imports only modules on its left, never its right):
#   _util, _exceptions, _options < _message < _codec, _event, _cache < _protocols, _tasks
#   < _coalesce, _listener, _merge, _outbox, _subscriber_events, _topic < _emit,
#   _lifecycle, _publisher, _subscriber < _bus < _open < this file.
# Backends sit on that: memory and postgres/ import from it (_faults and _scratch, made
# public by testing, and sse also from _bus and _open, _scratch from memory;
# sse's private _sse_frames, _sse_health and _flush_clock import at most this file, and
# sse imports them;
# _pytest_plugin from testing); only the
# postgres/ package imports psycopg, psycopg_pool or trio_asyncio, and _open loads a
# backend only by name, from its URL scheme table.

from ._bus import Bus as Bus
from ._bus import BusStatistics as BusStatistics
from ._event import Event as Event
from ._exceptions import BusClosed as BusClosed
from ._exceptions import BusError as BusError
from ._exceptions import CursorAhead as CursorAhead
from ._exceptions import HistoryReset as HistoryReset
from ._exceptions import HistoryTruncated as HistoryTruncated
from ._exceptions import IdempotencyConflict as IdempotencyConflict
from ._exceptions import InvalidMessage as InvalidMessage
from ._exceptions import InvalidStream as InvalidStream
from ._exceptions import MessageTooLarge as MessageTooLarge
from ._exceptions import OutcomeUnknown as OutcomeUnknown
from ._exceptions import StoreError as StoreError
from ._exceptions import StreamDeleted as StreamDeleted
from ._exceptions import UndecodableMessage as UndecodableMessage
from ._message import MAX_BODY_DEPTH as MAX_BODY_DEPTH
from ._message import MAX_KEY_LENGTH as MAX_KEY_LENGTH
from ._message import MAX_STREAM_LENGTH as MAX_STREAM_LENGTH
from ._message import Draft as Draft
from ._message import Message as Message
from ._message import StreamInfo as StreamInfo
from ._open import open_bus as open_bus
from ._options import EventRetention as EventRetention
from ._protocols import EventNotifier as EventNotifier
from ._protocols import EventStore as EventStore
from ._protocols import LifecycleStore as LifecycleStore
from ._protocols import NoticeHandler as NoticeHandler
from ._protocols import Notifier as Notifier
from ._protocols import Store as Store
from ._protocols import WatchingNotifier as WatchingNotifier
from ._publisher import Publisher as Publisher
from ._publisher import PublisherStatistics as PublisherStatistics
from ._retention import Retention as Retention
from ._subscriber import Subscriber as Subscriber
from ._subscriber_statistics import SubscriberStatistics as SubscriberStatistics
from ._util import fixup_module_metadata as _fixup_module_metadata

__version__ = "0.1.0.dev0"

__all__ = [
    "MAX_BODY_DEPTH",
    "MAX_KEY_LENGTH",
    "MAX_STREAM_LENGTH",
    "Bus",
    "BusClosed",
    "BusError",
    "BusStatistics",
    "CursorAhead",
    "Draft",
    "Event",
    "EventNotifier",
    "EventRetention",
    "EventStore",
    "HistoryReset",
    "HistoryTruncated",
    "IdempotencyConflict",
    "InvalidMessage",
    "InvalidStream",
    "LifecycleStore",
    "Message",
    "MessageTooLarge",
    "NoticeHandler",
    "Notifier",
    "OutcomeUnknown",
    "Publisher",
    "PublisherStatistics",
    "Retention",
    "Store",
    "StoreError",
    "StreamDeleted",
    "StreamInfo",
    "Subscriber",
    "SubscriberStatistics",
    "UndecodableMessage",
    "WatchingNotifier",
    "open_bus",
]

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
