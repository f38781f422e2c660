"""Micro-batching of encoder calls for concurrent requests, without a timer."""

import threading
from collections import deque
from concurrent.futures import Future

from keras_clip_it.encoders.base import padded_batch_size


class Batcher:
    """Runs `function(items) -> rows` for concurrent callers, batching whatever is waiting together.

    Each of `workers` threads takes the waiting jobs in order while they fit in `max_items` (a single
    job larger than that runs alone), runs them as one call and hands each caller its rows. There is no
    timer: a single client is never delayed, and under load the next batch fills while the current one
    runs. With two workers, two batches run at once, which fills the cores that one call leaves idle
    (small convolutions do not split over threads); the encoder orders the calls itself where its
    backend needs it.

    The encoders pad every batch to a power of two up to their batch size (`padded_batch_size`), and a
    padded row costs as much as a real one, so a worker takes the longest run of waiting jobs that
    fills such a size exactly and leaves the rest to the next free worker: three waiting images run as
    two and one, not as four with one of padding.
    """

    def __init__(self, function, max_items, workers=1):
        self._function = function
        self.max_items = int(max_items)
        if self.max_items < 1:
            raise ValueError(f"encoder_batch must be a positive integer, got {max_items}")
        self.workers = int(workers)
        if self.workers < 1:
            raise ValueError(f"encoder_workers must be a positive integer, got {workers}")
        self._jobs = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads = []
        self._start_lock = threading.Lock()

    def __call__(self, items):
        if not len(items):
            raise ValueError("nothing to embed")
        self._start()
        future = Future()
        with self._ready:
            self._jobs.append((items, future))
            self._ready.notify()
        return future.result()

    def _start(self):
        with self._start_lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._run, name="kci-batcher", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self):
        """Runs the jobs already waiting, then ends the workers (a later call starts them again)."""
        with self._start_lock:
            with self._ready:
                self._stopping = True
                self._ready.notify_all()
            for thread in self._threads:
                thread.join()
            self._threads = []
            self._stopping = False

    def _take(self):
        """The next batch of jobs, or None when stopping with nothing left to run."""
        with self._ready:
            while not self._jobs:
                if self._stopping:
                    return None
                self._ready.wait()
            count, fits, exact = 0, 0, 1
            for items, _ in self._jobs:
                if fits and count + len(items) > self.max_items:
                    break
                count, fits = count + len(items), fits + 1
                if padded_batch_size(count, self.max_items) == count:
                    exact = fits
            batch = [self._jobs.popleft() for _ in range(exact)]
            if self._jobs:
                self._ready.notify()  # another worker may take what is left
            return batch

    def _run(self):
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                rows = self._function([item for items, _ in jobs for item in items])
            except Exception as error:  # hand the error to every caller of the batch
                for _, future in jobs:
                    future.set_exception(error)
                continue
            start = 0
            for items, future in jobs:
                future.set_result(rows[start : start + len(items)])
                start += len(items)


def holding(lock, function):
    """`function`, run while holding `lock`."""

    def run(*args, **kwargs):
        with lock:
            return function(*args, **kwargs)

    return run
