"""Host batches onto the mesh, and a background prefetcher so the train loop never waits on the host."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def to_global(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """This host's rows -> global jax.Arrays sharded by `sharding` over the leading (batch) axis.

    `sharding` is one sharding for every array or a dict of them by name (context parallelism
    also splits the token arrays' sequence). Each host passes its own rows
    (global_batch // process_count); the global batch is their concatenation in process order.
    """
    import jax

    def of(name: str) -> Any:
        return sharding[name] if isinstance(sharding, dict) else sharding

    return {name: jax.make_array_from_process_local_data(of(name), np.asarray(value)) for name, value in batch.items()}


_END = object()


class Prefetcher(Iterator[Any]):
    """Run `iterator` `size` batches ahead in a daemon thread, optionally transforming each batch (e.g. to_global).

    get_state() returns the state of the wrapped iterator as of the last batch
    handed out (not of the batches still queued), so checkpoints stay exact.
    """

    def __init__(self, iterator: Any, size: int = 2, transform: Callable[[Any], Any] | None = None):
        if size < 1:
            raise ValueError(f"prefetch size {size} must be >= 1.")
        self._iterator, self._size, self._transform = iterator, size, transform
        self._state = iterator.get_state() if hasattr(iterator, "get_state") else None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self._size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmjax-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._iterator:
                state = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
                if self._transform is not None:
                    batch = self._transform(batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((_END, None))
        except BaseException as error:  # surfaced in the consumer thread
            self._queue.put((error, None))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        item, state = self._queue.get()
        if item is _END:
            self._queue.put((_END, None))
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self._state = state
        return item

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        """Drop queued batches, move the wrapped iterator to `state`, and prefetch from there."""
        self.close()
        self._iterator.set_state(state)
        self._state = state
        self._start()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def prefetch_to_device(iterator: Any, sharding: Any, size: int = 2) -> Prefetcher:
    """Prefetch `size` batches ahead and place them on the mesh as global arrays."""
    return Prefetcher(iterator, size=size, transform=lambda batch: to_global(batch, sharding))
