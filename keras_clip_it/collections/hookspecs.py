"""The hooks a keras-clip-it plugin can implement, and the markers to declare them."""

from pluggy import HookimplMarker
from pluggy import HookspecMarker

hookspec = HookspecMarker("keras_clip_it")
hookimpl = HookimplMarker("keras_clip_it")


@hookspec
def register_collections(register):
    """Register analogy collections: call register(CollectionSpec(...)) once for each."""
