"""Build the package: the hot, strictly typed modules compiled with mypyc (as black does), when
a C compiler and Python's headers are at hand; the same modules as pure Python otherwise.

Everything else about the package is in pyproject.toml. ``BROKER_PURE_PYTHON=1`` builds without
compiling (and, at run time, imports the .py files even beside compiled ones:
broker/__init__.py). A compiled module stays correct only for the source it was built from:
``make`` rebuilds after an edit, and the test suite refuses to run against a stale one.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

# The modules a routed message passes through, in import order. Not compiled: what users may
# subclass or replace (deliveries, the cluster), rules.py (config.LimitsConfig inherits from
# it; an interpreted class cannot inherit from a compiled one) and what runs once per
# connection or less.
COMPILED = [
    "broker/protocol/codes.py",
    "broker/protocol/topics.py",
    "broker/protocol/frames.py",
    "broker/core/stats.py",
    "broker/core/permissions.py",
    "broker/core/ratelimit.py",
    "broker/core/outbound.py",
    "broker/core/hub.py",
    "broker/core/session.py",
    "broker/io/writes.py",
    "broker/io/websocket.py",
    "broker/io/connection.py",
]


def compiled_modules() -> list[Extension]:
    """The mypyc extensions, each optional: a failed compile leaves the pure-Python module."""
    if os.environ.get("BROKER_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # built without the build requirements (--no-build-isolation)
        return []
    # Type-checked in the build's own environment, without the runtime dependencies mypy
    # does not need: only the compiled modules' errors count (the project's mypy run checks
    # the rest, against every dependency).
    flags = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-ignores"]
    extensions: list[Extension] = mypycify(
        [*flags, *COMPILED], opt_level="3", group_name="broker._compiled"
    )
    for extension in extensions:
        extension.optional = True
    return extensions


setup(ext_modules=compiled_modules())
