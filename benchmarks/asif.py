"""ASIF search throughput and anchor compression, against the original algorithm and the GEMM roofline.

For each (anchors N, dims D) on random unit vectors, with k = 800 and the same queries:
  ours       AnchorIndex.topk: bfloat16 screening + certified exact float32 rescoring (exact results).
  reference  the original algorithm (Norelli et al., relreps.py): dense float32 inner products per chunk
             of 100k anchors and a full top-k per chunk, merged; jitted JAX on the same device.
  roofline   the float32 GEMM of the same shapes alone (no top-k), and the bfloat16 GEMM our screening
             runs, both measured in this run.
Then bytes per anchor for float32 / float16 / int8 and the top-1 / top-k agreement of compressed anchors
with float32. Results go to benchmarks/results/asif.json and asif.md; numbers are queries per second
(best of the repeats: the machine is shared).

    python benchmarks/asif.py            # 100k and 1M anchors, D = 1280 and 384 (about 5 minutes)
    python benchmarks/asif.py --quick    # 20k and 100k anchors, D = 384
"""

import argparse
import gc
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_clip_it.models import asif_index  # noqa: E402
from keras_clip_it.models.asif_index import AnchorIndex  # noqa: E402

K = 800
REFERENCE_CHUNK = 100_000  # dic_size in the authors' code
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def random_unit(count, dim, seed):
    """Random unit rows, generated in chunks to keep the float64 temporaries small."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        part = rng.standard_normal((min(100_000, count - start), dim), dtype=np.float32)
        out[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def best_time(run, repeats):
    run()  # compile and warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


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


def bf16_gemm_only(queries, index):
    """The bfloat16 product alone over the index's own blocks: the floor of our screening."""
    queries = jnp.asarray(queries.astype(jnp.bfloat16))
    outputs = [asif_index._block_scores(queries, anchors, scales, bias)[0] for anchors, scales, bias, *_ in index._blocks]
    outputs[-1].block_until_ready()


def throughput(count, dim, queries_count, repeats):
    anchors = random_unit(count, dim, seed=count + dim)
    queries = random_unit(queries_count, dim, seed=1)
    row = {"anchors": count, "dim": dim, "queries": queries_count, "k": K}

    # Reference and float32 roofline first, then free their device copy before building the index.
    chunks = [jnp.asarray(anchors[s : s + REFERENCE_CHUNK]) for s in range(0, count, REFERENCE_CHUNK)]
    reference = reference_topk(queries, chunks)
    row["reference_s"] = best_time(lambda: reference_topk(queries, chunks), repeats)
    row["gemm_f32_s"] = best_time(lambda: gemm_only(queries, chunks), repeats)
    del chunks
    gc.collect()

    start = time.perf_counter()
    index = AnchorIndex(anchors)
    row["index_build_s"] = time.perf_counter() - start
    ours = index.topk(queries, K, batch_size=queries_count)
    row["ours_s"] = best_time(lambda: index.topk(queries, K, batch_size=queries_count), repeats)
    row["gemm_bf16_s"] = best_time(lambda: bf16_gemm_only(queries, index), repeats)
    row["max_abs_diff_vs_reference"] = float(np.abs(ours[0] - reference[0]).max())
    row["same_rows_vs_reference"] = float(np.mean(ours[1] == reference[1]))

    for name in ("ours", "reference", "gemm_f32", "gemm_bf16"):
        row[f"{name}_qps"] = queries_count / row[f"{name}_s"]
    row["ours_vs_reference"] = row["ours_qps"] / row["reference_qps"]
    row["ours_vs_gemm_f32_roofline"] = row["ours_qps"] / row["gemm_f32_qps"]
    row["ours_vs_gemm_bf16_roofline"] = row["ours_qps"] / row["gemm_bf16_qps"]
    del index, anchors
    gc.collect()
    return row


def compression(count, dim, queries_count):
    """Bytes per anchor and agreement with float32, for random queries and for queries near an anchor.

    Random queries against random anchors are the worst case for top-1 agreement: the best and second
    best anchors differ by ~0.005 in cosine, about 20 int8 rounding errors. Queries near an anchor
    (cosine ~0.7, as a photo is near its duplicate in a collection) show the common case.
    """
    anchors = random_unit(count, dim, seed=7 + dim)
    rng = np.random.default_rng(3)
    query_sets = {
        "random": random_unit(queries_count, dim, seed=2),
        "near_anchor": anchors[rng.choice(count, queries_count, replace=False)] + random_unit(queries_count, dim, seed=4),
    }
    full = AnchorIndex(anchors)
    row = {"anchors": count, "dim": dim, "queries": queries_count}
    indexes = {"float32": full, "float16": AnchorIndex(anchors, dtype="float16"), "int8": AnchorIndex(anchors, dtype="int8")}
    for name, queries in query_sets.items():
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        want_values, want_rows = full.topk(queries, K)
        for dtype, index in indexes.items():
            values, rows = index.topk(queries, K)
            overlap = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(rows, want_rows)])
            entry = row.setdefault(dtype, {"bytes_per_anchor": index.nbytes / count, "bytes_vs_float32": index.nbytes / full.nbytes})
            entry[f"top1_agreement_{name}"] = float(np.mean(rows[:, 0] == want_rows[:, 0]))
            entry[f"topk_overlap_{name}"] = float(overlap)
            entry[f"max_abs_score_error_{name}"] = float(np.abs(values - want_values).max())
    return row


def markdown(results):
    lines = [
        f"# ASIF search benchmark ({results['machine']})",
        "",
        f"k = {K}; random unit vectors; queries/s, best of {results['repeats']} runs; exact = identical top-k "
        "to the reference (max |difference| of the scores shown).",
        "",
        "| anchors | D | queries | ours q/s | reference q/s | f32 GEMM q/s | bf16 GEMM q/s | ours / reference "
        "| ours / f32 GEMM | ours / bf16 GEMM | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["throughput"]:
        lines.append(
            f"| {r['anchors']:,} | {r['dim']} | {r['queries']} | {r['ours_qps']:.1f} | {r['reference_qps']:.1f} "
            f"| {r['gemm_f32_qps']:.1f} | {r['gemm_bf16_qps']:.1f} | {r['ours_vs_reference']:.2f}x "
            f"| {r['ours_vs_gemm_f32_roofline']:.0%} | {r['ours_vs_gemm_bf16_roofline']:.0%} "
            f"| {r['max_abs_diff_vs_reference']:.1e} |"
        )
    lines += [
        "",
        "| anchors | D | dtype | bytes/anchor | vs float32 | top-1 agreement (random / near-anchor queries) "
        "| top-k overlap (random) | max score error (random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["compression"]:
        for dtype in ("float32", "float16", "int8"):
            c = r[dtype]
            lines.append(
                f"| {r['anchors']:,} | {r['dim']} | {dtype} | {c['bytes_per_anchor']:.0f} | {c['bytes_vs_float32']:.3f} "
                f"| {c['top1_agreement_random']:.3f} / {c['top1_agreement_near_anchor']:.3f} "
                f"| {c['topk_overlap_random']:.3f} | {c['max_abs_score_error_random']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 30 seconds)")
    parser.add_argument("--queries", type=int, default=None, help="queries per measurement")
    args = parser.parse_args()
    if args.quick:
        sizes, dims, queries, repeats = (20_000, 100_000), (384,), args.queries or 32, 2
    else:
        sizes, dims, queries, repeats = (100_000, 1_000_000), (1280, 384), args.queries or 256, 1
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
        "repeats": repeats,
        "quick": args.quick,
        "throughput": [],
        "compression": [],
    }
    for dim in dims:
        for count in sizes:
            row = throughput(count, dim, queries, repeats)
            results["throughput"].append(row)
            print(json.dumps(row), flush=True)
    for dim in dims:
        row = compression(sizes[0], dim, 256 if not args.quick else 64)
        results["compression"].append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    name = "asif_quick" if args.quick else "asif"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
