"""The loader's background side: the producer thread with its bounded queue, and the device copy.

The producer thread runs `Loader.produce` and hands its batches over a queue `prefetch_batches`
deep; the training loop's `next()` raises a batch's error there. The copier moves each gathered
batch to the device from pinned memory on a side stream, so the copy overlaps training.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

import torch

from .errors import CacheError
from .gather import Buffers
from .order import _Position

if TYPE_CHECKING:
    from .loader import Loader

_END = object()              # the end of an epoch in the queue


class _Copier:
    """Moves gathered batches to the device. CUDA: from pinned buffers, without blocking, on a side
    stream; the batch carries an event the training loop's stream waits for, and a pinned buffer
    is reused only once its copy has finished. CPU: the batch as it is."""

    def __init__(self, device: torch.device | None, buffers: Buffers) -> None:
        self.device = device if device is not None and device.type != "cpu" else None
        self._buffers = buffers
        self._pending: list[tuple[Any, dict[str, Any]]] = []  # (copy done, the host tensors it reads)
        self._stream = torch.cuda.Stream(self.device) if self.device is not None and self.device.type == "cuda" else None

    def buffers(self) -> Buffers:
        self._pending = [(done, host) for done, host in self._pending if not done.query()]
        return self._buffers

    def move(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device is None:
            return batch
        if self._stream is None:
            return {k: v.to(self.device) for k, v in batch.items()}
        with torch.cuda.stream(self._stream):
            moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        done = torch.cuda.Event()
        done.record(self._stream)
        self._pending.append((done, batch))  # keeps the pinned buffers taken until the copy is done
        return {"__ready__": done, **moved}


class _Producer:
    """The background thread and its bounded queue; `next()` raises the error of a failed batch."""

    def __init__(self, loader: Loader, start: _Position) -> None:
        self.start = start
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch_batches)
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(loader, start), name="cached-loader", daemon=True)
        self._thread.start()

    def _run(self, loader: Loader, start: _Position) -> None:
        try:
            loader.produce(start, self._put, self._stopped)
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop, which raises it
            self._error = exc
            self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Any:
        item = self._queue.get()
        if item is _END and self._error is not None:
            raise self._error
        if isinstance(item, CacheError):
            raise item
        if isinstance(item, dict) and "__ready__" in item:
            ready = item.pop("__ready__")
            main = torch.cuda.current_stream()
            main.wait_event(ready)
            for t in item.values():
                t.record_stream(main)  # the allocator must not reuse its memory before main is done
        return item

    def stop(self) -> None:
        self._stopped.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
