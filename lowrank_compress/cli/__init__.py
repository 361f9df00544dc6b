"""The ``lrc`` command line: one module per command, each parsing its options, calling the library
and rendering the result; ``app`` holds the shared error handling and exit codes."""

from . import inspect, compress, export, bench, evaluate, finetune, demo  # noqa: F401  (registers, in help order)
from .app import app, main

__all__ = ["app", "main"]
