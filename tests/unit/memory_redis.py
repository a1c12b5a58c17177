"""A Redis in memory, for the unit tests of modules that write a few plain keys: strings, sets and hashes
with expiry on a clock the test moves, replies as text (as :func:`workers.redisurl.connect`'s clients give).

Only the commands those modules use, with redis-py's signatures; a pipeline queues them and runs them in
order at ``execute``.  Anything transactional (WATCH, MULTI, Lua) is the integration tests' (a real Redis).
"""

from __future__ import annotations

from typing import Any


def _text(value: Any) -> str:
    """What Redis stores for a value redis-py sends (numbers as their repr, bytes decoded)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, bool | int | float):
        return repr(value) if isinstance(value, float) else str(int(value))
    return str(value)


class MemoryRedis:
    """Strings, sets and hashes, with TTLs on ``now`` (seconds; move it to let keys expire)."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now
        self.data: dict[str, Any] = {}
        self.expires_at: dict[str, float] = {}
        self.commands: list[str] = []  # every command run, by name (round trips: see Pipeline)
        self.round_trips = 0

    # -- keys -------------------------------------------------------------------------------------------

    def _live(self, key: str) -> bool:
        if key in self.expires_at and self.expires_at[key] <= self.now:
            del self.expires_at[key]
            self.data.pop(key, None)
        return key in self.data

    def _run(self, name: str, *args, **kwargs):
        self.commands.append(name)
        return getattr(self, "_" + name)(*args, **kwargs)

    def __getattr__(self, name: str):
        if hasattr(type(self), "_" + name):
            def command(*args, **kwargs):
                self.round_trips += 1
                return self._run(name, *args, **kwargs)
            return command
        raise AttributeError(name)

    def _exists(self, *keys: str) -> int:
        return sum(1 for key in keys if self._live(key))

    def _delete(self, *keys: str) -> int:
        gone = 0
        for key in keys:
            if self._live(key):
                gone += 1
                del self.data[key]
                self.expires_at.pop(key, None)
        return gone

    def _expire(self, key: str, seconds: float) -> bool:
        if not self._live(key):
            return False
        self.expires_at[key] = self.now + seconds
        return True

    def _expireat(self, key: str, when: float) -> bool:
        if not self._live(key):
            return False
        self.expires_at[key] = float(when)
        return True

    def _pttl(self, key: str) -> int:
        if not self._live(key):
            return -2
        if key not in self.expires_at:
            return -1
        return round((self.expires_at[key] - self.now) * 1000)

    # -- strings, sets, hashes ------------------------------------------------------------------------

    def _set(self, key: str, value: Any, ex: float | None = None) -> bool:
        self.data[key] = _text(value)
        self.expires_at.pop(key, None)
        if ex is not None:
            self.expires_at[key] = self.now + ex
        return True

    def _get(self, key: str) -> str | None:
        return self.data[key] if self._live(key) else None

    def _sadd(self, key: str, *members: Any) -> int:
        self._live(key)  # an expired set is a new one
        members_set = self.data.setdefault(key, set())
        before = len(members_set)
        members_set.update(_text(m) for m in members)
        return len(members_set) - before

    def _srem(self, key: str, *members: Any) -> int:
        if not self._live(key):
            return 0
        before = len(self.data[key])
        self.data[key].difference_update(_text(m) for m in members)
        removed = before - len(self.data[key])
        if not self.data[key]:
            self._delete(key)
        return removed

    def _smembers(self, key: str) -> set[str]:
        return set(self.data[key]) if self._live(key) else set()

    def _hset(self, key: str, field: Any = None, value: Any = None, mapping: dict | None = None) -> int:
        fields = {} if field is None else {field: value}
        fields.update(mapping or {})
        self._live(key)  # an expired hash is a new one
        hashed = self.data.setdefault(key, {})
        added = sum(1 for f in fields if _text(f) not in hashed)
        hashed.update({_text(f): _text(v) for f, v in fields.items()})
        return added

    def _hgetall(self, key: str) -> dict[str, str]:
        return dict(self.data[key]) if self._live(key) else {}

    def _hvals(self, key: str) -> list[str]:
        return list(self.data[key].values()) if self._live(key) else []

    # -- pipelines -------------------------------------------------------------------------------------

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self)


class Pipeline:
    """Commands queued, run in order by :meth:`execute`: one round trip."""

    def __init__(self, redis: MemoryRedis):
        self.redis = redis
        self.queued: list[tuple[str, tuple, dict]] = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *_) -> None:
        self.queued = []

    def __getattr__(self, name: str):
        if hasattr(MemoryRedis, "_" + name):
            def queue(*args, **kwargs):
                self.queued.append((name, args, kwargs))
                return self
            return queue
        raise AttributeError(name)

    def execute(self) -> list:
        self.redis.round_trips += 1
        queued, self.queued = self.queued, []
        return [self.redis._run(name, *args, **kwargs) for name, args, kwargs in queued]
