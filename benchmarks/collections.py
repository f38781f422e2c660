"""Changing the analogy collection behind ASIF: swap, add, remove, in memory and on disk, against a rebuild.

Random unit embeddings stand for precomputed pairs (the encoders are not run: only their fingerprints and
dims matter here), stored as .npy files as an embedding job would leave them. All in one run:

  rebuild       from scratch: a new AnalogyCollection from the 1M precomputed pairs, ASIF over it, and a first
                image query and a first text query answered (each builds its anchor index lazily), as a model
                that classifies needs. The reference for every ratio.
  query         an image query against the current collection (its anchor index up to date): what a user
                waits for when nothing changed, the yardstick for the first query after a change.
  add / remove  asif.add / asif.remove of 10k precomputed pairs in the 1M-anchor collection (the image and the
                text anchor index both follow the change in the same call), then the first query after it;
                then the collection's own part: AnalogyCollection.add / remove alone.
  swap          two 1M-anchor collections opened from disk (memory-mapped): asif.prepare(other) builds its
                anchor indexes ahead (as a server preloading collections does), then asif.use swaps between
                the two kept collections, with the first query after each swap; for reference, a swap to a
                collection the model has not kept (its index built on the first query).
  durable       storage.append / storage.remove of 10k pairs in the stored 1M collection, against
                save_collection of the whole collection; open_collection with and without checksums; compact.

Peak memory is the process's peak resident set during each step (harness.Step: Linux VmHWM, reset before
each step); it includes memory-mapped file pages the step touched. Each change runs once per round, in turn
with the queries around it, for --rounds rounds (the median is reported). Results go to
benchmarks/results/collections_{anchors}_{dims}.json and .md (or in --results-dir).

    python benchmarks/collections.py                  # 1M anchors, D = 384, 2 rounds (about 5 minutes)
    python benchmarks/collections.py --dims 1280      # image side at EfficientNet-Lite0's 1280 dims
    python benchmarks/collections.py --anchors 100000 # a quick run
    python benchmarks/collections.py --index-only     # the image-side anchor index alone (about 3 GB less)
    python benchmarks/collections.py --skip durable,swap  # in-memory changes only (peak ~12 GB at 1M)

The results file is written after each section, so a run stopped later (out of memory) keeps what it measured.

--index-only measures AnchorIndex by itself on one set of N anchors (memory-mapped, as an embedding job
leaves them): building it and answering the first query (the reference), a steady query, then `append` of
10k anchors and `remove` of those rows with the first query after each. Results go to
benchmarks/results/collections_index_{anchors}_{dims}.json and .md.
"""

import gc
import json
import os
import shutil
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import harness  # noqa: E402
import numpy as np  # noqa: E402

from keras_clip_it.collections import AnalogyCollection  # noqa: E402
from keras_clip_it.collections import storage  # noqa: E402
from keras_clip_it.models.asif import ASIF  # noqa: E402

CHANGE = 10_000
GROWING = 14
TEXT_DIMS = 384


class PrecomputedEncoder:
    """Names the encoder that produced precomputed embeddings: ASIF reads its fingerprint and dims only."""

    def __init__(self, fingerprint, embedding_dim):
        self.fingerprint = fingerprint
        self.embedding_dim = embedding_dim

    def embed(self, *args, **kwargs):
        raise RuntimeError("this benchmark passes precomputed embeddings; no encoder runs")


def random_unit_file(path, count, dim, seed):
    """Random unit rows written to an .npy file in chunks (never the whole array in RAM)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, 100_000):
        part = rng.standard_normal((min(100_000, count - start), dim), dtype=np.float32)
        out[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


class Pairs:
    """Precomputed pairs: ids, captions and (memory-mapped) embeddings, shaped like a collection for saving."""

    def __init__(self, name, prefix, image, text, image_fp, text_fp):
        self.name, self.language = name, "it"
        self.ids = [f"{prefix}{i}" for i in range(len(image))]
        self.captions = [f"didascalia {i}" for i in range(len(image))]
        self.image_refs = [None] * len(image)
        self.metadata = [{}] * len(image)
        self.fingerprints = {"image": [image_fp], "text": [text_fp]}
        self._arrays = {image_fp: image, text_fp: text}

    def embeddings(self, kind, fingerprint):
        return self._arrays[fingerprint]


def first_query(asif, query):
    """One image query's relative representation: needs the image-side anchor index of the current version."""
    asif.encode_images(embeddings=query)


def median_step(peaks, reference, steady=None):
    seconds = statistics.median(p.seconds for p in peaks)
    step = {
        "seconds": round(seconds, 4),
        "max_seconds": round(max(p.seconds for p in peaks), 4),
        "cpu_seconds": round(statistics.median(p.cpu_seconds for p in peaks), 4),
        "peak_rss_mb": max(p.peak_mb or 0 for p in peaks) or None,
        "rebuild_over_this": round(reference / seconds, 1),
    }
    if steady is not None:
        step["over_steady_query"] = round(seconds / steady, 2)
    return step


def index_only(n, dims, repeats, work, results):
    """AnchorIndex alone: build + first query (the reference), steady query, append / remove 10k + first query."""
    import inspect

    from keras_clip_it.search import AnchorIndex

    k = inspect.signature(ASIF).parameters["k"].default
    anchors = random_unit_file(f"{work}/anchors.npy", n, dims, 1)
    query, extra = harness.random_unit(1, dims, 5), harness.random_unit(CHANGE, dims, 6)
    steps = results["steps"]
    with harness.Step() as peak:
        index = AnchorIndex(anchors)
        index.topk(query, k)
    steps["index_build"] = {"seconds": round(peak.seconds, 4), "peak_rss_mb": peak.peak_mb}
    build = peak.seconds
    queries = []
    for _ in range(3):
        with harness.Step() as peak:
            index.topk(query, k)
        queries.append(peak)
    steady = statistics.median(p.seconds for p in queries)
    steps["index_query"] = median_step(queries, build)
    timings = {"append": [], "append_then_query": [], "remove": [], "remove_then_query": []}
    for _ in range(repeats):
        with harness.Step() as append:
            index = index.append(extra)
        with harness.Step() as after_append:
            index.topk(query, k)
        with harness.Step() as remove:
            index = index.remove(np.arange(index.size - CHANGE, index.size))
        with harness.Step() as after_remove:
            index.topk(query, k)
        for name, peak in zip(timings, (append, after_append, remove, after_remove)):
            timings[name].append(peak)
    for name, peaks in timings.items():
        steps[f"index_{name}"] = median_step(peaks, build, steady if name.endswith("_then_query") else None)
    for name, step in steps.items():
        print(json.dumps({name: step}), flush=True)
    results["k"] = k
    results["targets"] = change_targets(steps, "index", "append")


def main():
    parser = harness.parser(__doc__, rounds=2, rounds_help="rounds of each change, in turn (median reported)")
    parser.add_argument("--anchors", type=int, default=1_000_000, help="pairs per collection")
    parser.add_argument("--dims", type=int, default=384, help="image embedding dims (text: 384)")
    parser.add_argument("--workdir", default=None, help="where the temporary collections go (default: a temp dir)")
    parser.add_argument("--index-only", action="store_true", help="only the anchor index: build, append, remove")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to leave out: durable, swap (each needs its own memory)"
    )
    args = parser.parse_args()
    skip = {part for part in args.skip.split(",") if part}
    if skip - {"durable", "swap"}:
        parser.error(f"--skip takes durable and/or swap, got {sorted(skip - {'durable', 'swap'})}")
    n, dims = args.anchors, args.dims
    work = tempfile.mkdtemp(prefix="kci-collections-bench-", dir=args.workdir)
    image_encoder = PrecomputedEncoder("bench-image", dims)
    text_encoder = PrecomputedEncoder("bench-text", TEXT_DIMS)
    fps = (image_encoder.fingerprint, text_encoder.fingerprint)
    results = {
        "machine": harness.machine(numpy=np.__version__),
        "anchors": n,
        "image_dims": dims,
        "text_dims": TEXT_DIMS,
        "change": CHANGE,
        "repeats": args.rounds,
        "steps": {},
        "sections": ["memory"],
    }
    results["load_average_at_start"] = harness.load_average()
    steps = results["steps"]
    if args.index_only:
        del results["sections"]
        try:
            index_only(n, dims, args.rounds, work, results)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write(results, f"collections_index_{n}_{dims}", args.results_dir)
        return

    def record(name, peak, **extra):
        steps[name] = {"seconds": round(peak.seconds, 4), "peak_rss_mb": peak.peak_mb, **extra}
        print(json.dumps({name: steps[name]}), flush=True)

    try:
        print(f"writing 2 x {n:,} precomputed pairs to {work}", flush=True)
        pairs_a = Pairs(
            "bench-a", "a", random_unit_file(f"{work}/a_image.npy", n, dims, 1),
            random_unit_file(f"{work}/a_text.npy", n, TEXT_DIMS, 2), *fps,
        )
        pairs_b = Pairs(
            "bench-b", "b", random_unit_file(f"{work}/b_image.npy", n, dims, 3),
            random_unit_file(f"{work}/b_text.npy", n, TEXT_DIMS, 4), *fps,
        )
        query, text_query = harness.random_unit(1, dims, 5), harness.random_unit(1, TEXT_DIMS, 8)
        extra = {
            "ids": [f"new{i}" for i in range(CHANGE)],
            "captions": [f"nuova {i}" for i in range(CHANGE)],
            "image": harness.random_unit(CHANGE, dims, 6),
            "text": harness.random_unit(CHANGE, TEXT_DIMS, 7),
        }

        # === Rebuild from scratch (the reference) ===
        with harness.Step() as peak:
            collection = AnalogyCollection(name="bench-a", language="it")
            collection.add(
                pairs_a.ids,
                captions=pairs_a.captions,
                embeddings={kind: {fp: pairs_a.embeddings(kind, fp)} for kind, fp in zip(("image", "text"), fps)},
            )
            asif = ASIF(image_encoder, text_encoder, collection=collection)
            first_query(asif, query)
            asif.encode_texts(embeddings=text_query)
        record("rebuild", peak)
        rebuild = peak.seconds
        queries = []
        for _ in range(3):
            with harness.Step() as peak:
                first_query(asif, query)
            queries.append(peak)
        steady = statistics.median(p.seconds for p in queries)
        steps["query"] = {
            "seconds": round(steady, 4),
            "peak_rss_mb": max(p.peak_mb or 0 for p in queries) or None,
            "rebuild_over_this": round(rebuild / steady, 1),
        }
        print(json.dumps({"query": steps["query"]}), flush=True)

        # === In-memory add / remove through ASIF ===
        timings = {"add": [], "add_then_query": [], "remove": [], "remove_then_query": []}
        steady_queries = []  # a query before each change: the steady reference under the same load
        for _ in range(args.rounds):
            with harness.Step() as before:
                first_query(asif, query)
            steady_queries.append(before)
            with harness.Step() as add:
                asif.add(
                    extra["ids"], captions=extra["captions"],
                    image_embeddings=extra["image"], text_embeddings=extra["text"],
                )
            with harness.Step() as query_after_add:
                first_query(asif, query)
            with harness.Step() as remove:
                asif.remove(extra["ids"])
            with harness.Step() as query_after_remove:
                first_query(asif, query)
            timings["add"].append(add)
            timings["add_then_query"].append(query_after_add)
            timings["remove"].append(remove)
            timings["remove_then_query"].append(query_after_remove)
        steady = statistics.median(p.seconds for p in queries + steady_queries)
        steps["query"] = median_step(queries + steady_queries, rebuild)
        print(json.dumps({"query": steps["query"]}), flush=True)
        for name, peaks in timings.items():
            steps[f"asif_{name}"] = median_step(peaks, rebuild, steady if name.endswith("_then_query") else None)
            print(json.dumps({f"asif_{name}": steps[f"asif_{name}"]}), flush=True)

        # Additions in a row: the collection grows by GROWING x 10k pairs (where growing buffers used to be
        # copied whole every ~13 additions), then they are removed again.
        adds = []
        for number in range(GROWING):
            ids = [f"grown{number}-{i}" for i in range(CHANGE)]
            image = harness.random_unit(CHANGE, dims, 100 + number)
            text = harness.random_unit(CHANGE, TEXT_DIMS, 200 + number)
            with harness.Step() as add:
                asif.add(ids, captions=extra["captions"], image_embeddings=image, text_embeddings=text)
            adds.append(add)
        steps["asif_add_growing"] = median_step(adds, rebuild)
        print(json.dumps({"asif_add_growing": steps["asif_add_growing"]}), flush=True)
        asif.remove([f"grown{number}-{i}" for number in range(GROWING) for i in range(CHANGE)])
        first_query(asif, query)

        # The collection's own part of a change: AnalogyCollection.add / remove with no index following.
        adds, removes = [], []
        embeddings = {"image": {fps[0]: extra["image"]}, "text": {fps[1]: extra["text"]}}
        for _ in range(args.rounds):
            with harness.Step() as add:
                collection.add(extra["ids"], captions=extra["captions"], embeddings=embeddings)
            with harness.Step() as remove:
                collection.remove(extra["ids"])
            adds.append(add)
            removes.append(remove)
        for name, peaks in (("collection_add", adds), ("collection_remove", removes)):
            steps[name] = median_step(peaks, rebuild)
            print(json.dumps({name: steps[name]}), flush=True)

        out = f"collections_{n}_{dims}"
        results["targets"] = memory_targets(steps)
        write(results, out, args.results_dir)  # kept if a later section runs out of memory

        # === Durable changes ===
        stored_a, stored_b = f"{work}/stored_a", f"{work}/stored_b"
        if "durable" in skip:
            del asif, collection
        else:
            with harness.Step() as peak:
                storage.save_collection(collection, stored_a)
            record("save_whole", peak)
            save = peak.seconds
            del asif, collection
            embeddings = {"image": {fps[0]: extra["image"]}, "text": {fps[1]: extra["text"]}}
            appends, removes = [], []
            for _ in range(args.rounds):
                with harness.Step() as append:
                    storage.append(stored_a, extra["ids"], captions=extra["captions"], embeddings=embeddings)
                with harness.Step() as remove:
                    storage.remove(stored_a, extra["ids"])
                appends.append(append)
                removes.append(remove)
            for name, peaks in (("stored_append", appends), ("stored_remove", removes)):
                seconds = statistics.median(p.seconds for p in peaks)
                steps[name] = {
                    "seconds": round(seconds, 4),
                    "peak_rss_mb": max(p.peak_mb or 0 for p in peaks) or None,
                    "save_whole_over_this": round(save / seconds, 1),
                }
                print(json.dumps({name: steps[name]}), flush=True)
            for verify in (False, True):
                with harness.Step() as peak:
                    opened = storage.open_collection(stored_a, verify=verify)
                assert len(opened) == n
                record(f"open_segments_{'verified' if verify else 'sizes_only'}", peak)
                del opened
            with harness.Step() as peak:
                storage.compact(stored_a)
            record("compact", peak, segments_before=2 * args.rounds + 1)
            with harness.Step() as peak:
                storage.save_collection(pairs_b, stored_b)
            record("save_whole_b", peak)

            results["sections"].append("durable")
            write(results, out, args.results_dir)
        gc.collect()

        # === Swap between two stored collections ===
        if "swap" not in skip:
            if "durable" in skip:
                storage.save_collection(pairs_a, stored_a)
                storage.save_collection(pairs_b, stored_b)
            with harness.Step() as peak:
                collection_a = storage.open_collection(stored_a, verify=False)
                collection_b = storage.open_collection(stored_b, verify=False)
            record("open_two_memory_mapped", peak)
            asif = ASIF(image_encoder, text_encoder, collection=collection_a)
            with harness.Step() as peak:
                asif.prepare(collection_a)
            record("prepare_current", peak)
            with harness.Step() as peak:
                asif.prepare(collection_b)
            record("prepare_other", peak, rebuild_over_this=round(rebuild / peak.seconds, 1))
            first_query(asif, query)
            uses, swaps = [], []
            for _ in range(args.rounds):
                for target in (collection_b, collection_a):
                    with harness.Step() as use:
                        asif.use(target)
                    with harness.Step() as query_after:
                        first_query(asif, query)
                    uses.append(use)
                    swaps.append((use, query_after))
            seconds = statistics.median(p.seconds for p in uses)
            steps["swap_use"] = {
                "seconds": round(seconds, 6),
                "peak_rss_mb": max(p.peak_mb or 0 for p in uses) or None,
                "rebuild_over_this": round(rebuild / seconds, 1),
            }
            seconds = statistics.median(u.seconds + q.seconds for u, q in swaps)
            steps["swap_then_query"] = {
                "seconds": round(seconds, 4),
                "peak_rss_mb": max(max(u.peak_mb or 0, q.peak_mb or 0) for u, q in swaps) or None,
                "rebuild_over_this": round(rebuild / seconds, 1),
                "over_steady_query": round(seconds / steady, 2),
            }
            print(json.dumps({k: steps[k] for k in ("swap_use", "swap_then_query")}), flush=True)
            # A collection the model does not keep: its anchor index is built on the first query.
            del asif, collection_b
            gc.collect()
            asif = ASIF(image_encoder, text_encoder, collection=collection_a, keep_collections=1)
            first_query(asif, query)
            collection_c = storage.open_collection(stored_b, verify=False)
            with harness.Step() as peak:
                asif.use(collection_c)
                first_query(asif, query)
            record(
                "swap_cold_then_query", peak, rebuild_over_this=round(rebuild / peak.seconds, 1),
                over_steady_query=round(peak.seconds / steady, 2),
            )
            results["sections"].append("swap")
            results["targets"].update(
                {
                    "swap_le_0.5s": steps["swap_use"]["seconds"] <= 0.5,
                    "swap_then_first_query_le_0.5s": steps["swap_then_query"]["seconds"] <= 0.5,
                    "swap_then_first_query_le_2x_steady_query": steps["swap_then_query"]["over_steady_query"] <= 2,
                }
            )
            write(results, out, args.results_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def change_targets(steps, prefix, add):
    """The targets of a 10k change (`add`: "add" or "append", then remove): each within 50 ms, at least 100x
    faster than the rebuild, and the first query after it at most twice a steady query."""
    added, removed = steps[f"{prefix}_{add}"], steps[f"{prefix}_remove"]
    return {
        f"{add}_10k_le_50ms": added["seconds"] <= 0.05,
        "remove_10k_le_50ms": removed["seconds"] <= 0.05,
        f"{add}_remove_ge_100x_rebuild": min(added["rebuild_over_this"], removed["rebuild_over_this"]) >= 100,
        f"first_query_after_{add}_remove_le_2x_steady_query": max(
            steps[f"{prefix}_{add}_then_query"]["over_steady_query"],
            steps[f"{prefix}_remove_then_query"]["over_steady_query"],
        ) <= 2,
    }


def memory_targets(steps):
    return {
        **change_targets(steps, "asif", "add"),
        "add_10k_le_50ms_every_one_of_14_in_a_row": steps["asif_add_growing"]["max_seconds"] <= 0.05,
    }


def write(results, name, results_dir):
    results["load_average_at_end"] = harness.load_average()
    harness.write_results(results_dir, name, results, markdown(results))


DESCRIPTIONS = {
    "rebuild": "rebuild from scratch: collection from precomputed pairs + ASIF + first image and text queries",
    "query": "an image query, anchor index up to date (steady state: 3 after the rebuild, 1 before each change)",
    "asif_add": "asif.add 10k precomputed pairs (image and text anchor indexes follow)",
    "asif_add_then_query": "first query after the add",
    "asif_add_growing": f"asif.add 10k precomputed pairs, {GROWING} times in a row (the collection grows by {GROWING * 10}k)",
    "asif_remove": "asif.remove 10k pairs (image and text anchor indexes follow)",
    "asif_remove_then_query": "first query after the remove",
    "collection_add": "AnalogyCollection.add 10k precomputed pairs alone (no index following)",
    "collection_remove": "AnalogyCollection.remove 10k pairs alone (no index following)",
    "save_whole": "storage.save_collection of the whole collection (durable rebuild)",
    "stored_append": "storage.append 10k pairs (new segment + manifest, fsynced)",
    "stored_remove": "storage.remove 10k pairs (tombstone segment + manifest, fsynced)",
    "open_segments_sizes_only": "open_collection, segments + tombstones, sizes/shapes checked",
    "open_segments_verified": "open_collection, segments + tombstones, sha256 verified",
    "compact": "storage.compact into one segment",
    "save_whole_b": "storage.save_collection of the second collection (from memory-mapped arrays)",
    "open_two_memory_mapped": "open both compacted collections (memory-mapped, sizes checked)",
    "prepare_current": "asif.prepare(current collection): its image and text anchor indexes built",
    "prepare_other": "asif.prepare(other collection of the same size), ahead of swapping to it",
    "swap_use": "asif.use(other), both collections kept (prepared or used before)",
    "swap_then_query": "asif.use(other) + first query, both kept",
    "swap_cold_then_query": "asif.use(a collection not kept) + first query (its image index built)",
    "index_build": "AnchorIndex built from scratch + first query (the reference)",
    "index_query": "a query, index unchanged (steady state)",
    "index_append": "index.append 10k anchors (a new index)",
    "index_append_then_query": "first query after the append",
    "index_remove": "index.remove those 10k rows (a new index)",
    "index_remove_then_query": "first query after the remove",
}


def markdown(results):
    lines = [
        f"# {'Anchor index' if 'index_build' in results['steps'] else 'Analogy collection'} changes vs. rebuild "
        f"({results['machine']}; {results['anchors']:,} anchors, image {results['image_dims']}-d, "
        f"text {results['text_dims']}-d)",
        "",
        f"Changes of {results['change']:,} pairs; median of {results['repeats']} rounds (max seconds: the "
        "slowest of them); CPU seconds: the process's CPU time during the step, all threads (median); ratio = "
        "reference time / this step's time, measured in the same run (reference: the rebuild for in-memory "
        "steps, save_collection of the whole collection for durable ones). \"/ steady query\": this step's time "
        "over a query's when nothing changed.",
        "",
        "| step | seconds | max seconds | CPU seconds | ratio | / steady query | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, step in results["steps"].items():
        ratio = step.get("rebuild_over_this", step.get("save_whole_over_this"))
        slowest, cpu = step.get("max_seconds"), step.get("cpu_seconds")
        lines.append(
            f"| {DESCRIPTIONS[name]} | {step['seconds']:.4f} | {'' if slowest is None else f'{slowest:.4f}'} "
            f"| {'' if cpu is None else f'{cpu:.4f}'} | {f'{ratio:,}x' if ratio else ''} "
            f"| {step.get('over_steady_query', '')} | {step['peak_rss_mb']} |"
        )
    if "sections" in results:
        lines += ["", f"Sections run: {', '.join(results['sections'])} (see --skip)."]
    if results.get("load_average_at_start") is not None:
        lines += [
            "",
            f"Load average (1 min) at start {results['load_average_at_start']}, at end "
            f"{results.get('load_average_at_end')}: the machine's other work shares its "
            f"{os.cpu_count()} cores, and every time above includes it.",
        ]
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if met else 'no'} |" for name, met in results["targets"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
