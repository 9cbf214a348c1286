"""The loading pipeline: host reads, compiles and device work overlapped, memory bounded.

Three things run at once: reader threads map the next tensors and put them on the device(s) as
stored (device_convert.stage), compiler threads compile each distinct Conversion ahead of its
first use, and the calling thread dispatches the conversions in checkpoint order (asynchronous:
jax returns before the device is done). Several readers, because one thread's page faults and
host-to-device copy of a memory-mapped tensor run well below what the disk, the page cache and
the link can each do; several compilers, because XLA compiles outside the GIL and a model's
handful of distinct shapes would otherwise wait for each other before the first conversions.
At most `prefetch` staged tensors wait and at most `in_flight` conversions run unfinished, so
host and device memory hold a few tensors beyond the placed parameters. If anything fails, every
array made so far is deleted before the error propagates.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import jax

from jint8.loading.device_convert import Conversion, compiled_conversion

_logger = logging.getLogger("jint8")


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One parameter to load.

    stage: run on the reader thread; returns (the stored array on the device, bytes read, its
      Conversion), or (the finished leaf, bytes read, None).
    conversion: the Conversion stage is expected to return, compiled ahead (None: not known
      before the read, or none needed).
    leaf: the leaf from the conversion's outputs.
    release: called once the conversion has finished (the read's memory may go).
    """

    path: tuple[str, ...]
    stage: Callable[[], tuple[Any, int, Optional[Conversion]]]
    conversion: Optional[Conversion]
    leaf: Callable[[tuple], Any]
    release: Optional[Callable[[], None]] = None


def delete_arrays(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def _drain(futures) -> None:
    """Cancel what has not started; wait for the rest and delete what it made."""
    for future in futures:
        future.cancel()
    for future in futures:
        if not future.cancelled() and future.exception() is None:
            delete_arrays(future.result())


def _finish(outputs, release) -> None:
    jax.block_until_ready(outputs)
    if release is not None:
        release()


class _Timings:
    """Where a load's time goes, logged at DEBUG at its end: the calling thread's waits for reads,
    compiles and the device, and the readers' and compilers' busy time (a pipeline whose readers
    are busy all along is bound by reading; one that waits on the device, by the conversions)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.waits = collections.Counter()
        self.busy: list[tuple[str, float]] = []  # appended by worker threads (atomic)

    def timed(self, what: str, function: Callable, *args):
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.busy.append((what, time.perf_counter() - start))

    def wait(self, what: str, start: float) -> None:
        self.waits[what] += time.perf_counter() - start

    def log(self, jobs: int, nbytes: int, readers: int, compilers: int) -> None:
        if not _logger.isEnabledFor(logging.DEBUG):
            return
        seconds = time.perf_counter() - self.start
        busy = collections.Counter()
        for what, duration in self.busy:
            busy[what] += duration
        _logger.debug(
            "loading pipeline: %d tensors, %.3f GB in %.2f s (%.2f GB/s); calling thread waited %.2f s for reads, "
            "%.2f s for compiles, %.2f s for the device, %.2f s dispatching; %d readers busy %.2f s, "
            "%d compilers busy %.2f s", jobs, nbytes / 1e9, seconds, nbytes / 1e9 / max(seconds, 1e-9),
            self.waits["read"], self.waits["compile"], self.waits["device"], self.waits["dispatch"], readers,
            busy["read"], compilers, busy["compile"])


def _threads() -> int:
    # a few: the work of each is a copy or a compile, and every reader's staged tensor is held
    # on the device (and mapped on the host) until its turn
    return max(1, min(4, os.cpu_count() or 1))


def run_jobs(jobs: Sequence[TensorJob], *, on_bytes: Callable[[int], None], prefetch: Optional[int] = None,
             in_flight: int = 4, readers: Optional[int] = None,
             compilers: Optional[int] = None) -> tuple[dict, list[tuple[tuple[str, ...], Conversion, jax.Array]]]:
    """({path: placed leaf}, [(path, conversion, its NaN/Inf flag on the device)] of every converted leaf).

    readers / compilers: threads reading and compiling (default: min(4, CPU count)); prefetch:
    staged tensors waiting for their conversion (default: max(2, readers)).
    """
    readers = readers or _threads()
    compilers = compilers or _threads()
    prefetch = prefetch or max(2, readers)
    placed: dict = {}
    flags: list[tuple[tuple[str, ...], Conversion, jax.Array]] = []
    staged: collections.deque[Future] = collections.deque()
    running: collections.deque = collections.deque()
    timings, total = _Timings(), 0
    with ThreadPoolExecutor(compilers, thread_name_prefix="jint8-compile") as compiler, \
            ThreadPoolExecutor(readers, thread_name_prefix="jint8-read") as reader:
        # in the order of first use, so the first tensor waits for one compile only
        compiled = {c: compiler.submit(timings.timed, "compile", compiled_conversion, c)
                    for c in dict.fromkeys(job.conversion for job in jobs if job.conversion is not None)}
        submitted = 0
        try:
            for job in jobs:
                while submitted < len(jobs) and len(staged) < prefetch:
                    staged.append(reader.submit(timings.timed, "read", jobs[submitted].stage))
                    submitted += 1
                start = time.perf_counter()
                value, nbytes, conversion = staged.popleft().result()
                timings.wait("read", start)
                if conversion is None:
                    placed[job.path] = value
                    if job.release is not None:
                        job.release()
                else:
                    start = time.perf_counter()
                    converter = compiled[conversion].result() if conversion in compiled else compiled_conversion(conversion)
                    timings.wait("compile", start)
                    start = time.perf_counter()
                    outputs = converter(value)
                    timings.wait("dispatch", start)
                    del value  # freed once the conversion has read it
                    placed[job.path] = job.leaf(outputs)
                    flags.append((job.path, conversion, outputs[-1]))
                    running.append((outputs, job.release))
                    if len(running) > in_flight:
                        start = time.perf_counter()
                        _finish(*running.popleft())
                        timings.wait("device", start)
                on_bytes(nbytes)
                total += nbytes
            start = time.perf_counter()
            while running:
                _finish(*running.popleft())
            timings.wait("device", start)
        except BaseException:
            _drain(staged)
            for future in compiled.values():
                future.cancel()
            delete_arrays([list(placed.values()), [flag for _, _, flag in flags]])
            raise
    timings.log(len(jobs), total, readers, compilers)
    return placed, flags
