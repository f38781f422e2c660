"""CLIP's transformer layers, laid out so that training compiles to plain matrix products on CPU.

keras-hub's CLIP layers compute every projection on (batch, tokens, features) tensors, as
`keras.layers.MultiHeadAttention` and `Dense` do. Their weight gradients then contract over two axes
(batch and tokens), which XLA:CPU turns into a transposing copy of the activations before each product,
and it fuses the layer-norm backward of every later block into those copies: in the train-step benchmark
(ViT and text transformer of width 128, batch 32) the backward pass took 5x the forward. The layers here
give the same outputs from the same weights but flatten the tokens first, so every projection and its
gradients are (rows, features) products, and project queries, keys and values with one fused matrix,
as PyTorch's `nn.MultiheadAttention` does.

On JAX, a projection that narrows (more input than output features, the MLP's second matrix) computes its
weight gradient as (output, input) and transposes that small result: XLA:CPU runs the (input, output)
product that autodiff asks for at about half the speed (5.4 against 3.2 ms for the (512, 128) gradient of
2080 rows).
"""

import functools
import math

import keras
from keras import ops

ACTIVATIONS = ("quick_gelu", "gelu", "relu")


def quick_gelu(x):
    """CLIP's activation, x * sigmoid(1.702 x), written with tanh (sigmoid(z) = (1 + tanh(z / 2)) / 2).

    XLA:CPU evaluates tanh about twice as fast as the logistic function, forwards and backwards.
    """
    half = ops.cast(0.5, x.dtype)
    return x * (half + half * ops.tanh(ops.cast(0.851, x.dtype) * x))


@functools.cache
def _narrowing_dense_jax():
    """x @ kernel + bias whose kernel gradient is computed as (dy^T x)^T, for JAX.

    The optimization barrier keeps XLA from folding the transpose back into the product, which would
    restore the slow (input, output) layout.
    """
    import jax

    @jax.custom_vjp
    def dense(x, kernel, bias):
        return x @ kernel + bias

    def forward(x, kernel, bias):
        return x @ kernel + bias, (x, kernel)

    def backward(saved, dy):
        x, kernel = saved
        kernel_gradient = jax.lax.optimization_barrier(dy.T @ x).T
        return dy @ kernel.T, kernel_gradient, dy.sum(axis=0)

    dense.defvjp(forward, backward)
    return dense


def dense_2d(layer, x):
    """Applies the `keras.layers.Dense` `layer` to rows `x`, with the faster weight gradient on JAX.

    The same result as `layer(x)`. On JAX a narrowing projection (more input than output features)
    computes its kernel gradient in the (output, input) layout, which XLA:CPU multiplies about twice as
    fast (see the module docstring); other backends and projections call the layer.

    Args:
        layer: a built `keras.layers.Dense`; one that is quantized, has an activation or no bias is
            called as it is.
        x: (rows, input features) tensor.

    Example:
    >>> layer = keras.layers.Dense(4)
    >>> layer.build((None, 8))
    >>> dense_2d(layer, np.ones((3, 8), "float32")).shape
    (3, 4)
    """
    plain = layer.bias is not None and layer.quantization_mode is None and layer.activation is keras.activations.linear
    if keras.backend.backend() != "jax" or not plain or layer.kernel.shape[0] <= layer.kernel.shape[1]:
        return layer(x)  # quantized kernels, activations and widening projections: the layer's own call
    return _narrowing_dense_jax()(x, ops.cast(layer.kernel, x.dtype), ops.cast(layer.bias, x.dtype))


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"intermediate_activation must be one of {ACTIVATIONS}, got {name!r}")
    return quick_gelu if name == "quick_gelu" else keras.activations.get(name)


@keras.saving.register_keras_serializable(package="keras_clip_it")
class CLIPPatchEmbedding(keras.layers.Layer):
    """Splits images into patches, projects each patch, prepends the class token and adds positions.

    The projection is CLIP's stride-`patch_size` convolution written as a reshape and one matrix
    product, with the kernel kept in the convolution's (patch, patch, channels, hidden) layout.

    Args:
        hidden_dim: int, width of the tokens.
        patch_size: int, side of a square patch in pixels.
        image_size: int, side of the square input image.

    Example:
    >>> layer = CLIPPatchEmbedding(hidden_dim=16, patch_size=8, image_size=32)
    >>> layer(np.zeros((2, 32, 32, 3), "float32")).shape
    (2, 17, 16)
    """

    def __init__(self, hidden_dim, patch_size, image_size, **kwargs):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.patch_size = int(patch_size)
        self.image_size = int(image_size)
        self.grid = self.image_size // self.patch_size
        self.num_positions = self.grid**2 + 1

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.patch_kernel = self.add_weight(
            shape=(self.patch_size, self.patch_size, channels, self.hidden_dim),
            initializer="glorot_uniform",
            name="patch_kernel",
        )
        self.class_embedding = self.add_weight(shape=(self.hidden_dim,), initializer="random_normal", name="class_embedding")
        self.position_embedding = self.add_weight(
            shape=(self.num_positions, self.hidden_dim), initializer="random_normal", name="position_embedding"
        )

    def call(self, images):
        batch, channels = ops.shape(images)[0], ops.shape(images)[-1]
        grid, patch = self.grid, self.patch_size
        x = ops.reshape(images, (batch, grid, patch, grid, patch, channels))
        x = ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (batch * grid * grid, patch * patch * channels))
        kernel = ops.reshape(ops.cast(self.patch_kernel, x.dtype), (patch * patch * channels, self.hidden_dim))
        patches = ops.reshape(ops.matmul(x, kernel), (batch, grid * grid, self.hidden_dim))
        class_token = ops.broadcast_to(ops.cast(self.class_embedding, x.dtype), (batch, 1, self.hidden_dim))
        tokens = ops.concatenate([class_token, patches], axis=1)
        return tokens + ops.cast(self.position_embedding, x.dtype)[None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_positions, self.hidden_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
        }


@keras.saving.register_keras_serializable(package="keras_clip_it")
class CLIPBlock(keras.layers.Layer):
    """A pre-norm transformer block: self-attention then an MLP, each around a residual connection.

    Same function as keras-hub's `CLIPEncoderLayer` (and Hugging Face's `CLIPEncoderLayer`), computed on
    the tokens flattened to (batch * tokens, hidden_dim): queries, keys and values come from one
    (hidden_dim, 3 * hidden_dim) projection, and the attention softmax runs in float32.

    Args:
        hidden_dim: int, width of the tokens.
        num_heads: int, attention heads; must divide `hidden_dim`.
        intermediate_dim: int, width of the MLP.
        intermediate_activation: "quick_gelu" (CLIP), "gelu" or "relu".
        use_causal_mask: each token attends only to itself and earlier ones (the text tower).
        layer_norm_epsilon: epsilon of both layer norms.

    Example:
    >>> block = CLIPBlock(hidden_dim=16, num_heads=2, intermediate_dim=32)
    >>> block(np.zeros((2, 5, 16), "float32")).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        intermediate_dim,
        intermediate_activation="quick_gelu",
        use_causal_mask=False,
        layer_norm_epsilon=1e-5,
        **kwargs,
    ):
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of num_heads {num_heads}")
        super().__init__(**kwargs)

        # === Config ===
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.intermediate_dim = int(intermediate_dim)
        self.intermediate_activation = intermediate_activation
        self.use_causal_mask = bool(use_causal_mask)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.head_dim = self.hidden_dim // self.num_heads

        # === Layers ===
        def dense(units, name):
            return keras.layers.Dense(units, dtype=self.dtype_policy, name=name)

        def norm(name):
            return keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name)

        self.layer_norm_1 = norm("layer_norm_1")
        self.qkv_dense = dense(3 * self.hidden_dim, "qkv_dense")
        self.output_dense = dense(self.hidden_dim, "output_dense")
        self.layer_norm_2 = norm("layer_norm_2")
        self.dense_1 = dense(self.intermediate_dim, "dense_1")
        self.dense_2 = dense(self.hidden_dim, "dense_2")
        self.activation = _activation(intermediate_activation)

    def build(self, input_shape):
        flat = (None, self.hidden_dim)
        self.layer_norm_1.build(flat)
        self.qkv_dense.build(flat)
        self.output_dense.build(flat)
        self.layer_norm_2.build(flat)
        self.dense_1.build(flat)
        self.dense_2.build((None, self.intermediate_dim))

    def _attention(self, qkv, batch, length):
        qkv = ops.reshape(qkv, (batch, length, 3, self.num_heads, self.head_dim))
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        query = query * ops.cast(1.0 / math.sqrt(self.head_dim), query.dtype)
        scores = ops.cast(ops.einsum("bqhd,bkhd->bhqk", query, key), "float32")
        if self.use_causal_mask:
            causal = ops.tril(ops.ones((length, length), "bool"))
            scores = ops.where(causal[None, None], scores, ops.cast(-1e9, "float32"))
        weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
        return ops.reshape(ops.einsum("bhqk,bkhd->bqhd", weights, value), (batch * length, self.hidden_dim))

    def call_at(self, x, positions):
        """The block's output at one token of each sequence: (batch, hidden_dim).

        Equal to `call(x)[arange(batch), positions]`, but only the attention queries, the residuals and
        the MLP of those tokens are computed: every token still gives its key and value. A tower whose
        output is pooled at one token (CLIP's class token or end of text) runs its last block this way;
        for CLIP's towers that skips about a fifth of the blocks' matrix products.

        Args:
            x: (batch, tokens, hidden_dim) tensor.
            positions: int (batch,) tensor, the token kept from each sequence.

        Example:
        >>> block = CLIPBlock(hidden_dim=16, num_heads=2, intermediate_dim=32)
        >>> x = np.random.RandomState(0).normal(size=(2, 5, 16)).astype("float32")
        >>> full = np.asarray(block(x))
        >>> kept = np.asarray(block.call_at(x, np.array([0, 3])))
        >>> bool(np.allclose(kept, full[[0, 1], [0, 3]], atol=1e-5))
        True
        """
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        positions = ops.cast(positions, "int32")
        x = ops.reshape(x, (batch * length, self.hidden_dim))
        qkv = self.qkv_dense(self.layer_norm_1(x))
        rows = ops.arange(batch, dtype="int32") * length + positions
        query = ops.take(qkv, rows, axis=0)[:, : self.hidden_dim]
        query = ops.reshape(query, (batch, self.num_heads, self.head_dim))
        query = query * ops.cast(1.0 / math.sqrt(self.head_dim), query.dtype)
        qkv = ops.reshape(qkv, (batch, length, 3, self.num_heads, self.head_dim))
        key, value = qkv[:, :, 1], qkv[:, :, 2]
        scores = ops.cast(ops.einsum("bhd,bkhd->bhk", query, key), "float32")
        if self.use_causal_mask:
            visible = ops.arange(length, dtype="int32")[None, :] <= positions[:, None]
            scores = ops.where(visible[:, None, :], scores, ops.cast(-1e9, "float32"))
        weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
        attended = ops.reshape(ops.einsum("bhk,bkhd->bhd", weights, value), (batch, self.hidden_dim))
        x = ops.take(x, rows, axis=0) + self.output_dense(attended)
        return x + dense_2d(self.dense_2, self.activation(self.dense_1(self.layer_norm_2(x))))

    def call(self, x, training=None):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (batch * length, self.hidden_dim))
        x = x + self.output_dense(self._attention(self.qkv_dense(self.layer_norm_1(x)), batch, length))
        x = x + dense_2d(self.dense_2, self.activation(self.dense_1(self.layer_norm_2(x))))
        return ops.reshape(x, (batch, length, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "intermediate_activation": self.intermediate_activation,
            "use_causal_mask": self.use_causal_mask,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }
