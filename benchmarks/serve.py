"""Throughput and latency of POST /v1/classify on `keras-clip-it serve`, at 1, 8 and 32 concurrent clients.

The server is the real default: `keras-clip-it serve --lang it` (EfficientNet-Lite0 + multilingual-e5-small
ASIF over the emoji-it collection, 1,874 pairs, k=800, p=8), started in its own process with every image
batch size compiled beforehand (--warm-up). Each request classifies one emoji drawing (a PNG from the
held-out split of kci.datasets.emoji_pairs) among 10 Italian emoji names with the "it-short" templates;
the label embeddings are cached after the first request, so a request costs one image through the image
tower plus the ASIF search.

Clients are threads with their own HTTP connection, each sending its requests back to back. Two server
configurations run side by side in the same run: micro-batching on (--encoder-batch 8: the images of up
to 8 concurrent requests share one encoder call; 8 bounds the server's memory on a small shared machine)
and off (--encoder-batch 1: one call per request). Ratios are
against the single-client run of the same configuration. The machine's load average is recorded with
each level, since other processes share the CPU.

    python benchmarks/serve.py                       # both configurations, 1/8/32 clients, whole emoji-it
    python benchmarks/serve.py --pairs 256 --requests 4   # 256 training pairs: what results/serve.* hold
"""

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = {"batched": 8, "unbatched": 1}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_subset(lang, pairs, path):
    """Stores `pairs` pairs of the emoji training split, embedded with the default encoders, at `path`."""
    import keras_clip_it as kci
    from keras_clip_it.collections import AnalogyCollection
    from keras_clip_it.serving.commands import TEXT_PRESETS

    ids, images, captions = kci.datasets.emoji_pairs(lang=lang, split="train", return_ids=True)
    keep = np.sort(np.random.default_rng(0).choice(len(ids), pairs, replace=False))
    image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    text_encoder = kci.TextEncoder.from_preset(TEXT_PRESETS[lang])
    collection = AnalogyCollection(name=f"emoji-{lang}-{pairs}", language=lang)
    collection.add(
        [ids[i] for i in keep],
        captions=[captions[i] for i in keep],
        embeddings={
            "image": {image_encoder.fingerprint: image_encoder.embed(images[keep])},
            "text": {text_encoder.fingerprint: text_encoder.embed([captions[i] for i in keep])},
        },
    )
    collection.save(path)


def start_server(lang, encoder_batch, log_path, timeout, collection=None):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "keras_clip_it.cli",
        "serve",
        "--lang",
        lang,
        "--port",
        str(port),
        "--encoder-batch",
        str(encoder_batch),
        "--warm-up",
    ]
    if collection:
        command += ["--collection", collection]
    log = open(log_path, "w")
    # Compiled XLA programs are kept on disk, so the second configuration does not compile them again.
    environment = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "kci-serve-jax-cache"))
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(2)
    process.terminate()
    raise RuntimeError(f"the server did not answer within {timeout} s; see {log_path}")


def requests_for(lang, count, seed=0):
    """`count` classify bodies: one held-out emoji PNG each, the same 10 labels."""
    import keras_clip_it as kci

    images, captions = kci.datasets.emoji_pairs(lang=lang, split="test")
    rng = np.random.default_rng(seed)
    labels = [captions[i] for i in rng.choice(len(captions), 10, replace=False)]
    bodies = []
    for i in rng.choice(len(images), count, replace=True):
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode("ascii")
        bodies.append({"images": [image], "labels": labels, "templates": f"{lang}-short"})
    return bodies


def run_level(url, clients, bodies):
    """Each of `clients` threads sends its share of `bodies` back to back; returns latencies and statuses."""
    latencies, statuses = [], []
    lock = threading.Lock()
    shares = [bodies[i::clients] for i in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(share):
        with httpx.Client(base_url=url, timeout=600) as http:
            barrier.wait()
            for body in share:
                start = time.perf_counter()
                response = http.post("/v1/classify", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "errors": int(sum(status != 200 for status in statuses)),
        "load_average": round(os.getloadavg()[0], 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lang", default="it", choices=["it", "en"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=8, help="requests per client at each level (at least 24 in all)"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--startup-timeout", type=float, default=3600, help="seconds to wait for each server")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="serve this many pairs of the emoji training split instead of the whole registered collection",
    )
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # internal: build the --pairs collection here
    args = parser.parse_args()
    if args.prepare:
        return prepare_subset(args.lang, args.pairs, args.prepare)
    collection = None
    if args.pairs:
        collection = os.path.join(tempfile.gettempdir(), f"kci-serve-emoji-{args.lang}-{args.pairs}")
        if not os.path.isdir(collection):  # embedded in a child process, whose memory is then returned
            command = [sys.executable, os.path.abspath(__file__), "--lang", args.lang, "--pairs", str(args.pairs)]
            subprocess.run(command + ["--prepare", collection], check=True)
    os.makedirs(RESULTS, exist_ok=True)

    results = {
        "endpoint": "POST /v1/classify",
        "model": f"ASIF(EfficientNet-Lite0, {'multilingual_e5_small' if args.lang == 'it' else 'all_minilm_l6_v2'}) "
        f"over emoji-{args.lang}" + (f" ({args.pairs} training pairs)" if args.pairs else "") + ", k=800, p=8",
        "request": "1 emoji PNG, 10 labels, templates '{}-short'".format(args.lang),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "configs": {},
    }
    for name in args.configs:
        log_path = os.path.join(RESULTS, f"serve_{name}.log")
        process, url, startup = start_server(args.lang, CONFIGS[name], log_path, args.startup_timeout, collection)
        try:
            primer = requests_for(args.lang, 1, seed=99)[0]
            httpx.post(f"{url}/v1/classify", json=primer, timeout=600).raise_for_status()  # caches the labels
            levels = []
            for clients in args.clients:
                bodies = requests_for(args.lang, max(24, clients * args.requests), seed=clients)
                run_level(url, clients, bodies[:clients])  # opens the connections and server threads
                level = run_level(url, clients, bodies)
                print(name, json.dumps(level), flush=True)
                levels.append(level)
        finally:
            process.terminate()
            process.wait(timeout=60)
        os.remove(log_path)  # kept when the run failed
        single = levels[0]
        for level in levels:
            level["throughput_vs_1_client"] = round(level["requests_per_s"] / single["requests_per_s"], 2)
            level["p99_over_p50"] = round(level["p99_ms"] / level["p50_ms"], 2)
        results["configs"][name] = {"encoder_batch": CONFIGS[name], "startup_s": round(startup, 1), "levels": levels}
        write(results)  # after each configuration, so a long run keeps what it measured


def write(results):
    targets = {}
    for name, config in results["configs"].items():
        by_clients = {level["clients"]: level for level in config["levels"]}
        if 8 in by_clients:
            targets[name] = {
                "8_clients_throughput_at_least_1.5x": by_clients[8]["throughput_vs_1_client"] >= 1.5,
                "8_clients_p99_at_most_3x_p50": by_clients[8]["p99_over_p50"] <= 3.0,
            }
    results["targets"] = targets
    with open(os.path.join(RESULTS, "serve.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(RESULTS, "serve.md"), "w") as handle:
        handle.write(markdown(results))
    print(markdown(results), flush=True)


def markdown(results):
    lines = [
        f"# {results['endpoint']} under concurrent clients",
        "",
        f"Model: {results['model']}. Request: {results['request']}. Machine: {results['machine']['cpus']} CPUs "
        "(shared: the load average column is the 1-minute load when each level ended).",
        "",
        "| server | clients | requests | req/s | x 1 client | p50 ms | p99 ms | p99/p50 | errors | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, config in results["configs"].items():
        label = f"{name} (encoder batch {config['encoder_batch']})"
        for level in config["levels"]:
            lines.append(
                f"| {label} | {level['clients']} | {level['requests']} | {level['requests_per_s']} | "
                f"{level['throughput_vs_1_client']} | {level['p50_ms']} | {level['p99_ms']} | {level['p99_over_p50']} | "
                f"{level['errors']} | {level['load_average']} |"
            )
    lines += ["", "Targets at 8 clients (throughput >= 1.5x one client, p99 <= 3x p50):", ""]
    for name, checks in results["targets"].items():
        lines.append(f"- {name}: " + ", ".join(f"{check} {'met' if ok else 'NOT met'}" for check, ok in checks.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
