"""Per-process and per-session bookkeeping, all bounded: the model cache, the runs that can be
stopped, per-session rate limits, the trace files a session made, and the example runs already
measured (RunCache).

Nothing here grows with the number of requests or of session ids a visitor invents: the model cache
has one entry per resolved model directory (aliases of one directory share it) and an LRU bound, the
stop table holds only runs in progress, and per-session tables evict their oldest session.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from mmspec import DecodeConfig, Decoder, load_drafter, load_target
from mmspec.drafters import registry

try:  # glibc's malloc_trim (Linux); elsewhere freed memory is left to the allocator
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - fails here on a libc without it
except (OSError, AttributeError):
    _LIBC = None


def release_memory() -> None:
    """After a large trace: collect, and hand freed heap pages back to the OS (glibc), so one visitor's
    big file does not stay in the server's resident memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def remove_file(path: str | Path) -> None:
    """An uploaded trace is read once: its copy in Gradio's upload folder goes at once."""
    try:
        os.unlink(path)
    except OSError:
        pass


class RunCache:
    """Example runs already measured, by request key, least recently stored evicted: clicking an
    example twice replays the stored measurement instead of measuring again."""

    def __init__(self, size: int = 32):
        self.size = size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple | None):
        with self.lock:
            return None if key is None else self.items.get(key)

    def put(self, key: tuple, value) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def model_key(name: str) -> str:
    """A local directory by its real path (so aliases and symlinks share one entry), a hub id as is."""
    p = Path(name).expanduser()
    return os.path.realpath(p) if p.exists() else name


class ModelCache:
    """Targets and model drafters loaded once per resolved name, least recently used evicted;
    n-gram / random drafters are made fresh (they hold per-prompt state and cost nothing)."""

    def __init__(self, max_targets: int = 2, max_drafters: int = 6):
        self.max_targets, self.max_drafters = max_targets, max_drafters
        self.targets: OrderedDict[str, Any] = OrderedDict()
        self.drafters: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.warm: set[tuple[str, str]] = set()
        self.lock = threading.RLock()

    def target(self, name: str):
        key = model_key(name)
        with self.lock:
            if key in self.targets:
                self.targets.move_to_end(key)
                return self.targets[key]
            self.targets[key] = tgt = load_target(key)
            while len(self.targets) > self.max_targets:
                old, _ = self.targets.popitem(last=False)
                self.drafters = OrderedDict((k, v) for k, v in self.drafters.items() if k[1] != old)
                self.warm = {k for k in self.warm if k[0] != old}
            return tgt

    def drafter(self, name: str, target):
        if registry.is_model_free(name):
            return load_drafter(name, target)
        key = (model_key(name), model_key(target.name))
        with self.lock:
            if key in self.drafters:
                self.drafters.move_to_end(key)
            else:
                self.drafters[key] = load_drafter(key[0], target)
                while len(self.drafters) > self.max_drafters:
                    old, _ = self.drafters.popitem(last=False)
                    self.warm.discard((old[1], old[0]))
            return self.drafters[key]

    def warm_up(self, target, drafter_name: str, drafter, tree: str) -> None:
        """One short decode per (target, drafter) so the first measured run pays no lazy-init cost."""
        key = (model_key(target.name), model_key(drafter_name))
        if key in self.warm:
            return
        img = Image.new("RGB", (64, 64), (120, 160, 200))
        cfg = DecodeConfig(max_new_tokens=4, tree=tree)
        for d in (None, drafter):
            for _ in Decoder(target, d, img, "Describe the image.", cfg):
                pass
        with self.lock:
            self.warm.add(key)


class RunRegistry:
    """Stop flags of the runs in progress (a measurement, a race replay), by session: Stop sets every
    flag of its session, so a replay started during a measurement does not hide the measurement from
    Stop. A stop for a session with no run is a no-op, so invented session ids add nothing."""

    def __init__(self):
        self.events: dict[str, list[threading.Event]] = {}
        self.lock = threading.Lock()

    @contextmanager
    def running(self, session: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self.lock:
            self.events.setdefault(session, []).append(event)
        try:
            yield event
        finally:
            with self.lock:
                left = [e for e in self.events.get(session, []) if e is not event]
                if left:
                    self.events[session] = left
                else:
                    self.events.pop(session, None)

    def event(self, session: str) -> threading.Event:
        """The flag of the session's latest run (a fresh unset one, not stored, when it has none)."""
        with self.lock:
            found = self.events.get(session)
            return found[-1] if found else threading.Event()

    def stop(self, session: str) -> bool:
        with self.lock:
            found = list(self.events.get(session, []))
        for event in found:
            event.set()
        return bool(found)

    def __len__(self) -> int:
        return len(self.events)


class RateLimiter:
    """At most `per_minute` cheap events per session in any 60 s, and one at a time per session."""

    def __init__(self, per_minute: int, max_sessions: int = 2000, window_s: float = 60.0):
        self.per_minute, self.max_sessions, self.window_s = per_minute, max_sessions, window_s
        self.seen: OrderedDict[str, deque] = OrderedDict()
        self.busy: set[str] = set()
        self.lock = threading.Lock()

    def _admit(self, session: str) -> bool:
        now = time.monotonic()
        with self.lock:
            times = self.seen.pop(session, None) or deque()
            self.seen[session] = times  # most recent last
            while len(self.seen) > self.max_sessions:
                self.seen.popitem(last=False)
            while times and now - times[0] > self.window_s:
                times.popleft()
            if session in self.busy or len(times) >= self.per_minute:
                return False
            times.append(now)
            self.busy.add(session)
            return True

    @contextmanager
    def slot(self, session: str) -> Iterator[bool]:
        """`with limiter.slot(s) as ok:` ok is False when this session must wait."""
        ok = self._admit(session)
        try:
            yield ok
        finally:
            if ok:
                with self.lock:
                    self.busy.discard(session)

    def forget(self, session: str) -> None:
        with self.lock:
            self.seen.pop(session, None)


class SessionFiles:
    """The trace files each session made: only its latest `keep` are kept, all removed when the
    session ends or is evicted (oldest first past `max_sessions`)."""

    def __init__(self, keep: int = 1, max_sessions: int = 2000):
        self.keep, self.max_sessions = keep, max_sessions
        self.files: OrderedDict[str, list[Path]] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, session: str, path: Path) -> Path:
        drop: list[Path] = []
        with self.lock:
            paths = self.files.pop(session, [])
            paths.append(Path(path))
            drop += paths[: -self.keep]
            self.files[session] = paths[-self.keep:]
            while len(self.files) > self.max_sessions:
                drop += self.files.popitem(last=False)[1]
        _remove(drop)
        return Path(path)

    def release(self, session: str) -> None:
        with self.lock:
            drop = self.files.pop(session, [])
        _remove(drop)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
