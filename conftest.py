"""Test-session setting shared by every test directory.

The tiny test models live in ``tests/models.py``, and many files the tests write name them
(``models:MLP``). A file may only name classes of modules the user allowed, so the suite allows
that module the way a user would: with ``LRC_TRUSTED_MODULES`` (README, Safety).
"""

import os

os.environ["LRC_TRUSTED_MODULES"] = " ".join(
    dict.fromkeys([*os.environ.get("LRC_TRUSTED_MODULES", "").replace(",", " ").split(), "models"])
)
