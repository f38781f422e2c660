"""Makes the package's saved classes known to Keras, so `keras.saving.load_model` reads our `.keras` files.

Keras finds a saved class by its registered name ("keras_clip_it>DualEncoder") in a registry that fills
only when the class's module runs, and it imports modules by itself only for its own packages. The
package root is lazy (so `keras_clip_it.collections` loads no backend), so after a plain
`import keras_clip_it` none of those modules has run. The root calls `install()`: once Keras is
imported (at once if it already is, else right after the `import keras` that follows) the modules that
define saved classes are imported too. A process that never imports Keras pays for none of it.

Registering must wait until no import that could be half done is in flight: keras-hub, which our
architectures subclass, imports Keras from its own `__init__`, and an `import keras` inside one of our
modules leaves that module half built. So the wait is over at the end of the outermost import of Keras,
keras-hub or TensorFlow (the ones this hook watches), or at the next public name the root hands out.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings

# The modules of the classes a saved model starts from. The towers import their architecture's modules
# (backbones, tokenizers, registered by each encoders/ folder) when they are rebuilt, so those load only
# for a file that contains them.
SERIALIZABLE = (
    "keras_clip_it.losses",
    "keras_clip_it.encoders.image_encoder",
    "keras_clip_it.encoders.text_encoder",
    "keras_clip_it.models.dual_encoder",
    "keras_clip_it.models.feature_cache",
    "keras_clip_it.models.asif",
)
# Imports during which registering could meet a half-initialised module: wait for them to end.
_WATCHED = ("keras", "keras_hub", "tensorflow")

_lock = threading.RLock()
_registered = False


def _initializing(name):
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _ready():
    if "keras" not in sys.modules:
        return False
    busy = [name for name in list(sys.modules) if name in _WATCHED or name.startswith("keras_clip_it.")]
    return not any(_initializing(name) for name in busy)


def register(strict=True):
    """Imports every module with saved classes, once; a no-op until Keras is imported and settled.

    Args:
        strict: raise if a module fails to import. The import hook passes False: a user's `import keras`
            must not fail because of this package, so it warns and leaves registering to the next try.
    """
    global _registered
    with _lock:
        if _registered or not _ready():
            return
        _registered = True  # first, so the imports below do not re-enter
        try:
            for name in SERIALIZABLE:
                importlib.import_module(name)
        except Exception as error:
            _registered = False
            if strict:
                raise
            warnings.warn(
                f"keras-clip-it could not register its saved classes with Keras ({name}: {type(error).__name__}: "
                f"{error}); loading its .keras files will fail until that import works",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        _Watcher.uninstall()


class _Loader(importlib.abc.Loader):
    """A watched module's own loader, then `register()` once its import has finished."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # Seen by importers and tools (resources, reloading) as the real loader.
        module.__loader__ = module.__spec__.loader = self._loader
        try:
            self._loader.exec_module(module)
        finally:
            module.__spec__._initializing = False
        register(strict=False)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds the watched top-level modules with the other finders and wraps their loaders."""

    _busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec

    @classmethod
    def uninstall(cls):
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, cls)]


def install():
    """Registers now if Keras is imported and settled, else once it is (see the module's docstring)."""
    if not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
    register()
