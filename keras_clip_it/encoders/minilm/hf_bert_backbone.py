"""keras-hub's BERT backbone with the feed-forward activation and layer-norm epsilon a checkpoint names."""

import keras
from keras_hub.src.models.bert.bert_backbone import BertBackbone

# Hugging Face `hidden_act` -> (keras activation, approximate). "gelu" is the exact erf form, which
# keras-hub's BertBackbone replaces by the tanh approximation.
ACTIVATIONS = {
    "gelu": ("gelu", False),
    "gelu_new": ("gelu", True),
    "gelu_pytorch_tanh": ("gelu", True),
    "relu": ("relu", False),
}


@keras.saving.register_keras_serializable(package="keras_clip_it")
class HFBertBackbone(BertBackbone):
    """keras-hub's BERT backbone with the checkpoint's feed-forward activation and layer-norm epsilon.

    keras-hub's BertBackbone always uses the tanh approximation of GELU and an epsilon of 1e-12; Hugging
    Face BERT checkpoints say which they were trained with (`hidden_act`, `layer_norm_eps`), and the exact
    GELU of all-MiniLM-L6-v2 moves its embeddings by about 1e-4.

    Args:
        activation: Hugging Face `hidden_act` name: "gelu" (exact), "gelu_new" or "gelu_pytorch_tanh"
            (tanh approximation), "relu".
        layer_norm_epsilon: epsilon of every layer norm.
        **kwargs: the arguments of `keras_hub.models.BertBackbone`.

    Example:
    >>> backbone = HFBertBackbone(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=8,
    ...                           intermediate_dim=16, activation="gelu")
    >>> backbone.transformer_layers[0].activation.__name__
    'exact_gelu'
    """

    def __init__(self, *args, activation="gelu", layer_norm_epsilon=1e-12, **kwargs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        function = _activation_function(activation)
        # The functional graph is rebuilt at every call from the layers, so changing them here is enough.
        for layer in self.transformer_layers:
            layer.activation = function
            layer._feedforward_intermediate_dense.activation = function
        for layer in self._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.LayerNormalization):
                layer.epsilon = self.layer_norm_epsilon

    def get_config(self):
        return {**super().get_config(), "activation": self.activation, "layer_norm_epsilon": self.layer_norm_epsilon}


def _activation_function(name):
    base, approximate = ACTIVATIONS[name]
    if base == "relu":
        return keras.activations.relu

    def gelu(x):
        return keras.activations.gelu(x, approximate=approximate)

    gelu.__name__ = "tanh_gelu" if approximate else "exact_gelu"
    return gelu
