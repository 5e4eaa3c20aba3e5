"""The model catalog file (``MODEL_CATALOG``): the deployed models the token function lists.

A JSON list of ``{"name", "version", "labels", "input"}``, copied from the bundles'
``model.json``: ``./start.sh`` writes one for ``models/`` and ``knative/manage.py`` renders one
into a ConfigMap, both with :func:`write`; the token function reads it with :func:`read`. Both
sides check an entry the same way (:func:`entry`), so a bundle the token function would refuse
is refused where it is written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared import jsonbody
from shared.errors import StartupError
from shared.keyrecords import MODEL_NAME_RULE, is_model_name

FIELDS = ("name", "version", "labels", "input")


class CatalogError(StartupError):
    """The catalog file, or a bundle written into it, is missing or malformed; the message says
    which and why."""


def entry(meta: Any, where: str) -> dict[str, Any]:
    """The catalog entry of a model whose ``model.json`` (or catalog entry) ``meta`` was read from
    ``where``: its :data:`FIELDS`, the version as text (a number is one, as the predict function
    reads it); CatalogError naming what is missing or wrong."""
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise CatalogError(f"{where}: needs a string 'name'")
    name = meta["name"]
    if not is_model_name(name):
        raise CatalogError(f"{where}: model name {name[:80]!r} is not one: {MODEL_NAME_RULE}")
    missing = [field for field in FIELDS if field not in meta]
    if missing:
        raise CatalogError(f"{where}: model {name!r} lacks {', '.join(missing)}")
    version, labels = meta["version"], meta["labels"]
    if isinstance(version, bool) or not isinstance(version, str | int | float):
        raise CatalogError(f"{where}: model {name!r}: version must be text or a number")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise CatalogError(f"{where}: model {name!r}: labels must be a list of strings")
    if not isinstance(meta["input"], dict):
        raise CatalogError(f"{where}: model {name!r}: input must be an object")
    return {"name": name, "version": str(version), "labels": labels, "input": meta["input"]}


def _sorted(entries: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if twice := sorted(name for name, count in Counter(e["name"] for e in entries).items() if count > 1):
        raise CatalogError(f"{where}: model {twice[0]!r} is listed more than once")
    return sorted(entries, key=lambda e: e["name"])


def write(path: Path, bundles: Iterable[Path]) -> None:
    """Write the catalog of the model ``bundles`` (folders holding model.json) to ``path``."""
    entries = []
    for bundle in bundles:
        source = bundle / "model.json"
        entries.append(entry(jsonbody.read_file(source, CatalogError), str(source)))
    entries = _sorted(entries, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    """The catalog's entries (only their :data:`FIELDS`), sorted by name; CatalogError otherwise."""
    entries = jsonbody.read_file(path, CatalogError, "MODEL_CATALOG: ")
    if not isinstance(entries, list):
        raise CatalogError(f"MODEL_CATALOG: {path} must hold a JSON list of models")
    models = [entry(item, f"MODEL_CATALOG: {path}: entry {i}") for i, item in enumerate(entries)]
    return _sorted(models, f"MODEL_CATALOG: {path}")
