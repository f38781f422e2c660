"""The loop the text-encoder benchmarks share (benchmarks/minilm.py, benchmarks/e5.py).

Every runner measures in its own process (the Keras backend is fixed at import, and torch, JAX and
TensorFlow each size their thread pools for the whole machine), the runners in turn for --rounds rounds,
on the same texts and batch size. In a runner's process each workload's texts/s is the best of --repeats
timed runs after a warm-up run that compiles every batch shape; each workload keeps its best round.
"""

import argparse
import tempfile

import harness


def throughput(embed, workloads, repeats, tokenize=None):
    """{workload: texts/s of `embed` (and of `tokenize`, when given), texts} on `workloads` ({name: texts})."""
    rows = {}
    for name, texts in workloads.items():
        rows[name] = {"texts_per_s": len(texts) / harness.best_time(lambda: embed(texts), repeats)[0]}
        if tokenize is not None:
            rows[name]["tokenize_texts_per_s"] = len(texts) / harness.best_time(lambda: tokenize(texts), repeats)[0]
        rows[name]["texts"] = len(texts)
    return rows


def main(script, doc, name, runners, measure, table, add_arguments=None, finish=None):
    """Runs a text benchmark: `measure(runner, args)` in a process per runner and round, returning
    {"workloads": throughput(...), "peak_rss_mb": ..., ...}; `finish(results)` reads the files the
    processes left in args.output before they go; `table(results, args)` is the markdown of NAME.md.

    `runners(args)` names the runners; `add_arguments(parser)` adds the benchmark's own arguments.
    """
    parser = harness.parser(doc, rounds=1, rounds_help="times every runner is measured, in turn, keeping its best")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each workload in a runner's process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return harness.report(measure(args.child, args))
    with tempfile.TemporaryDirectory() as folder:

        def process(runner):
            arguments = ["--child", runner, "--batch-size", args.batch_size, "--repeats", args.repeats]
            arguments += ["--output", folder]
            return lambda: harness.run_child(script, arguments, harness.backend_of(runner))

        runs = {runner: process(runner) for runner in runners(args)}
        measured = harness.rounds(runs, args.rounds, show=lambda result: result["workloads"])
        keys = ("texts_per_s", "tokenize_texts_per_s")
        results = {runner: harness.best_rows(rounds, "workloads", keys) for runner, rounds in measured.items()}
        if finish:
            finish(results)
    data = {"batch_size": args.batch_size, "repeats": args.repeats, "rounds": args.rounds, "results": results}
    harness.write_results(args.results_dir, name, data, table(results, args))
