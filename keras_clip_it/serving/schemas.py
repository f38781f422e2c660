"""The server's request and response models, with its limits written into them (and so into /openapi.json)."""

import dataclasses
from typing import Annotated
from typing import Literal
from typing import Optional
from typing import Union

from pydantic import AfterValidator
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import StringConstraints
from pydantic import model_validator


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; anything beyond is refused with a 4xx.

    Args:
        body_bytes: largest request body (413 beyond).
        image_pixels: largest width x height of one image, read from its header before decoding (413).
        batch: images, texts or embeddings per request (queries and gallery each).
        pairs: pairs per add or remove request.
        labels: labels per classify request.
        templates: templates per classify request.
        captions: labels x templates per classify request (each is a text to embed).
        text_chars: characters of one text, caption, label, template, id or collection name.
        embedding_dim: largest length of one embedding in the schema (the model's own is enforced too).
    """

    body_bytes: int = 16 * 2**20
    image_pixels: int = 16_000_000
    batch: int = 64
    pairs: int = 1024
    labels: int = 512
    templates: int = 100
    captions: int = 4096
    text_chars: int = 2000
    embedding_dim: int = 4096


def schemas(limits):
    """The request and response models, with the limits written into the OpenAPI schema."""
    Text = Annotated[str, StringConstraints(max_length=limits.text_chars), AfterValidator(_utf8)]
    Name = Annotated[str, StringConstraints(min_length=1, max_length=limits.text_chars), AfterValidator(_utf8)]
    Image64 = Annotated[
        str,
        StringConstraints(min_length=1, max_length=limits.body_bytes),
        Field(description="an image file (JPEG, PNG, GIF, BMP, WebP) base64-encoded, optionally as a data: URL"),
    ]
    Value = Annotated[float, Field(allow_inf_nan=False)]
    Vector = Annotated[list[Value], Field(min_length=1, max_length=limits.embedding_dim)]

    def items(kind, length):
        return Optional[Annotated[list[kind], Field(min_length=1, max_length=length)]]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Inputs(Strict):
        """Exactly one of: images, texts, image_embeddings, text_embeddings."""

        images: items(Image64, limits.batch) = None
        texts: items(Text, limits.batch) = None
        image_embeddings: items(Vector, limits.batch) = None
        text_embeddings: items(Vector, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            given = [
                f for f in ("images", "texts", "image_embeddings", "text_embeddings") if getattr(self, f) is not None
            ]
            if len(given) != 1:
                raise ValueError(f"give exactly one of images, texts, image_embeddings, text_embeddings (got {given})")
            return self

    class EmbedRequest(Strict):
        """Images or texts to embed with the model's encoders."""

        images: items(Image64, limits.batch) = None
        texts: items(Text, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.texts is None):
                raise ValueError("give exactly one of images or texts")
            return self

    class ClassifyRequest(Strict):
        """Images (or their embeddings) to classify among labels, captioned through templates."""

        labels: Annotated[list[Name], Field(min_length=1, max_length=limits.labels)]
        templates: Optional[Union[Text, Annotated[list[Text], Field(min_length=1, max_length=limits.templates)]]] = (
            Field(
                None,
                description="None (labels as captions), a set ('en', 'en-short', 'it', 'it-short'), a template with "
                "'{}', or a list of templates",
            )
        )
        images: items(Image64, limits.batch) = None
        image_embeddings: items(Vector, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.image_embeddings is None):
                raise ValueError("give exactly one of images or image_embeddings")
            return self

    class RetrieveRequest(Strict):
        """For each query, the most similar gallery items (any modality on either side)."""

        queries: Inputs
        gallery: Inputs
        top_k: Annotated[int, Field(ge=1, le=limits.batch)] = 10

    class ActivateRequest(Strict):
        """A registered or installed collection name (or a URI when the server allows them)."""

        name: Name

    class AddRequest(Strict):
        """Pairs to add to the active collection: ids, captions, and images or image embeddings."""

        ids: Annotated[list[Name], Field(min_length=1, max_length=limits.pairs)]
        captions: Annotated[list[Text], Field(min_length=1, max_length=limits.pairs)]
        images: items(Image64, limits.batch) = None
        image_embeddings: items(Vector, limits.pairs) = None
        text_embeddings: items(Vector, limits.pairs) = Field(None, description="the captions' embeddings, if known")

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.image_embeddings is None):
                raise ValueError("give exactly one of images or image_embeddings")
            return self

    class RemoveRequest(Strict):
        """Ids of pairs to remove from the active collection."""

        ids: Annotated[list[Name], Field(min_length=1, max_length=limits.pairs)]

    class CollectionInfo(BaseModel):
        """The collection an answer was computed on (all None/0 for a DualEncoder)."""

        name: Optional[str]
        version: Optional[int]
        pairs: int

    class Health(BaseModel):
        status: Literal["ok"]
        model: str
        collection: CollectionInfo

    class EmbedResponse(BaseModel):
        kind: Literal["image", "text"]
        dim: int
        embeddings: list[list[float]]
        collection: CollectionInfo

    class Prediction(BaseModel):
        label: str = Field(description="the best label, or 'unknown' when the evidence is too weak")
        index: int = Field(description="index of the label, -1 for 'unknown'")
        scores: list[float] = Field(description="score of each label, aligned with labels")

    class ClassifyResponse(BaseModel):
        labels: list[str]
        predictions: list[Prediction]
        collection: CollectionInfo

    class Match(BaseModel):
        index: int
        score: float

    class RetrieveResponse(BaseModel):
        matches: list[list[Match]]
        collection: CollectionInfo

    class Registered(BaseModel):
        name: str
        language: str
        pairs: int

    class CollectionsResponse(BaseModel):
        active: CollectionInfo
        registered: list[Registered]
        available: list[str]
        uris_allowed: bool

    class ChangeResponse(BaseModel):
        collection: CollectionInfo

    return dict(locals())


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string holds unpaired surrogates (\\ud800-\\udfff), which are not text") from None
    return text
