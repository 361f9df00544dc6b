"""Moved to :mod:`lowrank_compress.examples.digits`; this name remains only until benchmarks/digits.py
imports it from there. Nothing in the package imports it."""

from .examples.digits import *  # noqa: F401,F403
