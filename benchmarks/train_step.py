"""Training steps/s of `DualEncoder.fit` on JAX and TensorFlow, against keras-hub and PyTorch, in one run.

Every side trains the same CLIP: a ViT image tower and a causal text transformer of the same sizes
(pre-norm blocks, quick-GELU, class-token and end-of-text pooling), linear projections, a learned
temperature, the symmetric contrastive loss, AdamW (lr 1e-4, weight decay 0.1, not on the
temperature), the same batch size and the same synthetic batches (random pixels and token ids: the
speed of a step does not depend on what the pixels show).

- ours-jax, ours-tensorflow: kci's towers and fit: `kci.DualEncoder` over kci's CLIP towers
  (`CLIPVisionTower`, `CLIPTextTower`, built from `keras_clip_it.encoders.clip.clip_layers`: the same function
  as keras-hub's towers, laid out for fast training on CPU), `compile()` defaults, `model.fit` on a
  tf.data pipeline; on TensorFlow with `compile(jit_compile=True)`, as docs/training.md advises for
  transformer towers on CPU (Keras leaves XLA off on CPU-only machines).
- keras-hub-jax, keras-hub-tensorflow: `keras_hub.models.CLIPBackbone` (towers, poolers, projections,
  CLIPHead's temperature), trained by Keras' own `fit` with `kci.losses.ContrastiveLoss`;
  keras-hub-tensorflow-xla is the same with `jit_compile=True`, and ours-tensorflow is compared with the
  faster of the two.
- pytorch: the towers built with torch.nn as open_clip builds them (open_clip 3.3 does not import
  without torchvision, which has no build for this CPU torch), trained with open_clip's own `ClipLoss`
  (its loss.py imports alone), an eager loop as open_clip's `train_one_epoch`, and the logit-scale clamp.

Each side runs in its own process (its own backend, a clean peak-memory figure), pinned to `--cores`
cores (default 1: on a shared machine, thread pools larger than the free cores make spin-waiting
runtimes, PyTorch's OpenMP first, lose most of their time), with two warm-up steps, then
`--steps` timed steps from step 3 on (steady state). Throughput is reported as steps per CPU-second
(the CPU time of all the process's threads: what a step costs, whatever else the machine runs) and as
wall-clock steps/s. Recompilations are counted after the first step: XLA compilations on JAX
(jax.monitoring), traces of the train step on both Keras backends. The sides run in turn for `--rounds` rounds and each keeps its best round.

Every side runs with glibc's malloc told to keep freed memory for reuse (`--malloc reuse`, the default:
GLIBC_TUNABLES with one arena, no mmap for large blocks, no trimming, and the heap on transparent huge
pages; `--malloc default` leaves glibc as it is). XLA:CPU allocates each step's temporaries (about
130 MB here) as one block from a worker thread; glibc serves such a block with a fresh mmap and unmaps it
when freed, so every JAX step page-faulted ~31,000 pages back in (about 50 ms of kernel time a step).
With the block kept, 2 MB pages for the heap (`glibc.malloc.hugetlb=1`, where the kernel's transparent
huge pages are `madvise` or `always`; fewer address translations to walk it) measured 1.13-1.16x on JAX,
no change on PyTorch or TensorFlow. PyTorch's smaller per-operation allocations are reused by glibc either way.
docs/training.md gives the setting for training on CPU.

Benchmark-only dependencies (never the package's): `pip install torch==2.13.0` (the CPU wheel; a plain
`torch` pulls CUDA) and `pip install --no-deps open_clip_torch` (for its ClipLoss).

Usage:
    python benchmarks/train_step.py            # writes benchmarks/results/train_step.json and .md (--results-dir)
    python benchmarks/train_step.py --steps 50 --rounds 3 --cores 2
"""

import argparse
import json
import math
import os
import resource
import time

import numpy as np

import harness

SIZES = {
    "batch_size": 32,
    "image_size": 64,
    "patch_size": 8,
    "width": 128,
    "layers": 4,
    "heads": 4,
    "mlp_dim": 512,
    "vocabulary_size": 2048,
    "context_length": 24,
    "projection_dim": 128,
}
# Keep freed memory in the process: one arena, large blocks from the heap, no trimming.
MALLOC_REUSE = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
    ":glibc.malloc.hugetlb=1"
)
# The order of a round: each of ours runs next to the sides it is compared with.
SIDES = ["keras-hub-jax", "ours-jax", "pytorch", "ours-tensorflow", "keras-hub-tensorflow-xla", "keras-hub-tensorflow"]
DISTINCT_BATCHES = 4
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.1


def synthetic_batches(seed=0):
    """DISTINCT_BATCHES batches of uint8 images and end-of-text terminated token ids (0-padded)."""
    rng = np.random.RandomState(seed)
    count = SIZES["batch_size"] * DISTINCT_BATCHES
    size, length, vocabulary = SIZES["image_size"], SIZES["context_length"], SIZES["vocabulary_size"]
    images = rng.randint(0, 256, (count, size, size, 3)).astype(np.uint8)
    lengths = rng.randint(4, length + 1, count)
    token_ids = np.zeros((count, length), np.int32)
    padding_mask = np.zeros((count, length), bool)
    for row, used in enumerate(lengths):
        token_ids[row, : used - 1] = rng.randint(1, vocabulary - 1, used - 1)
        token_ids[row, used - 1] = vocabulary - 1  # end of text: the largest id, as CLIP's tokenizer
        padding_mask[row, :used] = True
    return images, token_ids, padding_mask


class Clock:
    """Wall time and the CPU time of every thread of this process, from creation to `rates`."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.usage = resource.getrusage(resource.RUSAGE_SELF)

    def rates(self, steps):
        cpu = time.process_time() - self.cpu
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "steps_per_second": steps / (time.perf_counter() - self.wall),
            "steps_per_cpu_second": steps / cpu,
            "page_faults_per_step": (usage.ru_minflt - self.usage.ru_minflt) / steps,
            "kernel_share_of_cpu": (usage.ru_stime - self.usage.ru_stime) / cpu,
        }


# === Keras sides ===


def towers(vision_class, text_class):
    """The CLIP towers of SIZES, built by keras-hub's classes or ours (they take the same arguments)."""
    vision = vision_class(
        patch_size=SIZES["patch_size"], hidden_dim=SIZES["width"], num_layers=SIZES["layers"],
        num_heads=SIZES["heads"], intermediate_dim=SIZES["mlp_dim"],
        image_shape=(SIZES["image_size"], SIZES["image_size"], 3),
    )
    text = text_class(
        vocabulary_size=SIZES["vocabulary_size"], embedding_dim=SIZES["width"], hidden_dim=SIZES["width"],
        num_layers=SIZES["layers"], num_heads=SIZES["heads"], intermediate_dim=SIZES["mlp_dim"],
        max_sequence_length=SIZES["context_length"],
    )
    return vision, text


def keras_towers():
    import keras_hub

    return towers(keras_hub.models.CLIPVisionEncoder, keras_hub.models.CLIPTextEncoder)


def kci_towers():
    from keras_clip_it.encoders.clip.clip_towers import CLIPTextTower
    from keras_clip_it.encoders.clip.clip_towers import CLIPVisionTower

    return towers(CLIPVisionTower, CLIPTextTower)


def build_ours(jit_compile):
    import keras_hub

    import keras_clip_it as kci
    from keras_clip_it.encoders.text_preprocessor import TextPreprocessor

    vision, text = kci_towers()
    image_encoder = kci.ImageEncoder(
        vision, image_size=SIZES["image_size"], mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), crop_pct=1.0,
        pooling="cls",
    )
    # The tokenizer is only used by encode_texts; the benchmark feeds token ids.
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    preprocessor = TextPreprocessor(tokenizer, SIZES["context_length"], end_token=3)
    text_encoder = kci.TextEncoder(text, preprocessor, pooling="last")
    model = kci.DualEncoder(image_encoder, text_encoder, projection_dim=SIZES["projection_dim"])
    model.compile(jit_compile=jit_compile)
    images, token_ids, padding_mask = synthetic_batches()
    inputs = {"images": images, "texts": {"token_ids": token_ids, "padding_mask": padding_mask.astype(np.int32)}}
    return model, inputs


def build_keras_hub(jit_compile):
    import keras
    import keras_hub
    from keras import ops

    import keras_clip_it as kci

    class CLIPBackboneTrainer(keras.Model):
        """keras-hub's CLIPBackbone under Keras' default train step, scored by kci's ContrastiveLoss."""

        def __init__(self, backbone, **kwargs):
            super().__init__(**kwargs)
            self.backbone = backbone
            self.clip_loss = kci.losses.ContrastiveLoss()

        def call(self, inputs, training=False):
            embeddings = {
                "image_embeddings": self.backbone.get_vision_embeddings(inputs["images"]),
                "text_embeddings": self.backbone.get_text_embeddings(inputs["token_ids"]),
            }
            # CLIPHead's normalisation, kept out of the head so the loss gets the embeddings.
            return {key: value / ops.norm(value, axis=-1, keepdims=True) for key, value in embeddings.items()}

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            scale = ops.exp(self.backbone.clip_head.logit_scale)
            return self.clip_loss({}, {**y_pred, "logit_scale": scale})

    vision, text = keras_towers()
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=SIZES["projection_dim"])
    model = CLIPBackboneTrainer(backbone)
    optimizer = keras.optimizers.AdamW(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    optimizer.exclude_from_weight_decay(var_names=["logit_scale"])
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    images, token_ids, _ = synthetic_batches()
    mean = np.asarray([0.48, 0.46, 0.41], np.float32)
    std = np.asarray([0.27, 0.26, 0.28], np.float32)
    # CLIPBackbone takes normalised float pixels: normalised once, outside the timed steps.
    pixels = ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    return model, {"images": pixels, "token_ids": token_ids}


def run_keras(side, steps):
    import keras
    import tensorflow as tf

    from keras_clip_it.data.pairs import with_fit_options

    counts = {"traces": 0, "compiles": 0}
    if keras.backend.backend() == "jax":
        import jax

        def on_event(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                counts["compiles"] += 1

        jax.monitoring.register_event_duration_secs_listener(on_event)
    keras.utils.set_random_seed(0)
    # "auto" is Keras' default: XLA on JAX, off on TensorFlow on CPU-only machines.
    jit_compile = True if side in ("ours-tensorflow", "keras-hub-tensorflow-xla") else "auto"
    model, inputs = build_ours(jit_compile) if side.startswith("ours") else build_keras_hub(jit_compile)
    original_train_step = model.train_step

    def counting_train_step(*args):
        counts["traces"] += 1  # Python runs only when the step is traced
        return original_train_step(*args)

    model.train_step = counting_train_step
    data = tf.data.Dataset.from_tensor_slices(inputs).batch(SIZES["batch_size"], drop_remainder=True).repeat()
    # What DualEncoder.fit does for ours: without it, TensorFlow's fit can wait at its end for tf.data's
    # autotuning thread (docs/training.md, TensorFlow on CPU), which the keras-hub sides would pay alone.
    data = with_fit_options(data)
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    first_step = time.perf_counter() - start
    after_first = dict(counts)
    # Step 2 on its own, so that a retrace there (keras-hub's CLIPHead) is counted but not timed.
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    clock = Clock()
    history = model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0).history
    return {
        **clock.rates(steps),
        "first_step_seconds": first_step,
        "retraces_after_step_1": counts["traces"] - after_first["traces"],
        "xla_compiles_after_step_1": (
            counts["compiles"] - after_first["compiles"] if keras.backend.backend() == "jax" else None
        ),
        "jit_compile": bool(model.jit_compile),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "final_loss": float(history["loss"][-1]),
    }


# === PyTorch side ===


def build_torch():
    import importlib.util

    import torch
    from torch import nn

    class QuickGELU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    class ResidualAttentionBlock(nn.Module):
        """open_clip.transformer.ResidualAttentionBlock: pre-norm attention and MLP with residuals."""

        def __init__(self, width, heads, mlp_dim):
            super().__init__()
            self.ln_1 = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), QuickGELU(), nn.Linear(mlp_dim, width))

        def forward(self, x, attn_mask=None):
            y = self.ln_1(x)
            x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
            return x + self.mlp(self.ln_2(x))

    def blocks():
        return nn.ModuleList(
            ResidualAttentionBlock(SIZES["width"], SIZES["heads"], SIZES["mlp_dim"]) for _ in range(SIZES["layers"])
        )

    class VisionTransformer(nn.Module):
        """open_clip.transformer.VisionTransformer: patches, class token, ln_pre, blocks, ln_post, proj."""

        def __init__(self):
            super().__init__()
            width, patch = SIZES["width"], SIZES["patch_size"]
            scale = width ** -0.5
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
            self.class_embedding = nn.Parameter(scale * torch.randn(width))
            tokens = (SIZES["image_size"] // patch) ** 2 + 1
            self.positional_embedding = nn.Parameter(scale * torch.randn(tokens, width))
            self.ln_pre = nn.LayerNorm(width)
            self.transformer = blocks()
            self.ln_post = nn.LayerNorm(width)
            self.proj = nn.Parameter(scale * torch.randn(width, SIZES["projection_dim"]))

        def forward(self, x):
            x = self.conv1(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
            x = self.ln_pre(x)
            for block in self.transformer:
                x = block(x)
            return self.ln_post(x[:, 0]) @ self.proj

    class TextTransformer(nn.Module):
        """open_clip.transformer.TextTransformer: causal blocks, ln_final, end-of-text (argmax) pooling."""

        def __init__(self):
            super().__init__()
            width, length = SIZES["width"], SIZES["context_length"]
            self.token_embedding = nn.Embedding(SIZES["vocabulary_size"], width)
            self.positional_embedding = nn.Parameter(0.01 * torch.randn(length, width))
            self.transformer = blocks()
            self.ln_final = nn.LayerNorm(width)
            self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, SIZES["projection_dim"]))
            self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)

        def forward(self, text):
            x = self.token_embedding(text) + self.positional_embedding
            for block in self.transformer:
                x = block(x, attn_mask=self.attn_mask)
            x = self.ln_final(x)
            return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    class CLIP(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = VisionTransformer()
            self.text = TextTransformer()
            self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

        def forward(self, image, text):
            image_features = nn.functional.normalize(self.visual(image), dim=-1)
            text_features = nn.functional.normalize(self.text(text), dim=-1)
            return image_features, text_features, self.logit_scale.exp()

    # open_clip's loss.py imports only torch, so its ClipLoss loads without the package's __init__.
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("the pytorch side needs open_clip's loss: pip install --no-deps open_clip_torch "
                         "(and torch==2.13.0); or leave it out with --sides")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    loader = importlib.util.spec_from_file_location("open_clip_loss", path)
    open_clip_loss = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(open_clip_loss)
    return CLIP(), open_clip_loss.ClipLoss()


def run_torch(steps):
    import torch

    torch.manual_seed(0)
    model, clip_loss = build_torch()
    decay = [p for name, p in model.named_parameters() if name != "logit_scale"]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": [model.logit_scale], "weight_decay": 0.0}],
        lr=LEARNING_RATE, eps=1e-7,  # Keras' AdamW epsilon
    )
    images, token_ids, _ = synthetic_batches()
    mean = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    texts = torch.from_numpy(token_ids.astype(np.int64))
    size = SIZES["batch_size"]
    batches = [(pixels[i:i + size], texts[i:i + size]) for i in range(0, len(texts), size)]

    def step(index):
        image, text = batches[index % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = clip_loss(*model(image, text))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    start = time.perf_counter()
    step(0)
    first_step = time.perf_counter() - start
    step(1)
    clock = Clock()
    for index in range(steps):
        loss = step(index + 2)
    return {
        **clock.rates(steps),
        "first_step_seconds": first_step,
        "retraces_after_step_1": None,  # eager: nothing is compiled
        "xla_compiles_after_step_1": None,
        "jit_compile": False,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "final_loss": float(loss),
        "threads": torch.get_num_threads(),
    }


# === Driver ===


def run_side(side, steps, cores):
    # Pinned before any framework starts its thread pools, which size themselves from the affinity mask.
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    result = run_torch(steps) if side == "pytorch" else run_keras(side, steps)
    result["peak_memory_mb"] = harness.peak_rss_mb()
    harness.report(result)


def spawn(side, steps, cores, malloc):
    environment = {"GLIBC_TUNABLES": MALLOC_REUSE} if malloc == "reuse" else {}
    backend = "tensorflow" if "tensorflow" in side else "jax"
    return harness.run_child(__file__, ["--side", side, "--steps", steps, "--cores", cores], backend, environment)


METRICS = ("steps_per_cpu_second", "steps_per_second")
COMPARISONS = [
    ("ours-jax", "pytorch"), ("ours-jax", "keras-hub-jax"),
    ("ours-tensorflow", "pytorch"), ("ours-tensorflow", "keras-hub-tensorflow"),
    ("ours-tensorflow", "keras-hub-tensorflow-xla"),
]


def report(results, runs, steps, rounds, cores, malloc):
    ratios = {
        metric: {f"{side} / {reference}": results[side][metric] / results[reference][metric]
                 for side, reference in COMPARISONS}
        for metric in METRICS
    }
    # The same ratio within each round (the two sides ran minutes apart, not an hour): on a host whose
    # speed drifts, the median of these is steadier than best against best.
    round_ratios = {
        f"{side} / {reference}": [mine["steps_per_cpu_second"] / theirs["steps_per_cpu_second"]
                                  for mine, theirs in zip(runs[side], runs[reference])]
        for side, reference in COMPARISONS
    }
    # A target counts as met when both the best-against-best ratio and the median round's ratio meet it.
    main = {
        f"{side} / {reference}": min(ratios["steps_per_cpu_second"][f"{side} / {reference}"], harness.median_ratio(
            [run["steps_per_cpu_second"] for run in runs[side]], [run["steps_per_cpu_second"] for run in runs[reference]]
        ))
        for side, reference in COMPARISONS
    }
    targets = {
        "ours-jax >= 1.2x pytorch and keras-hub-jax": min(main["ours-jax / pytorch"],
                                                          main["ours-jax / keras-hub-jax"]) >= 1.2,
        "ours-tensorflow >= 1.0x pytorch and keras-hub-tensorflow (its faster setting)": min(
            main["ours-tensorflow / pytorch"], main["ours-tensorflow / keras-hub-tensorflow"],
            main["ours-tensorflow / keras-hub-tensorflow-xla"]) >= 1.0,
        "ours: zero recompilations after step 1": all(
            not results[side]["retraces_after_step_1"] and not results[side]["xla_compiles_after_step_1"]
            for side in ("ours-jax", "ours-tensorflow")
        ),
    }
    return {
        "sizes": SIZES,
        "timed_steps": steps,
        "rounds": rounds,
        "cores_per_side": cores,
        "malloc": f"GLIBC_TUNABLES={MALLOC_REUSE}" if malloc == "reuse" else "glibc defaults",
        "cpu_count": os.cpu_count(),
        "cpu": harness.cpu_model(),
        "load_average_at_end": os.getloadavg(),
        "pytorch_side": "towers built with torch.nn as open_clip builds them; open_clip's own ClipLoss",
        "results": results,
        "all_rounds": runs,
        "ratios": ratios,
        "round_ratios (steps per CPU-second)": round_ratios,
        "targets_met (on steps per CPU-second)": targets,
    }


def markdown(summary):
    lines = [
        "# Training step: DualEncoder.fit against keras-hub and PyTorch",
        "",
        "Written by `python benchmarks/train_step.py`. Same CLIP on every side: "
        + ", ".join(f"{key}={value}" for key, value in summary["sizes"].items())
        + f"; AdamW; {summary['timed_steps']} timed steps after two warm-up steps, best of "
        f"{summary['rounds']} round(s), each side in its own process pinned to {summary['cores_per_side']} of the "
        f"machine's {summary['cpu_count']} CPU cores, {summary['cpu']} (load average at the end "
        f"{summary['load_average_at_end'][0]:.1f}). PyTorch side: {summary['pytorch_side']}. "
        f"Every side's malloc: {summary['malloc']}.",
        "",
        "Steps per CPU-second divides the steps by the CPU time of the side's process (all its threads): on a "
        "shared machine it measures the work a step costs, while wall-clock steps/s also measures what the "
        "other processes left over.",
        "",
        "| side | steps per CPU-second | wall steps/s | first step (s) | retraces after step 1 "
        "| XLA compiles after step 1 | jit_compile | peak memory (MB) | page faults a step | kernel share of CPU "
        "| parameters | every round (steps per CPU-second) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, result in summary["results"].items():
        lines.append(
            f"| {side} | {result['steps_per_cpu_second']:.3f} | {result['steps_per_second']:.3f} | "
            f"{result['first_step_seconds']:.1f} | {_cell(result['retraces_after_step_1'], 'n/a (eager)')} | "
            f"{_cell(result['xla_compiles_after_step_1'], 'n/a (JAX only)')} | {result['jit_compile']} | "
            f"{result['peak_memory_mb']:.0f} | {result['page_faults_per_step']:.0f} | "
            f"{100 * result['kernel_share_of_cpu']:.1f}% | {result['parameters']:,} | "
            + ", ".join(f"{run['steps_per_cpu_second']:.2f}" for run in summary["all_rounds"][side]) + " |"
        )
    lines += ["", "| ratio | per CPU-second, best against best | wall clock | per CPU-second, each round (median) |",
              "|---|---|---|---|"]
    for name, value in summary["ratios"]["steps_per_cpu_second"].items():
        each = summary["round_ratios (steps per CPU-second)"][name]
        rounds = ", ".join(f"{ratio:.2f}x" for ratio in each) + (f" ({float(np.median(each)):.2f}x)" if each else "")
        lines.append(f"| {name} | {value:.2f}x | {summary['ratios']['steps_per_second'][name]:.2f}x | {rounds} |")
    targets = summary["targets_met (on steps per CPU-second)"]
    lines += ["", "| target (steps per CPU-second; best against best and the median round) | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if met else 'no'} |" for name, met in targets.items()]
    return "\n".join(lines) + "\n"


def _cell(value, missing):
    return missing if value is None else str(value)


def main():
    parser = harness.parser(__doc__, rounds=1, rounds_help="every side once per round, in turn, keeping its best")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cores", type=int, default=1, help="CPU cores each side may use (pinned)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                        help="glibc malloc settings of every side (see the module docstring)")
    parser.add_argument("--output", default="train_step", help="results name: OUTPUT.json and .md in --results-dir")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # set in the per-side process
    args = parser.parse_args()
    if args.side:
        return run_side(args.side, args.steps, args.cores)
    sides = args.sides.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown sides {unknown}: choose among {SIDES}")

    runs = {side: (lambda side=side: spawn(side, args.steps, args.cores, args.malloc)) for side in sides}
    measured = harness.rounds(runs, args.rounds, show=lambda result: result)
    best = {side: harness.best_round(results, "steps_per_cpu_second") for side, results in measured.items()}
    if set(sides) != set(SIDES):
        print(json.dumps(best, indent=1))
        return
    runs = {side: [{metric: round(result[metric], 4) for metric in METRICS} for result in results]
            for side, results in measured.items()}
    summary = report(best, runs, args.steps, args.rounds, args.cores, args.malloc)
    harness.write_results(args.results_dir, args.output, summary, markdown(summary))


if __name__ == "__main__":
    main()
