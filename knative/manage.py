#!/usr/bin/env python3
"""Keep knative/ in step with the models and the images, so `kubectl apply -k` is all a deploy is.

    knative/manage.py add-model NAME [--image REF]   # functions/models/NAME.yaml, its image, the catalog, routing
    knative/manage.py set-image FUNCTION REF         # FUNCTION = token or a model; REF = repo@sha256:… or repo:tag
    knative/manage.py catalog                        # rewrite functions/models.json from models/*/model.json
    knative/manage.py render                         # re-render functions/models/*.yaml after editing the template
    knative/manage.py routing [--host HOST]          # re-render routing/virtualservice.yaml (local/routes.py)
    knative/manage.py canary start FUNCTION --image REF [--percent 10] [--current REVISION]
    knative/manage.py canary set FUNCTION PERCENT    # the candidate's share: 100 promotes, 0 rolls back
    knative/manage.py canary finish|abort FUNCTION   # keep the candidate's image / the current one, end the canary

Images are recorded by digest in functions/kustomization.yaml (`images:`): Knative never has a
tag to resolve and every revision runs exactly what was pushed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from local import istio
    from shared import modelcatalog
    from shared.keyrecords import MODEL_NAME_RULE, is_model_name
except ImportError:
    # Run by a python without the project installed: use the project's .venv when it exists.
    venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit("manage.py: run ./start.sh once (it creates .venv), or: pip install -e .")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FUNCTIONS = HERE / "functions"
CANARY = HERE / "canary"
ROUTING = HERE / "routing"
DEFAULT_HOST = "thalamus.example.com"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def fail(message: str) -> SystemExit:
    return SystemExit(f"manage.py: {message}")


# -- what is deployed ---------------------------------------------------------------------------


def models() -> list[str]:
    """The models with a Service in functions/models/, sorted."""
    return sorted(path.stem for path in (FUNCTIONS / "models").glob("*.yaml"))


def functions() -> list[str]:
    return ["token", *models()]


def check_function(name: str) -> str:
    if name not in functions():
        raise fail(f"no function {name!r} in knative/functions (deployed: {', '.join(functions())})")
    return name


# -- kustomization.yaml, edited block by block (a top-level key and its indented lines) ----------


def replace_block(text: str, key: str, body: list[str]) -> str:
    """``text`` with the block of top-level ``key`` replaced by ``key:`` and ``body``'s lines."""
    lines = text.splitlines()
    start = lines.index(f"{key}:")
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end].startswith(" ")):
        end += 1
    return "\n".join([*lines[:start], f"{key}:", *body, *lines[end:]]) + "\n"


def read_images(text: str) -> dict[str, dict[str, str]]:
    """The ``images:`` entries of a kustomization, by name (the format :func:`image_lines` writes)."""
    images: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    lines = text.splitlines()
    if "images:" not in lines:
        return images
    for line in lines[lines.index("images:") + 1 :]:
        if line and not line.startswith(" "):
            break
        match = re.match(r"\s*(- )?(name|newName|newTag|digest):\s*\"?([^\"\s]+)\"?", line)
        if not match:
            continue
        if match.group(1):
            current = {}
        current[match.group(2)] = match.group(3)
        if match.group(2) == "name":
            images[match.group(3)] = current
    return images


def image_entry(fields: dict[str, str]) -> dict[str, str]:
    """The kustomize image fields among ``fields``."""
    return {key: value for key, value in fields.items() if key in ("newName", "newTag", "digest")}


def image_lines(images: dict[str, dict[str, str]]) -> list[str]:
    lines = []
    for name, entry in images.items():
        lines.append(f"  - name: {name}")
        lines += [f"    newName: {entry['newName']}"] if "newName" in entry else []
        lines += [f"    newTag: {json.dumps(entry['newTag'])}"] if "newTag" in entry else []  # "1.0" stays a string
        lines += [f"    digest: {entry['digest']}"] if "digest" in entry else []
    return lines


# -- image references ---------------------------------------------------------------------------


def split_reference(ref: str) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@sha256:…]`` → (repository, tag, digest)."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    repo, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, None)
    if digest and not _DIGEST.fullmatch(digest):
        raise fail(f"{ref}: the digest must be sha256: and 64 hex digits")
    if not repo or any(c.isspace() or c.isupper() for c in repo):
        raise fail(f"{ref}: not an image reference")
    return repo, tag, digest or None


def resolve(ref: str) -> dict[str, str]:
    """The kustomize ``images:`` entry (newName, newTag, digest) for ``ref``, resolving a tag to its
    digest with skopeo (asks the registry) or podman (its local store) when they are here."""
    repo, tag, digest = split_reference(ref)
    if not digest and shutil.which("skopeo"):
        found = _run(["skopeo", "inspect", "--format", "{{.Digest}}", f"docker://{ref}"])
        digest = found if found and _DIGEST.fullmatch(found) else None
    if not digest and shutil.which("podman"):
        found = _run(["podman", "image", "inspect", "--format", "{{json .RepoDigests}}", ref])
        known = [d.split("@", 1)[1] for d in json.loads(found or "[]") if d.split("@", 1)[0] == repo]
        if known:
            digest = known[0]
            print(
                f"manage.py: {ref} → {digest} from podman's local store; for an image you built and "
                "pushed, check it is the digest `podman push --digestfile FILE` wrote",
                file=sys.stderr,
            )
    if not digest:
        raise fail(
            f"cannot find the digest of {ref} (skopeo is {'here' if shutil.which('skopeo') else 'missing'}, "
            f"podman {'does not know the image' if shutil.which('podman') else 'is missing'}): give it as "
            f"{repo}@sha256:… — the digest `podman push --digestfile FILE {ref}` writes to FILE"
        )
    entry = {"newName": repo, "digest": digest}
    if tag:
        entry["newTag"] = tag
    return entry


def _run(command: list[str]) -> str | None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else None


# -- functions/kustomization.yaml and the catalog ---------------------------------------------------


PLACEHOLDER = {"newName": "registry.example.com/thalamus/{name}", "digest": "sha256:" + "0" * 64}


def write_functions(images: dict[str, dict[str, str]] | None = None) -> None:
    """Rewrite the resources and images blocks of functions/kustomization.yaml for what is deployed."""
    path = FUNCTIONS / "kustomization.yaml"
    text = path.read_text()
    current = read_images(text) if images is None else images
    resources = ["token.yaml", *(f"models/{m}.yaml" for m in models())]
    text = replace_block(text, "resources", [f"  - {r}" for r in resources])
    ordered = {}
    for name in functions():
        ordered[f"thalamus/{name}"] = current.get(f"thalamus/{name}") or {
            key: value.format(name=name) for key, value in PLACEHOLDER.items()
        }
    path.write_text(replace_block(text, "images", image_lines(ordered)))


def set_image(name: str, ref: str) -> None:
    check_function(name)
    images = read_images((FUNCTIONS / "kustomization.yaml").read_text())
    images[f"thalamus/{name}"] = resolve(ref)
    write_functions(images)
    if name != "token":
        write_catalog()  # a new image may carry a retrained bundle
    entry = images[f"thalamus/{name}"]
    tag = f":{entry['newTag']}" if "newTag" in entry else ""
    runs = f"{entry['newName']}{tag}@{entry['digest']}"
    print(f"thalamus-{name} runs {runs}: kubectl apply -k knative/ (or knative/routing)")


def write_catalog() -> None:
    """functions/models.json: name, version, labels and input of every deployed model's bundle."""
    bundles = [ROOT / "models" / name for name in models()]
    for bundle in bundles:
        if not (bundle / "model.json").is_file():
            raise fail(
                f"model {bundle.name} is deployed but models/{bundle.name}/model.json is missing (./train.py makes it)"
            )
    try:
        modelcatalog.write(FUNCTIONS / "models.json", bundles)
    except modelcatalog.CatalogError as exc:
        raise fail(str(exc)) from None


def render_model(name: str) -> str:
    """functions/models/NAME.yaml's text: model-template.yaml with MODEL replaced by ``name``."""
    template = (FUNCTIONS / "model-template.yaml").read_text().split("\n", 1)[1]  # drop the comment line
    return f"# Predict function for model {name} (rendered by knative/manage.py add-model).\n" + template.replace(
        "MODEL", name
    )


_MIN_SCALE = re.compile(r'^( +autoscaling\.knative\.dev/min-scale: )"?(\d+)"?$', re.M)


def render_models() -> None:
    """Re-render every deployed model's Service from the template (after editing the template),
    keeping each one's min-scale: the per-model setting the README gives (a model that must
    never make a user wait keeps a pod); everything else comes from the template."""
    for name in models():
        path = FUNCTIONS / "models" / f"{name}.yaml"
        text = render_model(name)
        if path.exists() and (kept := _MIN_SCALE.search(path.read_text())):
            text = _MIN_SCALE.sub(lambda line: f'{line.group(1)}"{kept.group(2)}"', text)
        path.write_text(text)


def add_model(name: str, ref: str | None) -> None:
    if not is_model_name(name):
        raise fail(f"invalid model name {name!r} ({MODEL_NAME_RULE})")
    out = FUNCTIONS / "models" / f"{name}.yaml"
    if out.exists():
        raise fail(f"{out.relative_to(ROOT)} exists")
    if not (ROOT / "models" / name / "model.json").is_file():
        raise fail(f"no bundle models/{name}/model.json: train or import the model first (./train.py)")
    images = read_images((FUNCTIONS / "kustomization.yaml").read_text())
    if ref:
        images[f"thalamus/{name}"] = resolve(ref)
    out.write_text(render_model(name))
    write_functions(images)
    write_catalog()
    write_routing()
    print(
        f"wrote knative/functions/models/{name}.yaml, its image, models.json and routing/virtualservice.yaml"
        + ("" if ref else f"; set its image before applying: knative/manage.py set-image {name} REF")
    )


# -- routing: the VirtualService, from local/routes.py (local/istio.py) --------------------------------


def current_host() -> str:
    found = re.search(r"^  hosts:\n    - (\S+)$", (ROUTING / "virtualservice.yaml").read_text(), re.M)
    return found.group(1) if found else DEFAULT_HOST


def render_routing(host: str | None = None) -> str:
    """routing/virtualservice.yaml's text for the deployed models."""
    header = (
        "# Rendered by knative/manage.py routing from local/routes.py (the table the local gateway uses):\n"
        "# edit those, not this file. Istio takes the first rule that matches.\n"
    )
    return header + istio.to_yaml(istio.virtualservice(models(), host or current_host()))


def write_routing(host: str | None = None) -> None:
    if host is not None and not re.fullmatch(r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}", host):
        raise fail(f"{host!r} is not a host name (e.g. api.example.org)")
    (ROUTING / "virtualservice.yaml").write_text(render_routing(host))


# -- canary --------------------------------------------------------------------------------------


def canaries() -> dict[str, dict[str, str]]:
    """The candidates running, by function: image entry and traffic of canary/FUNCTION.yaml."""
    images = read_images((CANARY / "kustomization.yaml").read_text())
    running = {}
    for path in sorted(CANARY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        text = path.read_text()
        current = re.search(r"revisionName: (\S+)", text)
        percents = re.findall(r"percent: (\d+)", text)
        if not current or len(percents) != 2:
            raise fail(f"{path.relative_to(ROOT)} is not a canary this tool wrote; fix or delete it")
        running[path.stem] = {"current": current.group(1), "percent": percents[1], **images[f"thalamus/{path.stem}"]}
    return running


def write_canaries(running: dict[str, dict[str, str]]) -> None:
    """canary/kustomization.yaml and one patch per candidate: the Component every apply includes."""
    for path in CANARY.glob("*.yaml"):
        if path.name != "kustomization.yaml" and path.stem not in running:
            path.unlink()
    head = "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n"
    if not running:
        idle = "# No canary running. knative/manage.py canary start FUNCTION --image REF starts one (README, Canary).\n"
        (CANARY / "kustomization.yaml").write_text(idle + head + "patches: []\n")
        return
    images = {f"thalamus/{function}": image_entry(canary) for function, canary in running.items()}
    (CANARY / "kustomization.yaml").write_text(
        "# Canaries running (knative/manage.py canary; README, Canary): each candidate's image, and its traffic.\n"
        + head
        + "\n".join(["images:", *image_lines(images), "patches:", *(f"  - path: {f}.yaml" for f in running)])
        + "\n"
    )
    for function, canary in running.items():
        percent = int(canary["percent"])
        (CANARY / f"{function}.yaml").write_text(
            f"# Canary of thalamus-{function}: the candidate's share is the one number to change,\n"
            f"#   knative/manage.py canary set {function} PERCENT   (100 promotes, 0 rolls back)\n"
            "apiVersion: serving.knative.dev/v1\nkind: Service\n"
            f"metadata:\n  name: thalamus-{function}\nspec:\n"
            "  traffic:\n"
            f"    - revisionName: {canary['current']}  # serving when the canary started\n"
            f"      tag: current\n      percent: {100 - percent}\n"
            "    - latestRevision: true  # the candidate, built from the image in kustomization.yaml\n"
            f"      tag: candidate\n      percent: {percent}\n"
        )


def serving_revision(function: str) -> str:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    command = [kubectl or "kubectl", "-n", istio.NAMESPACE, "get", "ksvc", f"thalamus-{function}"]
    found = _run([*command, "-o", "jsonpath={.status.latestReadyRevisionName}"]) if kubectl else None
    if not found:
        shown = " ".join(command)
        raise fail(f"cannot read the revision serving thalamus-{function} ({shown}): pass --current REVISION")
    return found


def canary(args: argparse.Namespace) -> None:
    function = check_function(args.function)
    running = canaries()
    if args.action == "start":
        if function in running:
            raise fail(f"a canary of {function} is running: canary set, finish or abort it first")
        current = args.current or serving_revision(function)
        running[function] = {"current": current, "percent": str(args.percent), **resolve(args.image)}
        write_canaries(running)
        print(f"candidate gets {args.percent}%, {current} the rest: kubectl apply -k knative/ (or knative/routing)")
        return
    if function not in running:
        raise fail(f"no canary of {function} is running")
    if args.action == "set":
        running[function]["percent"] = str(args.percent)
        write_canaries(running)
        print(f"candidate gets {args.percent}%: kubectl apply -k knative/ (or knative/routing)")
        return
    candidate = running.pop(function)
    if args.action == "finish":
        images = read_images((FUNCTIONS / "kustomization.yaml").read_text())
        images[f"thalamus/{function}"] = image_entry(candidate)
        write_functions(images)
    write_canaries(running)
    kept = "the candidate's" if args.action == "finish" else "the current"
    print(f"canary of {function} ended with {kept} image: kubectl apply -k knative/ (or knative/routing)")


# -- command line ------------------------------------------------------------------------------


def percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("a percent is 0..100")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="knative/manage.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-model", help="add a model's Knative Service (its bundle must be in models/)")
    add.add_argument("name")
    add.add_argument("--image", help="its image: repo@sha256:… (or repo:tag, resolved with skopeo/podman)")
    image = sub.add_parser("set-image", help="record a function's image by digest")
    image.add_argument("function", help="token or a model name")
    image.add_argument("image", help="repo@sha256:… (or repo:tag, resolved with skopeo/podman)")
    sub.add_parser("catalog", help="rewrite functions/models.json (the token function's model catalog)")
    sub.add_parser("render", help="re-render functions/models/*.yaml from model-template.yaml")
    routing = sub.add_parser("routing", help="re-render routing/virtualservice.yaml")
    routing.add_argument("--host", help=f"the public host name (default: the current one, else {DEFAULT_HOST})")
    can = sub.add_parser("canary", help="start, shift, finish or abort a canary")
    actions = can.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="send a share of a function's traffic to a candidate image")
    start.add_argument("function")
    start.add_argument("--image", required=True, help="the candidate: repo@sha256:… or repo:tag")
    start.add_argument("--percent", type=percent, default=10, help="the candidate's share (default 10)")
    start.add_argument("--current", help="the revision serving now (default: asked of the cluster with kubectl)")
    shift = actions.add_parser("set", help="the candidate's share: 100 promotes, 0 rolls back")
    shift.add_argument("function")
    shift.add_argument("percent", type=percent)
    for action, text in (("finish", "keep the candidate's image"), ("abort", "keep the current image")):
        actions.add_parser(action, help=f"end the canary and {text}").add_argument("function")
    args = parser.parse_args()
    if args.command == "add-model":
        add_model(args.name, args.image)
    elif args.command == "set-image":
        set_image(args.function, args.image)
    elif args.command == "catalog":
        write_catalog()
    elif args.command == "render":
        render_models()
        print(f"re-rendered {len(models())} model Services from functions/model-template.yaml")
    elif args.command == "routing":
        write_routing(args.host)
    else:
        canary(args)


if __name__ == "__main__":
    main()
