"""The model catalog file (``MODEL_CATALOG``): the deployed models the token function lists.

A JSON list of ``{"name", "version", "labels", "input"}``, copied from the bundles'
``model.json``: ``./start.sh`` writes one for ``models/`` and ``knative/manage.py`` renders one
into a ConfigMap, both with :func:`write`; the token function reads it with :func:`read`. Both
sides check an entry the same way (:func:`entry`), so a bundle the token function would refuse
is refused where it is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared import jsonbody
from shared.errors import StartupError

FIELDS = ("name", "version", "labels", "input")
# What each field must be, as the predict function's bundle loader reads them too.
_TYPES: dict[str, tuple[type, ...]] = {"name": (str,), "version": (str, int), "labels": (list,), "input": (dict,)}


class CatalogError(StartupError):
    """The catalog file, or a bundle written into it, is missing or malformed; the message says
    which and why."""


def entry(meta: Any, where: str) -> dict[str, Any]:
    """The catalog entry of a model whose ``model.json`` (or catalog entry) ``meta`` was read from
    ``where``: its :data:`FIELDS`; CatalogError naming what is missing or of the wrong type."""
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise CatalogError(f"{where}: needs a string 'name'")
    missing = [field for field in FIELDS if field not in meta]
    if missing:
        raise CatalogError(f"{where}: model {meta['name']!r} lacks {', '.join(missing)}")
    wrong = [field for field in FIELDS if not isinstance(meta[field], _TYPES[field])]
    if wrong:
        kinds = ", ".join(f"{field} must be {' or '.join(t.__name__ for t in _TYPES[field])}" for field in wrong)
        raise CatalogError(f"{where}: model {meta['name']!r}: {kinds}")
    return {field: meta[field] for field in FIELDS}


def write(path: Path, bundles: Iterable[Path]) -> None:
    """Write the catalog of the model ``bundles`` (folders holding model.json) to ``path``."""
    entries = []
    for bundle in bundles:
        source = bundle / "model.json"
        entries.append(entry(jsonbody.read_file(source, CatalogError), str(source)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(entries, key=lambda e: e["name"]), indent=2) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    """The catalog's entries (only their :data:`FIELDS`), sorted by name; CatalogError otherwise."""
    entries = jsonbody.read_file(path, CatalogError, "MODEL_CATALOG: ")
    if not isinstance(entries, list):
        raise CatalogError(f"MODEL_CATALOG: {path} must hold a JSON list of models")
    models = [entry(item, f"MODEL_CATALOG: {path}: entry {i}") for i, item in enumerate(entries)]
    return sorted(models, key=lambda model: model["name"])
