"""Thalamus shared library: settings, Redis auth, errors, HTTP helpers and API docs.

Every function imports this package; nothing in it imports TensorFlow.
"""

__version__ = "0.1.0"  # the project's (pyproject.toml reads it), as GET /v2 reports it
