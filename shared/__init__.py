"""Thalamus shared library: settings, Redis auth, errors, HTTP helpers and API docs.

Every function imports this package; nothing in it imports TensorFlow.
"""
