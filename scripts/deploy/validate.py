"""Validates rendered Kubernetes manifests, KEDA resources, docker/compose.yaml and the AsyncAPI
document of the message contract offline.

Usage: validate.py RENDERED.yaml...  (run by scripts/deploy/check.sh from the repository root)

* Kubernetes kinds: kubernetes-validate, strict (unknown fields are errors), against the schemas of
  KUBERNETES_VERSION (default 1.32.0) that the package ships.
* keda.sh kinds: the openAPIV3Schema of KEDA's own CRDs (schemas/keda beside this file), strict too.
* docker/compose.yaml: the Compose Specification JSON Schema (schemas/compose beside this file).
* schemas/asyncapi.yaml: parses as YAML, is AsyncAPI 3, and every `$ref` resolves (`#/...` inside it,
  a file name to a JSON Schema beside it).
The schemas are vendored in the repository (schemas/README.md says where they come from). Nothing is
ever skipped: a missing schema, an unknown kind or an unreadable file is a failure.
"""

import json
import os
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("KUBERNETES_VERSION", "1.32.0")


SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE_FILE = Path("docker/compose.yaml")
ASYNCAPI_FILE = Path("schemas/asyncapi.yaml")


def strict(schema):
    """Unknown fields become errors, as kubernetes-validate --strict does for built-in kinds (the API
    server would silently prune them, so a misspelt field would just be ignored in the cluster)."""
    if isinstance(schema, dict):
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def keda_schemas(root: Path) -> dict:
    """(apiVersion, kind) → JSON Schema of each served version, from the CRD files."""
    out = {}
    files = sorted(root.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no KEDA CRD files in {root}")
    for f in files:
        crd = yaml.safe_load(f.read_text())
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                schema = strict(v["schema"]["openAPIV3Schema"])
                # metadata is the ObjectMeta every resource has; the CRD leaves it open.
                schema["properties"]["metadata"] = {"type": "object"}
                out[(f"{crd['spec']['group']}/{v['name']}", kind)] = schema
    return out


def asyncapi_problems(path: Path) -> list[str]:
    """What is wrong with the AsyncAPI document: YAML errors, the version, unresolvable `$ref`s."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return [f"not YAML: {e}"]
    if not isinstance(doc, dict) or not str(doc.get("asyncapi", "")).startswith("3."):
        return ["not an AsyncAPI 3 document"]
    problems = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    problems.extend(f"{where}: {p}" for p in resolve(v))
                else:
                    walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    def resolve(ref):
        if not isinstance(ref, str):
            return [f"$ref {ref!r} is not a string"]
        if ref.startswith("#/"):
            target = doc
            for part in ref[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    return [f"$ref {ref} does not resolve"]
                target = target[part]
            return []
        file = path.parent / ref
        try:
            json.loads(file.read_text())
        except (OSError, ValueError) as e:
            return [f"$ref {ref}: {e}"]
        return []

    walk(doc, "")
    return problems


def report(label: str, problems: list, what: str) -> int:
    for e in problems:
        print(f"FAIL {label}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    if not problems:
        print(f"ok   {label} ({what})")
    return len(problems)


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: validate.py RENDERED.yaml...", file=sys.stderr)
        return 2
    # Every input must be there before anything is checked: a missing file is an error, not a skip.
    missing = [p for p in [*paths, COMPOSE_FILE, SCHEMAS / "compose" / "compose-spec.json",
                           ASYNCAPI_FILE]
               if not Path(p).is_file()]
    if missing:
        for p in missing:
            print(f"FAIL missing file: {p}")
        return 1
    try:
        keda = keda_schemas(SCHEMAS / "keda")
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        print(f"FAIL KEDA CRD schemas ({SCHEMAS / 'keda'}): {e!r}")
        return 1
    compose_schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())

    errors = 0
    checked = 0
    for p in paths:
        docs = [d for d in yaml.safe_load_all(Path(p).read_text()) if d]
        print(f"== {Path(p).name}: {len(docs)} resources")
        if not docs:
            print(f"FAIL {p}: no resources rendered")
            errors += 1
        for d in docs:
            api, kind = d.get("apiVersion", ""), d.get("kind", "")
            label = f"{kind}/{d.get('metadata', {}).get('name', '?')}"
            checked += 1
            if api.startswith("keda.sh/"):
                schema = keda.get((api, kind))
                if schema is None:
                    print(f"FAIL {label}: no KEDA CRD schema for {api} {kind}")
                    errors += 1
                    continue
                errors += report(label, list(jsonschema.Draft7Validator(schema).iter_errors(d)),
                                 "KEDA CRD schema")
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                print(f"ok   {label} (Kubernetes {K8S_VERSION}, strict)")
            except kubernetes_validate.ValidationError as e:
                print(f"FAIL {label}: {'/'.join(map(str, e.path))}: {e.message}")
                errors += 1
            except kubernetes_validate.SchemaNotFoundError:
                print(f"FAIL {label}: no Kubernetes {K8S_VERSION} schema for {api} {kind}")
                errors += 1
            except Exception as e:  # an invalid schema, an unsupported version: never a silent pass
                print(f"FAIL {label}: {api} {kind}: {e!r}")
                errors += 1

    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    checked += 1
    problems = list(jsonschema.Draft7Validator(compose_schema).iter_errors(compose))
    errors += report(str(COMPOSE_FILE), problems, "Compose Specification schema")
    checked += 1
    problems = asyncapi_problems(ASYNCAPI_FILE)
    for p in problems:
        print(f"FAIL {ASYNCAPI_FILE}: {p}")
    if not problems:
        print(f"ok   {ASYNCAPI_FILE} (YAML, AsyncAPI 3, every $ref resolves)")
    errors += len(problems)
    print(f"{checked} checked, {errors} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
