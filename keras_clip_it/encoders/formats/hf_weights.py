"""Reading Hugging Face model folders: config, weight files, and porting tensors onto Keras variables.

`StateDictLoader` has the `port_weight` / `get_tensor` interface of keras-hub's `SafetensorLoader`, so
keras-hub's own converters (`keras_hub.src.utils.transformers.convert_*.convert_weights`) run on any part
of a checkpoint, for example the BERT text tower inside a VisionTextDualEncoder. Every failure names the
tensor and the file.
"""

import json
import os

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match the model built from its config."""


def read_config(directory, name="config.json"):
    """Loads a JSON file of a model folder, with a clear error when it is missing or malformed."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory!r} has no {name}: expected a Hugging Face model folder")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): re-download the model") from None


def read_state_dict(directory):
    """Loads every tensor of a Hugging Face folder as float32/int numpy arrays.

    Reads `model.safetensors` (or its sharded index) or a PyTorch `pytorch_model.bin` through the
    package's torch-free reader. Flax-only folders are refused with the conversion to do.

    Returns:
        (dict name -> np.ndarray, the file or index the tensors came from)
    """
    from safetensors.numpy import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        return _load_safetensors(load_file, single), single
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_load_safetensors(load_file, os.path.join(directory, name)))
        return state, index
    torch_file = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(torch_file):
        from keras_clip_it.encoders.formats.pth_reader import read_pth

        return read_pth(torch_file), torch_file
    present = sorted(os.listdir(directory))
    hint = (
        " It holds Flax weights only: convert them once with transformers "
        "(Model.from_pretrained(path, from_flax=True).save_pretrained(path))."
        if "flax_model.msgpack" in present
        else ""
    )
    raise CheckpointError(
        f"{directory!r} has no model.safetensors or pytorch_model.bin (found: {', '.join(present)}).{hint}"
    )


def _load_safetensors(load_file, path):
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path} could not be read ({error}): re-download the model") from None


class StateDictLoader:
    """Copies named tensors onto Keras variables, checking shapes; keras-hub's loader interface.

    Args:
        state: dict name -> numpy array.
        source: the file the tensors came from, named in errors.
        prefix: prepended to every key (e.g. "text_model." for one tower of a dual encoder).
    """

    def __init__(self, state, source, prefix=""):
        self.state = state
        self.source = source
        self.prefix = prefix
        self.used = set()

    def get_tensor(self, key):
        full = self.prefix + key
        if full not in self.state:
            raise CheckpointError(f"tensor {full!r} is missing from {self.source}: the file does not match its config")
        self.used.add(full)
        return self.state[full]

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        tensor = self.get_tensor(hf_weight_key)
        stored = tuple(np.shape(tensor))
        try:
            if hook_fn is not None:
                tensor = hook_fn(tensor, tuple(keras_variable.shape))
            tensor = np.asarray(tensor)
            fits = tuple(tensor.shape) == tuple(keras_variable.shape)
        except ValueError:  # a reshape in the hook that cannot fit
            fits = False
        if not fits:
            raise CheckpointError(
                f"tensor {self.prefix + hf_weight_key!r} in {self.source} has shape {stored}, which does not "
                f"fit the model built from the config (Keras variable {tuple(keras_variable.shape)})"
            )
        keras_variable.assign(tensor.astype(keras_variable.dtype))

    def with_prefix(self, prefix):
        """A loader over the same tensors under another prefix, sharing the record of used tensors."""
        loader = StateDictLoader(self.state, self.source, prefix)
        loader.used = self.used
        return loader
