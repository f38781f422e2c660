"""Spare rows mapped ahead of their first write, so that appending to a large buffer costs a copy.

`np.empty` only reserves address space: the operating system maps (and zeroes) each page when it is
first written. Writing 10k rows of 384 floats into fresh pages takes several times as long as writing
them into mapped ones (page faults, huge-page compaction), and that cost landed in the addition that
wrote the rows. `prefault` maps the pages of spare rows ahead of time, in a background
thread, with Linux's madvise(MADV_POPULATE_WRITE): it never changes what the pages hold, so the rows
can be written meanwhile. Elsewhere (older kernels, other systems) it does nothing and the pages are
mapped on first write as usual.

Example:
>>> import numpy as np
>>> spare = np.empty((1000, 384), np.float32)
>>> prefault(spare)  # returns at once; the pages are mapped in the background
>>> spare[:10] = 1.0  # safe meanwhile
"""

import ctypes
import errno
import mmap
import os
import queue
import sys
import threading

# From <linux/mman.h> (Linux 5.14+): fault the range in writable without touching its contents.
_MADV_POPULATE_WRITE = 23
# Mapped per call: the worker holds the process's memory-map lock for 2 MB at a time, not for 100 MB.
_PIECE = 2 << 20

_jobs = queue.Queue()
_state = {"worker": None, "supported": sys.platform.startswith("linux")}
_start_lock = threading.Lock()


def _forget_worker():
    # A forked child has no worker thread: it starts its own, with an empty queue, when it needs one.
    global _jobs, _start_lock
    _jobs, _start_lock = queue.Queue(), threading.Lock()
    _state["worker"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def prefault(array):
    """Maps the pages of `array` (a contiguous numpy array) in the background; returns at once.

    Args:
        array: the spare rows to map. The job keeps a reference, so the memory outlives the mapping.
    """
    if not array.flags.c_contiguous:
        raise ValueError("prefault needs a contiguous array (a slice of rows of a C-ordered buffer)")
    if not _state["supported"] or array.nbytes < mmap.PAGESIZE:
        return
    with _start_lock:
        if _state["worker"] is None:
            _state["worker"] = threading.Thread(target=_work, name="keras-clip-it-prefault", daemon=True)
            _state["worker"].start()
    _jobs.put(array)


def wait():
    """Blocks until every requested mapping is done (for measurements that must not overlap it)."""
    _jobs.join()


def _work():
    try:
        # Lowest priority for this thread alone (Linux): mapping ahead yields to queries and changes.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    while True:
        array = _jobs.get()
        try:
            start = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
            stop = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
            for piece in range(start, stop, _PIECE):
                # ctypes releases the GIL for the call: the caller's thread runs meanwhile.
                if libc.madvise(piece, min(_PIECE, stop - piece), _MADV_POPULATE_WRITE) != 0:
                    if ctypes.get_errno() == errno.EINVAL:
                        _state["supported"] = False  # a kernel without it: pages map on first write
                    break
        finally:
            del array
            _jobs.task_done()
