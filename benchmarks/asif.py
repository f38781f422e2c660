"""ASIF search throughput and anchor compression, against the original algorithm and the GEMM roofline.

Throughput, for each (anchors N, dims D) on random unit vectors, with k = 800 and the same queries:
  ours       AnchorIndex.topk: bfloat16 screening + certified exact float32 rescoring (exact results).
  reference  the original algorithm (Norelli et al., relreps.py): dense float32 inner products per chunk
             of 100k anchors and a full top-k per chunk, merged; jitted JAX on the same device.
  roofline   the float32 GEMM of the same shapes alone (no top-k), and the bfloat16 GEMM alone over the
             blocks our screening scans, both measured in this run.
The four run in turn, round after round (benchmarks/harness.py; the machine is shared: each round sees
about the same load); queries/s are from each one's best round, and the median over rounds of the
within-round ratios is shown beside them.

Compression: bytes per anchor for float32 / float16 / int8 and agreement with float32 anchors, on
  random      random unit vectors: the nearest of 100k random anchors to random queries, the hardest case
              (the best and second best differ by ~0.005 in cosine, a few int8 rounding errors), and
              queries near an anchor;
  real        what ASIF users see, with the cached embeddings of recipes/asif_fashion.py and
              recipes/asif_emoji.py: the nearest anchor of real image embeddings, and ASIF's own
              predictions (Fashion-MNIST zero-shot class with 60k training anchors, emoji held-out image ->
              caption retrieval) with int8 against float32 anchors.
"int8, max-abs scale" is the plain per-row quantiser (scale = max |value| / 127) beside ours (the same codes
with the least-squares scale), at the same bytes. "int8, refined" is `RefinedIndex`: the int8 index in
memory plus a residual norm per anchor, and the float32 anchors saved as a collection on local disk and
memory-mapped, read only at the candidates each query rescores (exact by construction). For it the
compression part also times k = 800 and k = 1 searches against the float32 and plain int8 indexes
(interleaved rounds, 256 random queries, page cache warm) and counts the float32 rows read per query.
Results go to benchmarks/results/asif.json and asif.md (asif_quick.* with --quick; or in --results-dir).

    python benchmarks/asif.py            # 100k and 1M anchors, D = 1280 and 384, real data (about 15 minutes)
    python benchmarks/asif.py --quick    # 20k and 100k anchors, D = 384, no real data
"""

import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import harness  # noqa: E402

sys.path.insert(0, os.path.join(harness.ROOT, "recipes"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_clip_it.collections import AnalogyCollection  # noqa: E402
from keras_clip_it.collections.storage import open_collection, save_collection  # noqa: E402
from keras_clip_it.search import AnchorIndex  # noqa: E402
from keras_clip_it.search import RefinedIndex  # noqa: E402

K = 800
REFERENCE_CHUNK = 100_000  # dic_size in the authors' code
DTYPES = ("float32", "float16", "int8", "int8, max-abs scale")
REFINED = "int8, refined"


def random_unit(count, dim, seed):
    """Random unit rows, generated in chunks to keep the float64 temporaries small.

    The array is 64-byte aligned, so `jax.device_put` of it or of its row slices shares its memory on CPU:
    the reference's chunks and the index's float32 anchors are then one copy (1M x 1280 fits in 8 GB).
    """
    rng = np.random.default_rng(seed)
    size = count * dim * 4
    buffer = np.empty(size + 64, np.uint8)
    first = -buffer.ctypes.data % 64
    out = buffer[first : first + size].view(np.float32).reshape(count, dim)
    for start in range(0, count, 100_000):
        part = rng.standard_normal((min(100_000, count - start), dim), dtype=np.float32)
        out[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


@jax.jit
def _reference_chunk(queries, anchors, best_values, best_rows, offset):
    scores = queries @ anchors.T
    values, rows = jax.lax.top_k(scores, K)
    merged_values = jnp.concatenate([best_values, values], axis=1)
    merged_rows = jnp.concatenate([best_rows, rows + offset], axis=1)
    values, positions = jax.lax.top_k(merged_values, K)
    return values, jnp.take_along_axis(merged_rows, positions, axis=1)


def reference_topk(queries, chunks):
    """The original algorithm: dense float32 scores per chunk, top-k per chunk, running merge."""
    queries = jnp.asarray(queries)
    values = jnp.full((len(queries), K), -jnp.inf, jnp.float32)
    rows = jnp.zeros((len(queries), K), jnp.int32)
    offset = 0
    for chunk in chunks:
        values, rows = _reference_chunk(queries, chunk, values, rows, offset)
        offset += chunk.shape[0]
    return np.asarray(values), np.asarray(rows)


_gemm = jax.jit(lambda queries, anchors: queries @ anchors.T)


def gemm_only(queries, chunks):
    """The float32 product alone, chunk by chunk: what no exact float32 method can beat."""
    queries = jnp.asarray(queries)
    outputs = [_gemm(queries, chunk) for chunk in chunks]
    outputs[-1].block_until_ready()


_bf16_gemm = jax.jit(
    lambda queries, anchors: jax.lax.dot_general(
        queries, anchors, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
)


def bf16_gemm_only(queries, index):
    """The bfloat16 product alone over the index's own blocks: the floor of our screening."""
    queries = jnp.asarray(queries.astype(jnp.bfloat16))
    outputs = [_bf16_gemm(queries, anchors) for anchors, *_ in index._blocks]
    outputs[-1].block_until_ready()


def throughput(count, dim, queries_count, rounds):
    anchors = random_unit(count, dim, seed=count + dim)
    queries = random_unit(queries_count, dim, seed=1)
    row = {"anchors": count, "dim": dim, "queries": queries_count, "k": K, "rounds": rounds}
    # Both share the memory of `anchors` (immutable jax arrays: the index keeps them without a copy).
    chunks = [jax.device_put(anchors[s : s + REFERENCE_CHUNK]) for s in range(0, count, REFERENCE_CHUNK)]
    start = time.perf_counter()
    index = AnchorIndex(jax.device_put(anchors))
    row["index_build_s"] = time.perf_counter() - start
    del anchors
    reference = reference_topk(queries, chunks)
    ours = index.topk(queries, K, batch_size=queries_count)
    row["max_abs_diff_vs_reference"] = float(np.abs(ours[0] - reference[0]).max())
    row["same_rows_vs_reference"] = float(np.mean(ours[1] == reference[1]))
    times = harness.timed({
        "ours": lambda: index.topk(queries, K, batch_size=queries_count),
        "reference": lambda: reference_topk(queries, chunks),
        "gemm_f32": lambda: gemm_only(queries, chunks),
        "gemm_bf16": lambda: bf16_gemm_only(queries, index),
    }, rounds)
    for name, seconds in times.items():
        row[f"{name}_s"] = min(seconds.wall)
        row[f"{name}_rounds_s"] = seconds.wall
        row[f"{name}_qps"] = queries_count / min(seconds.wall)
    for name in ("reference", "gemm_f32", "gemm_bf16"):
        row[f"ours_vs_{name}"] = row["ours_qps"] / row[f"{name}_qps"]
        row[f"ours_vs_{name}_median_round"] = harness.median_ratio(times[name].wall, times["ours"].wall)
    del index, chunks
    gc.collect()
    return row


def max_abs_int8(anchors):
    """The plain per-row int8 quantiser (scale = max |value| / 127), dequantised to float32."""
    step = np.abs(anchors).max(axis=1, keepdims=True) / 127.0
    step = np.where(step > 0, step, 1.0)
    return (np.clip(np.rint(anchors / step), -127, 127) * step).astype(np.float32)


def indexes(anchors, exact_rows):
    """{dtype: index} for DTYPES and REFINED; the max-abs int8 anchors are searched dequantised (same results).

    The refined index rescores against `exact_rows`, the float32 anchors (memory-mapped or in memory).
    """
    out = {dtype: AnchorIndex(anchors, dtype=dtype) for dtype in DTYPES[:3]}
    out[DTYPES[3]] = AnchorIndex(max_abs_int8(anchors))
    out[REFINED] = RefinedIndex(out["int8"], exact_rows)
    return out


def memory_mapped_rows(anchors, folder):
    """`anchors` saved as an analogy collection under `folder` and opened again: its float32 embeddings are
    then a copy-on-write memory map of the segment's .npy file, as ASIF sees a collection kept on disk."""
    collection = AnalogyCollection()
    collection.add([str(i) for i in range(len(anchors))], embeddings={"image": {"benchmark": anchors}})
    save_collection(collection, folder)
    return open_collection(folder, verify=False).embeddings("image", "benchmark")


def resident_bytes(index):
    """Bytes an index keeps in memory (`resident_nbytes`): stored anchors with their spare rows, the screening
    blocks (once where they are the int8 codes themselves), their masks, the spare block kept ready for
    appends and, when refined, the residual norms and outliers. The other float32 rows of a refined index
    stay on disk."""
    return index.resident_nbytes


def agreement(index, want_rows, queries, k):
    """Top-1 agreement and top-k overlap of `index` with the float32 rows `want_rows` (Q, k)."""
    values, rows = index.topk(queries, k)
    overlap = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(rows, want_rows)])
    return rows[:, 0] == want_rows[:, 0], float(overlap), values


def compression(count, dim, queries_count, rounds):
    """Bytes per anchor and agreement with float32 on random unit vectors (random and near-anchor queries),
    and the speed and reads of the refined int8 index."""
    anchors = random_unit(count, dim, seed=7 + dim)
    rng = np.random.default_rng(3)
    query_sets = {
        "random": random_unit(queries_count, dim, seed=2),
        "near_anchor": anchors[rng.choice(count, queries_count, replace=False)] + random_unit(queries_count, dim, seed=4),
    }
    with tempfile.TemporaryDirectory() as folder:
        built = indexes(anchors, memory_mapped_rows(anchors, os.path.join(folder, "anchors")))
        full, refined = built["float32"], built[REFINED]
        row = {"anchors": count, "dim": dim, "queries": queries_count}
        for name, queries in query_sets.items():
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
            want_values, want_rows = full.topk(queries, K)
            for dtype, index in built.items():
                before = refined.rows_read, refined.queries_answered
                same, overlap, values = agreement(index, want_rows, queries, K)
                # The max-abs int8 anchors are searched dequantised, but would be stored as int8 is.
                stored = built["int8"] if dtype == DTYPES[3] else index
                entry = row.setdefault(dtype, {
                    "bytes_per_anchor": stored.nbytes / count, "bytes_vs_float32": stored.nbytes / full.nbytes,
                    "resident_bytes_per_anchor": resident_bytes(stored) / count,
                    "resident_vs_float32_index": resident_bytes(stored) / resident_bytes(full),
                })
                entry[f"top1_agreement_{name}"] = float(np.mean(same))
                # Standard error of the agreement (binomial), so a reader can tell noise from a difference.
                entry[f"top1_agreement_{name}_se"] = float(np.sqrt(np.mean(same) * (1 - np.mean(same)) / len(same)))
                entry[f"topk_overlap_{name}"] = overlap
                entry[f"max_abs_score_error_{name}"] = float(np.abs(values - want_values).max())
                if dtype == REFINED:
                    reads = (refined.rows_read - before[0]) / (refined.queries_answered - before[1])
                    entry[f"rows_read_per_query_{name}"] = reads
        row[REFINED]["speed"] = refined_speed(built, query_sets, rounds)
        del built, full, refined
        gc.collect()
    return row


def refined_speed(built, query_sets, rounds, count=256):
    """Queries/s of the refined int8 index against the float32 and plain int8 indexes (k = 800 and 1,
    interleaved rounds), and the float32 rows it reads per query once it has learned its widths."""
    refined, out = built[REFINED], {}
    for k in (K, 1):
        queries = {name: q[:count] / np.linalg.norm(q[:count], axis=1, keepdims=True) for name, q in query_sets.items()}
        times = harness.timed({
            dtype: (lambda index=built[dtype]: index.topk(queries["random"], k, batch_size=count))
            for dtype in ("float32", "int8", REFINED)
        }, rounds)
        result = {f"{dtype}_qps": count / min(seconds.wall) for dtype, seconds in times.items()}
        for dtype in ("float32", "int8"):
            result[f"vs_{dtype}"] = result[f"{REFINED}_qps"] / result[f"{dtype}_qps"]
            result[f"vs_{dtype}_median_round"] = harness.median_ratio(times[dtype].wall, times[REFINED].wall)
        for name, q in queries.items():
            refined.topk(q, k)  # learns this query set's width, as a steady stream of such queries would
            before = refined.rows_read
            refined.topk(q, k)
            result[f"rows_read_per_query_{name}"] = (refined.rows_read - before) / count
        out[f"k{k}"] = result
        print(json.dumps({"k": k, **result}), flush=True)
    return out


def real_nearest_anchor():
    """Top-1 agreement of the nearest anchor on real image embeddings (Fashion-MNIST 60k train anchors,
    10k test queries; emoji 1,481 train anchors, 393 held-out queries)."""
    fashion, emoji = real_data()
    rows = []
    for name, anchors, queries in (
        ("Fashion-MNIST images (EfficientNet-Lite0, 64 px)", fashion["train"], fashion["test"]),
        ("emoji images (EfficientNet-Lite0, 224 px)", emoji["images"][emoji["train"]], emoji["images"][emoji["test"]]),
    ):
        built = indexes(anchors, anchors)
        want_rows = built["float32"].topk(queries, 1)[1]
        row = {"data": name, "anchors": len(anchors), "queries": len(queries), "dim": anchors.shape[1]}
        for dtype, index in built.items():
            same = index.topk(queries, 1)[1][:, 0] == want_rows[:, 0]
            row[dtype] = {"top1_agreement": float(np.mean(same)), "disagreements": int((~same).sum())}
        row[REFINED]["rows_read_per_query"] = built[REFINED].rows_read / built[REFINED].queries_answered
        rows.append(row)
    return rows


_REAL = {}


def real_data():
    """Cached embeddings of the recipes (computed and cached on first use: run the recipes first)."""
    if not _REAL:
        import asif_emoji
        import asif_fashion

        import keras_clip_it as kci

        encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet", image_size=(64, 64), crop_pct=1.0)
        (_, train_labels), _ = kci.datasets.fashion_mnist("train")
        (_, test_labels), _ = kci.datasets.fashion_mnist("test")
        _REAL["fashion"] = {
            "encoder": encoder, "train": asif_fashion.image_embeddings(encoder, "train", 60000),
            "test": asif_fashion.image_embeddings(encoder, "test"), "train_labels": train_labels,
            "test_labels": test_labels,
        }
        encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
        ids, images, _ = kci.datasets.emoji_pairs(split="all", return_ids=True)
        train_ids = set(kci.datasets.emoji_pairs(split="train", return_ids=True)[0])
        _REAL["emoji"] = {
            "encoder": encoder, "ids": ids,
            "images": asif_emoji.cached_embeddings(encoder, images, f"images_{len(images)}"),
            "train": np.array([i for i, name in enumerate(ids) if name in train_ids]),
            "test": np.array([i for i, name in enumerate(ids) if name not in train_ids]),
        }
    return _REAL["fashion"], _REAL["emoji"]


def real_predictions():
    """Agreement of ASIF's predictions with int8 (and max-abs int8) against float32 anchors, k = 800, p = 8.

    Fashion-MNIST: zero-shot class of the 10k test images among the 10 class names (60k training anchors,
    captions as in recipes/asif_fashion.py). Emoji: the caption each held-out image retrieves among the
    393 held-out captions (1,481 training anchors). English (MiniLM) and Italian (multilingual-e5-small).
    """
    import asif_emoji
    import asif_fashion
    import hashlib

    import keras_clip_it as kci
    from keras_clip_it.templates import get_templates

    fashion, emoji = real_data()
    rows = []
    for lang, preset in asif_fashion.TEXT_PRESETS.items():
        text_encoder = kci.TextEncoder.from_preset(preset)
        (_, _), class_names = kci.datasets.fashion_mnist("train", lang=lang)
        table = asif_fashion.caption_table(text_encoder, class_names, lang)
        labels = fashion["train_labels"]
        choice = np.random.default_rng(1).integers(0, table.shape[0], len(labels))
        templates = get_templates(lang)
        captions = [templates[t].format(class_names[c]) for t, c in zip(choice, labels)]

        def fashion_predictions(dtype):
            images, texts = fashion["train"], table[choice, labels]
            if dtype == DTYPES[3]:
                images, texts, dtype = max_abs_int8(images), max_abs_int8(texts), "float32"
            asif = kci.ASIF(fashion["encoder"], text_encoder, anchor_dtype=dtype)
            asif.add([f"train-{i}" for i in range(len(labels))], image_embeddings=images, text_embeddings=texts,
                     captions=captions)
            scores = asif.classify(embeddings=fashion["test"], labels=class_names,
                                   templates=asif_fashion.LABEL_TEMPLATES[lang]).scores
            return scores.argmax(axis=1)

        rows.append(prediction_row(f"Fashion-MNIST zero-shot class, {lang}", len(labels), fashion_predictions,
                                   fashion["test_labels"]))

        ids, _, all_captions = kci.datasets.emoji_pairs(lang=lang, split="all", return_ids=True)
        assert list(ids) == list(emoji["ids"]), "emoji ids differ between languages"
        digest = hashlib.sha256("\n".join(all_captions).encode()).hexdigest()[:12]
        text_embeddings = asif_emoji.cached_embeddings(text_encoder, all_captions, f"text_{lang}_{digest}")
        train, test = emoji["train"], emoji["test"]

        def emoji_predictions(dtype):
            images, texts = emoji["images"][train], text_embeddings[train]
            if dtype == DTYPES[3]:
                images, texts, dtype = max_abs_int8(images), max_abs_int8(texts), "float32"
            asif = kci.ASIF(emoji["encoder"], text_encoder, anchor_dtype=dtype)
            asif.add([ids[i] for i in train], image_embeddings=images, text_embeddings=texts)
            similarity = asif.similarity(asif.encode_images(embeddings=emoji["images"][test]),
                                         asif.encode_texts(embeddings=text_embeddings[test]))
            return similarity.argmax(axis=1)

        rows.append(prediction_row(f"emoji held-out image -> caption, {lang}", len(train), emoji_predictions,
                                   np.arange(len(test))))
    return rows


def prediction_row(name, anchors, predict, truth):
    want = predict("float32")
    row = {"data": name, "anchors": anchors, "queries": len(want), "float32_accuracy": float(np.mean(want == truth))}
    for dtype in DTYPES[2:]:  # float16 agrees on random vectors already; the int8 quantisers are the question
        got = predict(dtype)
        row[dtype] = {"agreement": float(np.mean(got == want)), "disagreements": int((got != want).sum()),
                      "accuracy": float(np.mean(got == truth))}
    print(json.dumps(row), flush=True)
    return row


def markdown(results):
    lines = [
        f"# ASIF search benchmark ({results['machine']})",
        "",
        f"k = {K}; random unit vectors; {results['queries']} queries per run; queries/s from the best of "
        f"{results['rounds']} interleaved rounds (in brackets: the median over rounds of the within-round ratio); "
        "exact = the same top-k as the reference (max |difference| of the scores shown).",
        "",
        "| anchors | D | ours q/s | reference q/s | f32 GEMM q/s | bf16 GEMM q/s | ours / reference "
        "| ours / f32 GEMM | ours / bf16 GEMM | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["throughput"], key=lambda r: (-r["dim"], r["anchors"])):
        lines.append(
            f"| {r['anchors']:,} | {r['dim']} | {r['ours_qps']:.1f} | {r['reference_qps']:.1f} "
            f"| {r['gemm_f32_qps']:.1f} | {r['gemm_bf16_qps']:.1f} "
            f"| {r['ours_vs_reference']:.2f}x ({r['ours_vs_reference_median_round']:.2f}x) "
            f"| {r['ours_vs_gemm_f32']:.0%} ({r['ours_vs_gemm_f32_median_round']:.0%}) "
            f"| {r['ours_vs_gemm_bf16']:.0%} ({r['ours_vs_gemm_bf16_median_round']:.0%}) "
            f"| {r['max_abs_diff_vs_reference']:.1e} |"
        )
    lines += [
        "",
        "Random unit vectors: top-1 agreement with float32 anchors (± standard error), k = 800. bytes/anchor: the "
        "stored anchors (int8: codes and scale; refined: also the residual norm, and the float32 rows of the 1 in "
        "1,024 anchors with the largest residuals); resident: all the index keeps "
        "in memory (`resident_nbytes`: its screening blocks, which for int8 are the stored codes themselves, and "
        "the spare rows and block kept for appends), against the float32 index's (the refined index's float32 "
        "rows stay in the memory-mapped file).",
        "",
        "| anchors | D | queries | dtype | bytes/anchor | vs float32 | resident/anchor | vs float32 index "
        "| top-1 agreement, random queries | top-1 agreement, near-anchor queries | top-k overlap (random) "
        "| max score error (random) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["compression"]:
        for dtype in [d for d in DTYPES + (REFINED,) if d in r]:
            c = r[dtype]
            resident = (f"{c['resident_bytes_per_anchor']:.0f} | {c['resident_vs_float32_index']:.3f}"
                        if "resident_bytes_per_anchor" in c else "- | -")
            lines.append(
                f"| {r['anchors']:,} | {r['dim']} | {r['queries']} | {dtype} | {c['bytes_per_anchor']:.0f} "
                f"| {c['bytes_vs_float32']:.3f} | {resident} "
                f"| {c['top1_agreement_random']:.4f} ± {c['top1_agreement_random_se']:.4f} "
                f"| {c['top1_agreement_near_anchor']:.4f} | {c['topk_overlap_random']:.3f} "
                f"| {c['max_abs_score_error_random']:.1e} |"
            )
    speeds = [r for r in results["compression"] if "speed" in r.get(REFINED, {})]
    if speeds:
        lines += [
            "",
            "Refined int8 (`RefinedIndex`): queries/s against the float32 and the plain int8 index, best of the "
            "interleaved rounds (median within-round ratio in brackets), 256 random queries, and float32 rows "
            "read from the memory map per query (page cache warm).",
            "",
            "| anchors | D | k | float32 q/s | int8 q/s | refined q/s | refined / float32 | refined / int8 "
            "| rows read, random queries | rows read, near-anchor queries |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speeds:
            for k, c in r[REFINED]["speed"].items():
                lines.append(
                    f"| {r['anchors']:,} | {r['dim']} | {k[1:]} | {c['float32_qps']:.1f} | {c['int8_qps']:.1f} "
                    f"| {c[REFINED + '_qps']:.1f} | {c['vs_float32']:.2f}x ({c['vs_float32_median_round']:.2f}x) "
                    f"| {c['vs_int8']:.2f}x ({c['vs_int8_median_round']:.2f}x) "
                    f"| {c['rows_read_per_query_random']:.0f} | {c['rows_read_per_query_near_anchor']:.0f} |"
                )
    if results.get("real_nearest_anchor"):
        shown = [d for d in DTYPES[1:] + (REFINED,) if d in results["real_nearest_anchor"][0]]
        lines += ["", "Real embeddings: nearest-anchor top-1 agreement with float32 anchors (disagreements).", "",
                  "| data | anchors | queries | " + " | ".join(shown) + " |", "|---" * (3 + len(shown)) + "|"]
        for r in results["real_nearest_anchor"]:
            cells = " | ".join(f"{r[d]['top1_agreement']:.4f} ({r[d]['disagreements']})" for d in shown)
            lines.append(f"| {r['data']} | {r['anchors']:,} | {r['queries']:,} | {cells} |")
    if results.get("real_predictions"):
        lines += ["", "ASIF predictions (k = 800, p = 8): agreement with float32 anchors (disagreements), and "
                  "accuracy (float32 / int8).", "",
                  "| prediction | anchors | queries | " + " | ".join(DTYPES[2:]) + " | accuracy f32 / int8 |",
                  "|---|---|---|---|---|---|"]
        for r in results["real_predictions"]:
            cells = " | ".join(f"{r[d]['agreement']:.4f} ({r[d]['disagreements']})" for d in DTYPES[2:])
            lines.append(f"| {r['data']} | {r['anchors']:,} | {r['queries']:,} | {cells} "
                         f"| {r['float32_accuracy']:.3f} / {r['int8']['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def merged(previous, rows, key):
    """`previous` rows whose `key` is not among `rows`, then `rows`: a partial run updates its own rows."""
    done = {tuple(row[name] for name in key) for row in rows}
    return [row for row in previous if tuple(row[name] for name in key) not in done] + rows


def main():
    parser = harness.parser(__doc__, rounds=None, rounds_help="interleaved timing rounds (default 3, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, no real data (about a minute)")
    parser.add_argument("--queries", type=int, default=256, help="queries per throughput measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="anchor counts for throughput")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="dimensions")
    parser.add_argument("--only", choices=("throughput", "compression"), default=None,
                        help="one part only; rows of the last run that this one does not measure are kept")
    parser.add_argument("--random-only", action="store_true",
                        help="compression on random vectors only (the real-data rows of the last run are kept)")
    args = parser.parse_args()
    if args.quick:
        sizes, dims, rounds, agreement_queries = (20_000, 100_000), (384,), args.rounds or 2, 256
    else:
        sizes, dims, rounds, agreement_queries = (100_000, 1_000_000), (1280, 384), args.rounds or 3, 2000
    sizes, dims = args.sizes or sizes, args.dims or dims
    name = "asif_quick" if args.quick else "asif"
    previous = harness.read_results(args.results_dir, name) if args.only or args.sizes or args.dims else {}
    results = {
        "machine": harness.machine(jax=jax.__version__),
        "queries": args.queries,
        "rounds": rounds,
        "quick": args.quick,
        "throughput": [],
        "compression": [],
    }
    if args.only != "compression":
        for dim in dims:
            for count in sizes:
                row = throughput(count, dim, args.queries, rounds)
                row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                results["throughput"].append(row)
                print(json.dumps(row), flush=True)
    if args.only != "throughput":
        for dim in dims:
            row = compression(sizes[0], dim, agreement_queries, rounds)
            results["compression"].append(row)
            print(json.dumps(row), flush=True)
        if not (args.quick or args.random_only):
            results["real_nearest_anchor"] = real_nearest_anchor()
            print(json.dumps(results["real_nearest_anchor"]), flush=True)
            results["real_predictions"] = real_predictions()
    results["throughput"] = merged(previous.get("throughput", []), results["throughput"], ("anchors", "dim"))
    results["compression"] = merged(previous.get("compression", []), results["compression"], ("anchors", "dim"))
    for part in ("real_nearest_anchor", "real_predictions"):
        if part not in results and part in previous:
            results[part] = previous[part]
    harness.write_results(args.results_dir, name, results, markdown(results))


if __name__ == "__main__":
    main()
