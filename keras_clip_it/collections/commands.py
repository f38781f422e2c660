"""`keras-clip-it collections`: list the installed collections, inspect, build and edit stored ones.

`list` and `info NAME` only read the plugins' specs (no data); `build` materialises a registered
collection at an fsspec URI, embedded with the chosen encoders; `add`, `remove` and `compact` edit a
stored collection in place through the storage layer, which writes new segments and swaps the manifest
atomically, so an interrupted command leaves the collection as it was before or after.
"""

import json
import sys
import time


def _clean_errors(run):
    """Bad input ends the command with its message on stderr and exit status 1, not a traceback."""

    def wrapped(args):
        try:
            return run(args)
        except (ValueError, LookupError, TypeError, OSError) as error:
            # KeyError's str() is the repr of its message; show the message itself.
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"keras-clip-it collections: error: {message}", file=sys.stderr)
            return 1

    return wrapped


def _registry():
    from keras_clip_it.collections import registry

    return registry


def _encoders(args):
    import keras_clip_it as kci

    image = kci.ImageEncoder.from_preset(args.image_encoder) if args.image_encoder else None
    text = kci.TextEncoder.from_preset(args.text_encoder) if args.text_encoder else None
    return image, text


def _report_broken(registry):
    for plugin, reason in sorted(registry.broken().items()):
        print(f"broken plugin {plugin!r}: {reason}", file=sys.stderr)


def run_list(args):
    import warnings

    registry = _registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", registry.PluginWarning)  # reported below, once, on stderr
        rows = registry.available(details=True)
        if args.json:
            print(json.dumps({"collections": rows, "broken": registry.broken()}, indent=2, ensure_ascii=False))
            return 0
        if not rows:
            print("no collections: install a plugin, e.g. pip install keras-clip-it-emoji")
        width = max([len(row["name"]) for row in rows] + [4])
        for row in rows:
            print(f"{row['name']:{width}s}  {row['language']:4s}  {row['plugin']:10s}  {row['description']}")
        _report_broken(registry)
    return 0


def _is_name(target):
    import os

    from keras_clip_it.collections.specs import NAME_PATTERN

    return bool(NAME_PATTERN.match(target)) and not os.path.exists(target)


def run_info(args):
    from keras_clip_it.collections import storage

    if _is_name(args.name):
        details = _registry().details(args.name)
    else:
        details = storage.info(args.name)
        details["encoders"] = [f"{e['kind']}:{e['fingerprint'][:12]} ({e['dims']}-d, {e['dtype']})" for e in details["encoders"]]
    for key, value in details.items():
        print(f"{key:15s} {value}")
    return 0


def run_build(args):
    from keras_clip_it.collections import storage

    start = time.perf_counter()
    collection = _registry().load(args.name)
    image_encoder, text_encoder = _encoders(args)
    if image_encoder or text_encoder:
        collection.embed(image_encoder=image_encoder, text_encoder=text_encoder, batch_size=args.batch_size)
    generation = storage.save_collection(collection, args.to, dtype=args.dtype)
    print(
        f"built {args.name!r}: {len(collection)} pairs, encoders {collection.fingerprints}, at {args.to} "
        f"(generation {generation}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


def run_add(args):
    from keras_clip_it.collections import storage

    registry = _registry()
    stored = storage.open_collection(args.uri)
    if args.source:
        present = set(stored.ids)
        pairs = [pair for pair in registry.get_spec(args.source).iter_pairs() if pair.id not in present]
    else:
        pairs = _read_pairs(args.pairs)
    image_encoder, text_encoder = _encoders(args)
    columns = registry.prepare_pairs(stored.name, stored.fingerprints, pairs, image_encoder, text_encoder, args.batch_size)
    if columns["ids"]:
        storage.append(args.uri, **columns)
    print(f"added {len(columns['ids'])} pairs to {args.uri}: now {len(stored) + len(columns['ids'])}")
    return 0


def run_remove(args):
    from keras_clip_it.collections import storage

    storage.remove(args.uri, args.ids)
    print(f"removed {len(set(args.ids))} pairs from {args.uri}: now {storage.info(args.uri)['counts']['pairs']}")
    return 0


def run_compact(args):
    from keras_clip_it.collections import storage

    storage.compact(args.uri)
    counts = storage.info(args.uri)["counts"]
    print(f"compacted {args.uri}: {counts['pairs']} pairs in {counts['segments']} segment(s)")
    return 0


def _read_pairs(path):
    """Pairs from a JSON-lines file: one {"id", "caption", "image", "metadata"} object per line."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
    return pairs


def _encoder_options(parser):
    parser.add_argument("--image-encoder", help="image encoder preset to embed with (e.g. efficientnet_lite0_imagenet)")
    parser.add_argument("--text-encoder", help="text encoder preset to embed with (e.g. multilingual_e5_small)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")


def register(subparsers):
    parser = subparsers.add_parser("collections", help="list, inspect, build and edit analogy collections")
    commands = parser.add_subparsers(dest="collections_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="the collections installed plugins provide, and broken plugins")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_clean_errors(run_list))

    info = commands.add_parser("info", help="details of a registered collection or a stored one (URI)")
    info.add_argument("name", help="a collection name (emoji-it) or an fsspec URI/path of a stored collection")
    info.set_defaults(func=_clean_errors(run_info))

    build = commands.add_parser("build", help="store a registered collection at an fsspec URI")
    build.add_argument("name", help="registered collection name")
    build.add_argument("--to", required=True, help="destination URI or path (file://, memory://, s3://, ...)")
    _encoder_options(build)
    build.add_argument("--dtype", choices=("float32", "float16", "int8"), default="float32", help="how embeddings are stored")
    build.set_defaults(func=_clean_errors(run_build))

    add = commands.add_parser("add", help="add pairs to a stored collection")
    add.add_argument("uri", help="the stored collection")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", help="a registered collection: add its pairs not yet present")
    source.add_argument("--pairs", help='a JSON-lines file of {"id", "caption", "image", "metadata"} objects')
    _encoder_options(add)
    add.set_defaults(func=_clean_errors(run_add))

    remove = commands.add_parser("remove", help="remove pairs by id from a stored collection")
    remove.add_argument("uri", help="the stored collection")
    remove.add_argument("ids", nargs="+", help="ids of the pairs to remove")
    remove.set_defaults(func=_clean_errors(run_remove))

    compact = commands.add_parser("compact", help="merge a stored collection's segments and drop removed rows")
    compact.add_argument("uri", help="the stored collection")
    compact.set_defaults(func=_clean_errors(run_compact))
