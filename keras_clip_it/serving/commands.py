"""`keras-clip-it serve`: the HTTP server (FastAPI + uvicorn) around an ASIF or a DualEncoder.

Without --model it serves the offline default ASIF: EfficientNet-Lite0 for images and
multilingual-e5-small (--lang it) or all-MiniLM-L6-v2 (--lang en) for text, over the emoji collection
of that language. A registered collection is embedded once per pair of encoders and kept under the
cache folder, so later starts load its embeddings instead of recomputing them.

The server runs on the backend that served the most requests per second when the backends ran side by
side (docs/serving.md; benchmarks/results/serve.md at revision 2b05b51); --backend picks another. Keras
fixes its backend when first imported, so `serve` restarts itself with KERAS_BACKEND set when the running
one differs. NumPy's BLAS runs on one thread: the server's parallelism is across requests, and BLAS
threads spinning against the encoder's threads made the ASIF search 2x slower on 2 cores
(benchmarks/results/serve_blas.md).
"""

import os
import sys

TEXT_PRESETS = {"it": "multilingual_e5_small", "en": "all_minilm_l6_v2"}
BACKENDS = ("tensorflow", "jax")
# The backend with the highest throughput at 1, 8 and 32 clients (docs/serving.md).
DEFAULT_BACKEND = "jax"


def register(subparsers):
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (embed, classify, retrieve, live collection swaps)",
        description="Serve an ASIF (default: EfficientNet-Lite0 + a text preset over the emoji collection) or a "
        "saved .keras model over HTTP. Endpoints and limits: docs/serving.md; schema at /docs.",
    )
    parser.add_argument("--model", help="a saved .keras model (ASIF or DualEncoder) instead of the default ASIF")
    parser.add_argument("--lang", choices=sorted(TEXT_PRESETS), default="it", help="text encoder of the default ASIF")
    parser.add_argument(
        "--collection",
        action="append",
        metavar="NAME_OR_URI",
        help="a collection name or fsspec URI; the first is active, later ones can be activated by clients "
        "(default for the default ASIF: emoji-LANG)",
    )
    parser.add_argument("--k", type=int, default=None, help="anchors per ASIF representation (default ASIF: 800)")
    parser.add_argument("--p", type=float, default=None, help="ASIF exponent (default ASIF: 8)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allow-uris", action="store_true", help="let clients activate collections by URI or path")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, in MiB")
    parser.add_argument("--max-batch", type=int, default=64, help="images, texts or embeddings per request")
    parser.add_argument("--max-image-pixels", type=int, default=16_000_000, help="largest width x height of an image")
    parser.add_argument(
        "--encoder-batch", type=int, default=4, help="most images one encoder call gathers from concurrent requests"
    )
    parser.add_argument(
        "--encoder-workers",
        type=int,
        default=None,
        help="encoder calls that may run at once (default: 2 on JAX, whose predictions run side by side, else 1)",
    )
    parser.add_argument("--warm-up", action="store_true", help="compile every image batch size before serving")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help=f"Keras backend of the encoders (default: {DEFAULT_BACKEND}, the fastest in docs/serving.md)",
    )
    parser.set_defaults(func=run)


def build_model(args):
    """The model `serve` runs: a loaded .keras file, or the default ASIF, with its collections embedded.

    Returns:
        (model, extra collections to register).
    """
    import keras_clip_it as kci

    kinds = (kci.ASIF, kci.DualEncoder)
    names = list(args.collection or [])
    if args.model:
        from keras_clip_it.models.saved import load_saved

        model = load_saved(args.model, kinds=kinds)  # SavedModelError names the file and what to do
        if isinstance(model, kci.DualEncoder) and names:
            raise ValueError("a DualEncoder has no analogy collection: drop --collection")
        if isinstance(model, kci.ASIF) and args.k is not None:
            model.k = args.k  # validated, and published as part of the model's state
        if isinstance(model, kci.ASIF) and args.p is not None:
            model.p = args.p
    else:
        image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
        text_encoder = kci.TextEncoder.from_preset(TEXT_PRESETS[args.lang])
        model = kci.ASIF(image_encoder, text_encoder, k=args.k or 800, p=args.p or 8.0)
        names = names or [f"emoji-{args.lang}"]
    if not isinstance(model, kci.ASIF):
        return model, []
    collections = [kci.collections.embedded_collection(name, model.image_encoder, model.text_encoder) for name in names]
    if collections:
        model.use(collections[0])
    return model, collections[1:]


def use_backend(backend):
    """Makes sure Keras runs on `backend`, restarting this command with KERAS_BACKEND set if it does not.

    Keras picks its backend once, when first imported (the CLI imports it before parsing), so switching
    means starting again. Only a command started from a shell (`keras-clip-it serve ...` or
    `python -m keras_clip_it.cli serve ...`) can be restarted; otherwise a ValueError says what to set.
    """
    import keras

    if keras.backend.backend() == backend:
        return
    if "serve" not in sys.argv[1:]:
        raise ValueError(
            f"Keras already runs on {keras.backend.backend()}: set KERAS_BACKEND={backend} before importing "
            f"keras, or pass --backend {keras.backend.backend()}"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "keras_clip_it.cli", *sys.argv[1:]]
    os.execve(sys.executable, command, dict(os.environ, KERAS_BACKEND=backend))


def run(args):
    try:
        use_backend(args.backend)
    except ValueError as error:
        print(f"keras-clip-it serve: error: {error}", file=sys.stderr)
        return 1
    import uvicorn
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    from keras_clip_it.serving.app import create_app
    from keras_clip_it.serving.schemas import Limits

    try:
        model, collections = build_model(args)
    except (ValueError, LookupError, OSError) as error:
        print(f"keras-clip-it serve: error: {error}", file=sys.stderr)
        return 1
    limits = Limits(body_bytes=int(args.max_body_mb * 2**20), batch=args.max_batch, image_pixels=args.max_image_pixels)
    app = create_app(
        model,
        collections=collections,
        limits=limits,
        allow_uris=args.allow_uris,
        encoder_batch=args.encoder_batch,
        encoder_workers=args.encoder_workers or (2 if args.backend == "jax" else 1),
        warm_up=args.warm_up,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
