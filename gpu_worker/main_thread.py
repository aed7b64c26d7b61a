"""The model runs on the process's main thread; the event loop beside it.

The event loop runs on a second thread and hands calls over through :class:`MainThreadExecutor`,
which :meth:`~MainThreadExecutor.serve` runs on the main thread until the loop shuts it down.
Signals arrive on the main thread and are forwarded to the loop (:func:`forward_signals`). Why
(torch off the main thread ran up to twice as slow on a CPU): docs/performance.md.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class MainThreadExecutor(Executor):
    """An executor of one thread: the one that calls :meth:`serve`."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._served = threading.Event()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            future: Future[T] = Future()
            self._calls.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Calls already submitted still run; :meth:`serve` returns after them."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(None)
        if wait and threading.current_thread() is not threading.main_thread():
            self._served.wait()

    def serve(self) -> None:
        """Run the submitted calls on this thread until :meth:`shutdown`."""
        try:
            while True:
                try:
                    # A timeout, so that signal handlers run even while idle.
                    call = self._calls.get(timeout=1.0)
                except queue.Empty:
                    continue
                if call is None:
                    return
                future, fn, args, kwargs = call
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    future.set_result(result)
        finally:
            self._served.set()


def forward_signals(loop: asyncio.AbstractEventLoop, handlers: Mapping[int, Callable[[], None]]) -> None:
    """On the main thread: run each signal's handler on ``loop`` (in its own thread)."""

    def forward(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(handlers[signum])

    for signum in handlers:
        signal.signal(signum, forward)
