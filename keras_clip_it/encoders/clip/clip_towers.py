"""CLIP's towers, built from `clip_layers`, with every size, activation and epsilon given by the config.

keras-hub ships CLIP towers, but they fix the layer-norm epsilon and train slowly on CPU (see
`clip_layers`). `CLIPVisionTower` and `CLIPTextTower` compute the same function with kci's layers and take
every setting from the checkpoint's config rather than assuming it.
"""

import keras
from keras import ops
from keras_hub.models import Backbone

from keras_clip_it.encoders.clip.clip_layers import CLIPBlock
from keras_clip_it.encoders.clip.clip_layers import CLIPPatchEmbedding


def _blocks_at(blocks, x, positions, training):
    """Runs `blocks` on the token sequence `x`, the last one only at `positions`: (batch, hidden_dim)."""
    for block in blocks[:-1]:
        x = block(x, training=training)
    if blocks:
        return blocks[-1].call_at(x, positions)
    rows = ops.arange(ops.shape(x)[0], dtype="int32") * ops.shape(x)[1] + ops.cast(positions, "int32")
    return ops.take(ops.reshape(x, (-1, ops.shape(x)[-1])), rows, axis=0)


@keras.saving.register_keras_serializable(package="keras_clip_it")
class CLIPVisionTower(Backbone):
    """CLIP's vision transformer: patches and class token, a pre-norm, blocks and a final norm.

    The function of keras-hub's `CLIPVisionEncoder` (and of Hugging Face's `CLIPVisionModel` before
    pooling), built from `clip_layers` so that training runs as plain matrix products on CPU (see
    `clip_layers`), with the checkpoint's layer-norm epsilon. Returns the token
    sequence (B, 1 + patches, hidden_dim); `ImageEncoder(pooling="cls")` takes the class token.

    Args:
        patch_size: side of a square patch in pixels.
        hidden_dim: width of the tokens.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        intermediate_dim: width of the MLPs.
        intermediate_activation: "quick_gelu" (OpenAI CLIP), "gelu" or "relu".
        image_shape: (size, size, 3) of the normalised input images.
        layer_norm_epsilon: epsilon of every layer norm (Hugging Face's `layer_norm_eps`).
        dtype: dtype policy of the layers.

    Example:
    >>> tower = CLIPVisionTower(8, 16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3))
    >>> tower(np.zeros((1, 32, 32, 3), "float32")).shape
    (1, 17, 16)
    """

    def __init__(
        self,
        patch_size,
        hidden_dim,
        num_layers,
        num_heads,
        intermediate_dim,
        intermediate_activation="quick_gelu",
        image_shape=(224, 224, 3),
        layer_norm_epsilon=1e-5,
        dtype=None,
        **kwargs,
    ):
        if image_shape[0] != image_shape[1]:
            raise ValueError(f"CLIPVisionTower takes square images, got image_shape={tuple(image_shape)}")
        epsilon = float(layer_norm_epsilon)

        # === Layers ===
        self.embedding = CLIPPatchEmbedding(hidden_dim, patch_size, image_shape[0], dtype=dtype, name="embedding")
        self.pre_layer_norm = keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="pre_layer_norm")
        self.encoder_layers = [
            CLIPBlock(hidden_dim, num_heads, intermediate_dim, intermediate_activation,
                      layer_norm_epsilon=epsilon, dtype=dtype, name=f"encoder_block_{index}")
            for index in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="layer_norm")

        # === Functional Model ===
        images = keras.Input(shape=tuple(image_shape), name="images")
        x = self.pre_layer_norm(self.embedding(images))
        for block in self.encoder_layers:
            x = block(x)
        super().__init__(inputs={"images": images}, outputs=self.layer_norm(x), dtype=dtype, **kwargs)

        # === Config ===
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.intermediate_dim = int(intermediate_dim)
        self.intermediate_activation = intermediate_activation
        self.image_shape = tuple(image_shape)
        self.layer_norm_epsilon = epsilon

    def call_at(self, images, positions, training=False):
        """The final features at one token of each image: (batch, hidden_dim).

        Equal to `self(images)[arange(batch), positions]`; the last block computes only those tokens
        (`CLIPBlock.call_at`). `ImageEncoder(pooling="cls")` calls it with zeros.

        Example:
        >>> tower = CLIPVisionTower(8, 16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3))
        >>> tower.call_at(np.zeros((1, 32, 32, 3), "float32"), np.zeros((1,), "int32")).shape
        (1, 16)
        """
        if isinstance(images, dict):
            images = images["images"]
        x = self.pre_layer_norm(self.embedding(images))
        return self.layer_norm(_blocks_at(self.encoder_layers, x, positions, training))

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "intermediate_activation": self.intermediate_activation,
            "image_shape": self.image_shape,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_clip_it")
class CLIPTextTower(Backbone):
    """CLIP's causal text transformer: token and position embeddings, blocks and a final norm.

    The function of keras-hub's `CLIPTextEncoder` (and of Hugging Face's `CLIPTextModel` before
    pooling), built from `clip_layers` for fast training on CPU, with the checkpoint's layer-norm
    epsilon (keras-hub hard-codes 1e-6 for the final norm where CLIP uses 1e-5, visible at 1e-4).
    Returns the token sequence (B, T, hidden_dim); `TextEncoder(pooling="last")` takes the end of text.

    Args:
        vocabulary_size: number of token ids.
        embedding_dim: width of the token embeddings (CLIP: equal to `hidden_dim`).
        hidden_dim: width of the tokens in the blocks.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        intermediate_dim: width of the MLPs.
        intermediate_activation: "quick_gelu" (OpenAI CLIP), "gelu" or "relu".
        max_sequence_length: the longest token sequence (number of position embeddings).
        layer_norm_epsilon: epsilon of every layer norm (Hugging Face's `layer_norm_eps`).
        dtype: dtype policy of the layers.

    Example:
    >>> tower = CLIPTextTower(100, 16, 16, num_layers=2, num_heads=2, intermediate_dim=32, max_sequence_length=8)
    >>> tower({"token_ids": np.ones((1, 8), "int32")}).shape
    (1, 8, 16)
    """

    def __init__(
        self,
        vocabulary_size,
        embedding_dim,
        hidden_dim,
        num_layers,
        num_heads,
        intermediate_dim,
        intermediate_activation="quick_gelu",
        max_sequence_length=77,
        layer_norm_epsilon=1e-5,
        dtype=None,
        **kwargs,
    ):
        from keras_hub.layers import TokenAndPositionEmbedding

        if embedding_dim != hidden_dim:
            raise ValueError(f"CLIPTextTower needs embedding_dim == hidden_dim, got {embedding_dim} and {hidden_dim}")
        epsilon = float(layer_norm_epsilon)

        # === Layers ===
        self.embedding = TokenAndPositionEmbedding(
            vocabulary_size=vocabulary_size, sequence_length=max_sequence_length, embedding_dim=embedding_dim,
            dtype=dtype, name="embedding",
        )
        self.encoder_layers = [
            CLIPBlock(hidden_dim, num_heads, intermediate_dim, intermediate_activation,
                      use_causal_mask=True, layer_norm_epsilon=epsilon, dtype=dtype, name=f"encoder_block_{index}")
            for index in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="layer_norm")

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        x = self.embedding(token_ids)
        for block in self.encoder_layers:
            x = block(x)
        super().__init__(inputs={"token_ids": token_ids}, outputs=self.layer_norm(x), dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = int(vocabulary_size)
        self.embedding_dim = int(embedding_dim)
        self.hidden_dim = int(hidden_dim)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.intermediate_dim = int(intermediate_dim)
        self.intermediate_activation = intermediate_activation
        self.max_sequence_length = int(max_sequence_length)
        self.layer_norm_epsilon = epsilon

    def call_at(self, inputs, positions, training=False):
        """The final features at one token of each sequence: (batch, hidden_dim).

        Equal to `self(inputs)[arange(batch), positions]`; the last block computes only those tokens
        (`CLIPBlock.call_at`). `TextEncoder(pooling="last")` calls it at each end of text.

        Example:
        >>> tower = CLIPTextTower(100, 16, 16, num_layers=2, num_heads=2, intermediate_dim=32, max_sequence_length=8)
        >>> tower.call_at({"token_ids": np.ones((2, 8), "int32")}, np.array([7, 2])).shape
        (2, 16)
        """
        x = self.embedding(inputs["token_ids"])
        return self.layer_norm(_blocks_at(self.encoder_layers, x, positions, training))

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "embedding_dim": self.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "intermediate_activation": self.intermediate_activation,
            "max_sequence_length": self.max_sequence_length,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }
