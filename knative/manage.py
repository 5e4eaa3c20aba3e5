#!/usr/bin/env python3
"""Keep knative/ in step with the models: one command to add a model, routing rendered from
the same table the local gateway uses (local/routes.py).

    knative/manage.py add-model NAME [--image IMAGE]   # base/models/NAME.yaml + kustomization + routing
    knative/manage.py routing                          # re-render routing/virtualservice.yaml
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

try:
    from local import routes
except ImportError:
    # Run by a python without the project installed: use the project's .venv when it exists.
    venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit("manage.py: run ./start.sh once (it creates .venv), or: pip install -e .")

HERE = Path(__file__).resolve().parent


def models() -> list[str]:
    """Models listed in kustomization.yaml, in order."""
    return re.findall(r"^  - models/([a-z0-9-]+)\.yaml$", (HERE / "base" / "kustomization.yaml").read_text(), re.M)


def render_model(name: str, image: str) -> str:
    template = (HERE / "model-template.yaml").read_text().split("\n", 1)[1]  # drop the comment line
    return f"# Predict function for model {name} (rendered by knative/manage.py add-model).\n" + template.replace(
        "IMAGE", image
    ).replace("MODEL", name)


def add_model(name: str, image: str | None) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?", name):
        raise SystemExit(f"manage.py: invalid model name {name!r} (lowercase letters, digits, -)")
    out = HERE / "base" / "models" / f"{name}.yaml"
    if out.exists():
        raise SystemExit(f"manage.py: {out.relative_to(HERE.parent)} exists")
    out.write_text(render_model(name, image or f"registry.example.com/thalamus/{name}:latest"))
    kustomization = HERE / "base" / "kustomization.yaml"
    lines = kustomization.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("  - models/"))
    lines.insert(last + 1, f"  - models/{name}.yaml")
    kustomization.write_text("\n".join(lines) + "\n")
    write_routing()
    print(
        f"wrote knative/base/models/{name}.yaml, listed it in knative/base/kustomization.yaml, "
        "updated knative/routing/virtualservice.yaml"
    )


def write_routing() -> None:
    (HERE / "routing" / "virtualservice.yaml").write_text(routes.render_virtualservice(models()))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="knative/manage.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-model", help="add a model's Knative Service")
    add.add_argument("name")
    add.add_argument("--image", help="image reference (default registry.example.com/thalamus/NAME:latest)")
    sub.add_parser("routing", help="re-render routing/virtualservice.yaml")
    args = parser.parse_args()
    if args.command == "add-model":
        add_model(args.name, args.image)
    else:
        write_routing()


if __name__ == "__main__":
    main()
