"""Crash safety of collection storage: a write interrupted anywhere leaves the old or the new state.

Two complementary tests. The first interrupts every file operation of every kind of change in-process,
one at a time and deterministically (with a half-written file where the interruption hits a write). The
second runs the changes in real subprocesses killed with SIGKILL at random moments, as a power cut or an
OOM kill would, and checks after each kill that the collection opens, with verified checksums, in the
state before or after the change that was running. Run as a script, this file is that worker process: it
imports the storage package under a bare `keras_clip_it` package (the package root's own imports skipped)
so that each worker starts in a fraction of a second without importing keras.
"""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "keras_clip_it")
IMAGE, TEXT = "img-crash", "txt-crash"
KINDS = ("append", "remove", "append", "compact", "save")


class _Snapshot:
    """The attributes `save_collection` reads, from a plain state dict (the worker has no AnalogyCollection)."""

    def __init__(self, state):
        self.name, self.language = "crash-it", "it"
        self.ids = list(state)
        self.captions = [state[i][0] for i in self.ids]
        self.image_refs = [None] * len(self.ids)
        self.metadata = [{"n": len(i)} for i in self.ids]
        self.fingerprints = {"image": [IMAGE], "text": [TEXT]}
        self._rows = {
            IMAGE: np.array([state[i][1] for i in self.ids], np.float32).reshape(-1, 48),
            TEXT: np.array([state[i][2] for i in self.ids], np.float32).reshape(-1, 32),
        }

    def embeddings(self, kind, fingerprint):
        return self._rows[fingerprint]


def _new_rows(step, count):
    rng = np.random.default_rng(step)
    ids = [f"s{step}-{j}" for j in range(count)]
    image = rng.standard_normal((count, 48)).astype(np.float32)
    text = rng.standard_normal((count, 32)).astype(np.float32)
    return {i: (f"didascalia {i}", tuple(image[j]), tuple(text[j])) for j, i in enumerate(ids)}


def _operation(step, state):
    """The change number `step` (1-based) makes to `state`: (kind, argument, new state)."""
    kind = KINDS[(step - 1) % len(KINDS)]
    rng = random.Random(step)
    if kind == "append":
        rows = _new_rows(step, rng.randint(20, 60))
        return kind, rows, {**state, **rows}
    if kind == "remove":
        gone = rng.sample(sorted(state), len(state) // 3)
        return kind, gone, {i: v for i, v in state.items() if i not in set(gone)}
    if kind == "compact":
        return kind, None, state
    kept = rng.sample(sorted(state), max(len(state) - 5, 0))
    snapshot = {i: state[i] for i in sorted(kept)}
    snapshot.update(_new_rows(step, 10))
    return kind, snapshot, snapshot


def _states(until):
    states = [_new_rows(0, 30)]
    for step in range(1, until + 1):
        states.append(_operation(step, states[-1])[2])
    return states


def _apply(storage, root, step, state):
    kind, argument, _ = _operation(step, state)
    if kind == "append":
        ids = list(argument)
        storage.append(
            root,
            ids,
            captions=[argument[i][0] for i in ids],
            metadata=[{"n": len(i)} for i in ids],
            embeddings={
                "image": {IMAGE: np.array([argument[i][1] for i in ids], np.float32)},
                "text": {TEXT: np.array([argument[i][2] for i in ids], np.float32)},
            },
        )
    elif kind == "remove":
        storage.remove(root, argument)
    elif kind == "compact":
        storage.compact(root)
    else:
        storage.save_collection(_Snapshot(argument), root)


def _opened_state(root):
    from keras_clip_it.collections import storage

    col = storage.open_collection(root, verify=True)
    image, text = col.embeddings("image", IMAGE), col.embeddings("text", TEXT)
    assert len(set(col.ids)) == len(col)
    return {i: (c, tuple(image[r]), tuple(text[r])) for r, (i, c) in enumerate(zip(col.ids, col.captions))}


def _unreferenced(root):
    """Files no manifest references: what interrupted writes leave behind."""
    referenced = set()
    for name in os.listdir(root):
        if name.startswith("manifest-"):
            with open(os.path.join(root, name)) as f:
                manifest = json.load(f)
            for segment in manifest["segments"]:
                for files in [segment["files"].values()] + [
                    [e["file"]] + ([e["scales"]] if e["scales"] else []) for e in segment.get("embeddings", ())
                ]:
                    referenced.update(entry["path"] for entry in files)
    stray = {f"segments/{n}" for n in os.listdir(os.path.join(root, "segments"))} - referenced
    return stray | {n for n in os.listdir(root) if n.endswith(".tmp")}


def _start(root):
    from keras_clip_it.collections import storage

    storage.save_collection(_Snapshot(_states(0)[0]), root)


class _Interrupted(BaseException):
    """Stands for the process dying: not an Exception, so no cleanup code of ours can catch it."""


def test_an_interruption_at_any_file_operation_leaves_the_old_or_the_new_state(tmp_path, monkeypatch):
    from keras_clip_it.collections import storage
    from keras_clip_it.collections.storage.locations import Location as location
    real = {name: getattr(location, name) for name in ("write_file", "publish", "delete")}
    steps = len(KINDS)
    states = _states(steps)
    root = str(tmp_path / "col")
    _start(root)
    interruptions = 0
    for step in range(1, steps + 1):
        point = 0
        while True:
            countdown = [point]

            def hook(name):
                def wrapped(self, *args):
                    countdown[0] -= 1
                    if countdown[0] < 0:
                        if name == "write_file":
                            # A torn file: half its bytes reach the disk.
                            data = b"".join(bytes(chunk) for chunk in args[1])
                            real[name](self, args[0], [data[: len(data) // 2]])
                        raise _Interrupted()
                    return real[name](self, *args)

                return wrapped

            for name in real:
                monkeypatch.setattr(location, name, hook(name))
            generation = storage.info(root)["generation"]
            try:
                _apply(storage, root, step, states[step - 1])
                finished = True
            except _Interrupted:
                finished = False
                interruptions += 1
            monkeypatch.undo()
            opened = _opened_state(root)
            if finished:
                assert opened == states[step]
                break
            assert opened in (states[step - 1], states[step]), (step, point)
            if storage.info(root)["generation"] != generation:
                assert opened == states[step]
                break  # interrupted after the commit: only the clean-up was lost
            assert opened == states[step - 1]
            point += 1
    assert interruptions > 4 * steps
    storage.compact(root)
    assert not _unreferenced(root)
    assert _opened_state(root) == states[-1]


@pytest.mark.slow
def test_processes_killed_at_random_moments_leave_the_old_or_the_new_state(tmp_path):
    from keras_clip_it.collections import storage

    kills = 30
    rng = random.Random(1234)
    states = _states(kills * 12)
    root = str(tmp_path / "col")
    _start(root)
    committed, torn, kinds = 0, 0, set()
    for _ in range(kills):
        before = _unreferenced(root)
        worker = subprocess.Popen(
            [sys.executable, __file__, root, str(committed + 1), str(len(states) - 1)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Aim at a change of a random kind, then at a random moment inside it (changes take 20-200 ms).
        target = f"start {committed + 1 + rng.randrange(len(KINDS))}"
        lines = []
        while not lines or lines[-1] != target:
            line = worker.stdout.readline()
            assert line, worker.stderr.read()
            lines.append(line.strip())
        time.sleep(0.2 * rng.random() ** 2)  # skewed to the start, so the shortest changes get hit too
        worker.send_signal(signal.SIGKILL)
        output, errors = worker.communicate()
        assert worker.returncode == -signal.SIGKILL, errors
        lines += output.split("\n")
        done = [int(line.split()[1]) for line in lines if line.startswith("done ")]
        last = done[-1] if done else committed
        assert last + 1 < len(states), "the worker ran out of steps: raise the plan length"
        opened = _opened_state(root)
        # The change running at the kill may have committed without reporting it.
        assert opened in (states[last], states[last + 1]), f"kill after step {last}"
        committed = last if opened == states[last] else last + 1
        kinds.add(KINDS[last % len(KINDS)])
        torn += bool(_unreferenced(root) - before)
    # Evidence that kills landed inside writes of several kinds of change, not only between them.
    assert torn >= 3 and len(kinds) >= 3, (torn, kinds)
    assert committed >= kills // 2
    storage.compact(root)
    assert not _unreferenced(root)
    assert _opened_state(root) == states[committed]


def _worker(root, first, last):
    root_package = types.ModuleType("keras_clip_it")
    root_package.__path__ = [os.path.normpath(PACKAGE)]
    sys.modules["keras_clip_it"] = root_package
    storage = importlib.import_module("keras_clip_it.collections.storage")
    state = _states(first - 1)[-1]
    for step in range(first, last + 1):
        print(f"start {step}", flush=True)
        _apply(storage, root, step, state)
        state = _operation(step, state)[2]
        print(f"done {step}", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
