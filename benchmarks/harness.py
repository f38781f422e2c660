"""What every benchmark shares: interleaved rounds, their ratios, peak memory, the machine, the results files.

The machine is shared with other processes, so a benchmark never compares two runs made minutes apart
under different loads: each named run goes once per round, in turn, after a warm-up, and a comparison is
read twice, best round against best round and the median over rounds of the ratio within a round (both
runs saw about the same load). Results go to RESULTS_DIR/NAME.json (every figure) and NAME.md (the table
that is also printed); `--results-dir` sends a trial run elsewhere, so it never overwrites the record.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
# Benchmarks run as scripts: the checkout's keras_clip_it and tests (the torch references) come first.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parser(doc, rounds, rounds_help):
    """The arguments every benchmark takes: `--rounds` (default `rounds`, what a round is: `rounds_help`) and
    `--results-dir`."""
    made = argparse.ArgumentParser(description=doc.splitlines()[0])
    shown = rounds_help if rounds is None else f"{rounds_help} (default {rounds})"
    made.add_argument("--rounds", type=int, default=rounds, help=shown)
    made.add_argument(
        "--results-dir", default=RESULTS, help="where NAME.json and NAME.md go (default benchmarks/results)"
    )
    return made


@dataclasses.dataclass
class Times:
    """Seconds per round of one run: wall clock, and the process's CPU time (all threads), which the load of
    other processes disturbs much less than the wall clock."""

    wall: list
    cpu: list


def rounds(runs, count, show=None):
    """Calls each of `runs` ({name: function}) once per round, in turn, `count` rounds: {name: [results]}.

    `show(result)`, when given, is printed (as JSON) after each run, so a long benchmark shows its progress.
    """
    out = {name: [] for name in runs}
    for number in range(count):
        for name, run in runs.items():
            out[name].append(run())
            if show:
                print(f"round {number + 1} {name}: {json.dumps(show(out[name][-1]))}", flush=True)
    return out


def timed(runs, count):
    """Times each of `runs` once per round, in turn, after one warm-up each (compiles, fills caches): {name: Times}."""
    for run in runs.values():
        run()

    def clocked(run):
        def measure():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            return time.perf_counter() - wall, time.process_time() - cpu

        return measure

    measured = rounds({name: clocked(run) for name, run in runs.items()}, count)
    return {name: Times([wall for wall, _ in pairs], [cpu for _, cpu in pairs]) for name, pairs in measured.items()}


def best_time(run, repeats):
    """The shortest wall and the shortest CPU seconds of `repeats` runs of `run`, after a warm-up run."""
    times = timed({"run": run}, repeats)["run"]
    return min(times.wall), min(times.cpu)


def median_ratio(numerators, denominators):
    """The median over rounds of numerator / denominator within each round (both under the same load)."""
    return float(statistics.median(a / b for a, b in zip(numerators, denominators)))


def best_round(results, key):
    """The round's result (a dict) with the largest `key`: a run's best round, the one least disturbed."""
    return max(results, key=lambda result: result[key])


def best_rows(results, table, keys):
    """One result from a runner's results of every round: the first, with each row of `results[i][table]`
    ({row: {key: value}}) taking the largest of each of `keys` it has over the rounds (its best round) and
    `per_round` (the first key in every round), and the largest peak memory."""
    best = results[0]
    for name, row in best[table].items():
        per_round = [dict(result[table][name]) for result in results]  # copies: `row` is the first
        for key in [key for key in keys if key in row]:
            row[key] = max(each[key] for each in per_round)
        row["per_round"] = [each[keys[0]] for each in per_round]
    best["peak_rss_mb"] = max(result["peak_rss_mb"] for result in results)
    return best


def random_unit(count, dim, seed):
    """`count` random unit rows of `dim` float32 (`seed`: a number or a numpy Generator to draw from)."""
    rows = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def peak_rss_mb():
    """The process's peak resident set so far, in MB (getrusage; the child's own figure in a child process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Step:
    """Times a step (wall and CPU) and records the peak resident memory reached during it.

    The peak is reset before the step where Linux allows it (/proc/self/clear_refs, then VmHWM), so it is
    the step's own; elsewhere it is the process's peak so far.
    """

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        # CPU time of every thread of the process (background page mapping included).
        self.cpu_seconds = time.process_time() - self.cpu_start
        self.peak_mb = round(_vm_hwm_mb() or peak_rss_mb())


def _vm_hwm_mb():
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_model():
    """The CPU's model name and its widest vector extension (Linux /proc/cpuinfo; else the platform's word)."""
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    widest = next((flag for flag in ("avx512_bf16", "avx512f", "avx2", "avx") if flag in flags), "no AVX")
    return f"{name} ({widest})"


def machine(**versions):
    """One line naming the machine: CPU, cores, and the given library versions (`jax="0.4.30"`)."""
    return ", ".join([cpu_model(), f"{os.cpu_count()} cores", *(f"{name} {value}" for name, value in versions.items())])


def load_average():
    """The 1-minute load average, rounded (None where the system has none): the other processes' share."""
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


def read_results(results_dir, name):
    """The data of NAME.json in `results_dir` ({} when there is none): what a partial run keeps."""
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def write_results(results_dir, name, data, markdown):
    """Writes NAME.json (`data`) and NAME.md (`markdown`) in `results_dir`, and prints the markdown."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    with open(os.path.join(results_dir, f"{name}.md"), "w") as handle:
        handle.write(text)
    print(text, flush=True)


def backend_of(runner):
    """The Keras backend a runner's name asks for ("keras_clip_it (tensorflow)"), JAX by default."""
    backend = runner.split("(")[-1].rstrip(")")
    return backend if backend in ("jax", "tensorflow") else "jax"


def run_child(script, arguments, backend="jax", environment=None, prefix=()):
    """Runs `script` with `arguments` in a new process, on the Keras `backend`: the result it `report`ed.

    Each measurement gets its own process: the Keras backend is fixed at import, every framework sizes its
    thread pools for the whole process, and the peak memory is then the measurement's own. `prefix` goes
    before the command (`taskset -c 0`), `environment` over this process's.
    """
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(environment or {})
    command = [*prefix, sys.executable, os.path.abspath(script), *map(str, arguments)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(_RESULT)]
    if completed.returncode or not lines:
        named = " ".join([os.path.basename(script), *map(str, arguments)])
        raise RuntimeError(f"{named} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT):])


_RESULT = "RESULT "


def report(result):
    """In a child process: hands `result` (JSON-serialisable) to the `run_child` that started it."""
    print(_RESULT + json.dumps(result), flush=True)
