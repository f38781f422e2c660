"""The `keras-clip-it` command."""

import argparse
import importlib
import os
import sys

# Subcommand modules: each has register(subparsers), adding its parser with a `func(args)` default.
COMMANDS = [
    "keras_clip_it.tasks.demo",
    "keras_clip_it.tasks.commands",
    "keras_clip_it.collections.commands",
    "keras_clip_it.serving.commands",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-clip-it",
        description="Image-text models in Keras 3, with Italian as a first-class language.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # the module exists but something it needs is missing
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from keras_clip_it import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
