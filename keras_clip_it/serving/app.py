"""The HTTP application: routes, error handlers and the body guard in front of the `Service`.

`create_app(model)` returns a FastAPI application; `keras-clip-it serve` runs it with uvicorn. The
application keeps only HTTP: it parses and bounds requests (`schemas`), turns every refusal into one JSON
error shape (`errors`) and hands each request to the `Service`, which answers from the model's published
state.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keras_clip_it.serving.errors import ApiError
from keras_clip_it.serving.errors import ErrorBody
from keras_clip_it.serving.errors import error_response
from keras_clip_it.serving.schemas import Limits
from keras_clip_it.serving.schemas import schemas
from keras_clip_it.serving.service import Service


class BodyGuard:
    """ASGI middleware: refuses bodies over the limit (413) and non-JSON bodies (415) before parsing."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_large = error_response(
            413, "body_too_large", f"the request body is larger than {self.max_bytes:,} bytes: send less per request"
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and not (content_type == b"application/json" or content_type.endswith(b"+json")):
            shown = content_type.decode("latin-1") or "none"
            error = error_response(
                415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), got {shown}"
            )
            return await error(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(
    model, collections=(), limits=None, allow_uris=False, encoder_batch=4, encoder_workers=1, warm_up=False
):
    """A FastAPI application serving `model` over HTTP: /v1/embed, /v1/classify, /v1/retrieve, /v1/collections.

    Every answer names the collection version it was computed on; collection changes (activate, add,
    remove) are published atomically, so concurrent requests each see one consistent collection. Bad
    requests get a 4xx JSON error `{"error", "type", "details"}`; OpenAPI schema at /openapi.json, docs at
    /docs. Run it with uvicorn (`keras-clip-it serve` does).

    Args:
        model: a `kci.ASIF` (with or without a collection) or a `kci.DualEncoder`.
        collections: optional iterable of `AnalogyCollection`s or collection names (ASIF only) that clients
            may activate by name, besides the model's own collection and the installed plugins' ones.
        limits: a `Limits` (defaults: 16 MiB bodies, 16M-pixel images, 64 items per request...).
        allow_uris: bool; when True, clients may activate collections stored at URIs or paths on the
            server's file systems (keep it off for servers reachable by untrusted clients).
        encoder_batch: int, most images (or texts) one encoder call gathers from concurrent requests;
            1 turns micro-batching off. A batch costs less per image than single images
            (benchmarks/results/serve_stages.md), but batch 8 left 8 clients no faster than 4
            (docs/serving.md).
        encoder_workers: int, encoder calls that may run at once (each a batch).
        warm_up: bool; compile the image tower for every batch size before serving (slower start, no
            compilation pauses later).

    Returns:
        A `fastapi.FastAPI` application; its `state.service` is the `Service`.

    Example:
    >>> import uvicorn, keras_clip_it as kci
    >>> asif = kci.ASIF(kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet"),
    ...                 kci.TextEncoder.from_preset("multilingual_e5_small"), collection="emoji-it")
    >>> app = kci.serving.create_app(asif)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or Limits()
    service = Service(
        model,
        collections=collections,
        limits=limits,
        allow_uris=allow_uris,
        encoder_batch=encoder_batch,
        encoder_workers=encoder_workers,
    )
    if warm_up:
        service.warm_up()
    s = schemas(limits)
    errors = {status: {"model": ErrorBody} for status in (400, 403, 404, 409, 413, 415, 422)}

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.stop()

    app = FastAPI(
        title="keras-clip-it",
        description="Image-text embedding, zero-shot classification and retrieval with ASIF or a dual encoder.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyGuard, max_bytes=limits.body_bytes)

    @app.exception_handler(ApiError)
    async def _apierror_response(request, error):
        return error_response(error.status, error.kind, error.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error):
        details = [
            {
                "loc": [str(part) for part in item.get("loc", ())],
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "")),
            }
            for item in error.errors()[:20]
        ]
        where = "; ".join(f"{'.'.join(d['loc'][1:]) or 'body'}: {d['msg']}" for d in details[:3])
        return error_response(422, "invalid_request", f"the request does not match the schema ({where}); see /docs", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, error):
        if error.status_code == 400:  # FastAPI could not parse the body (invalid UTF-8, nesting too deep)
            return error_response(400, "invalid_json", f"{error.detail}: send UTF-8 JSON of reasonable depth")
        return error_response(error.status_code, "http_error", str(error.detail))

    @app.get("/health", response_model=s["Health"], tags=["service"])
    def health():
        """Liveness, the model type and the active collection."""
        return service.health()

    @app.post("/v1/embed", response_model=s["EmbedResponse"], responses=errors, tags=["inference"])
    def embed(request: s["EmbedRequest"]):
        """Unit-norm embeddings of images or texts by the model's encoders (reusable as precomputed embeddings)."""
        return service.embed(images=request.images, texts=request.texts)

    @app.post("/v1/classify", response_model=s["ClassifyResponse"], responses=errors, tags=["inference"])
    def classify(request: s["ClassifyRequest"]):
        """Zero-shot classification of images among labels ('unknown' when an ASIF is unsure)."""
        return service.classify(request.labels, request.templates, request.images, request.image_embeddings)

    @app.post("/v1/retrieve", response_model=s["RetrieveResponse"], responses=errors, tags=["inference"])
    def retrieve(request: s["RetrieveRequest"]):
        """For each query, the indices and scores of the `top_k` most similar gallery items."""
        return service.retrieve(request.queries, request.gallery, request.top_k)

    @app.get("/v1/collections", response_model=s["CollectionsResponse"], tags=["collections"])
    def list_collections():
        """The active collection, the collections loaded on this server and those installed plugins offer."""
        return service.collections()

    @app.post("/v1/collections/activate", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def activate(request: s["ActivateRequest"]):
        """Makes a collection the active one (loading and embedding it on first use)."""
        return service.activate(request.name)

    @app.post("/v1/collections/pairs", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def add_pairs(request: s["AddRequest"]):
        """Adds pairs to the active collection (a new one named 'default' if none is active)."""
        return service.add(
            request.ids, request.captions, request.images, request.image_embeddings, request.text_embeddings
        )

    @app.post("/v1/collections/remove", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def remove_pairs(request: s["RemoveRequest"]):
        """Removes pairs by id from the active collection."""
        return service.remove(request.ids)

    return app
