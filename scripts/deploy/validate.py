"""Validates rendered Kubernetes manifests, KEDA resources and docker/compose.yaml offline.

Usage: validate.py RENDERED.yaml...  (run by scripts/deploy/check.sh from the repository root)

* Kubernetes kinds: kubernetes-validate, strict (unknown fields are errors), against the schemas of
  KUBERNETES_VERSION (default 1.32.0).
* keda.sh kinds: the openAPIV3Schema of KEDA's own CRDs (../shared/schemas/keda), strict too.
* docker/compose.yaml: the Compose Specification JSON Schema (../shared/schemas/compose).
A missing schema directory is reported loudly and fails the run unless T2I_ALLOW_MISSING_SCHEMAS=1.
"""

import json
import os
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("KUBERNETES_VERSION", "1.32.0")


def schema_dir() -> Path | None:
    candidates = [os.environ.get("T2I_SHARED_SCHEMAS"), "../shared/schemas", "/work/shared/schemas"]
    for c in candidates:
        if c and Path(c, "keda").is_dir() and Path(c, "compose").is_dir():
            return Path(c)
    return None


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
    """kind → JSON Schema of its served version, from the CRD files."""
    out = {}
    for f in sorted((root / "keda").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                schema = strict(v["schema"]["openAPIV3Schema"])
                # metadata is the ObjectMeta every resource has; the CRD leaves it open.
                schema["properties"]["metadata"] = {"type": "object"}
                out[(f"{crd['spec']['group']}/{v['name']}", kind)] = schema
    return out


def main(paths: list[str]) -> int:
    errors = 0
    root = schema_dir()
    if root is None:
        print("!! KEDA and Compose schemas NOT FOUND (set T2I_SHARED_SCHEMAS): those checks are skipped",
              file=sys.stderr)
        if os.environ.get("T2I_ALLOW_MISSING_SCHEMAS") != "1":
            return 1
    keda = keda_schemas(root) if root else {}
    for p in paths:
        docs = [d for d in yaml.safe_load_all(Path(p).read_text()) if d]
        print(f"== {Path(p).name}: {len(docs)} resources")
        for d in docs:
            api, kind, name = d.get("apiVersion", ""), d.get("kind", ""), d["metadata"]["name"]
            label = f"{kind}/{name}"
            if api.startswith("keda.sh/"):
                if not root:
                    continue
                schema = keda.get((api, kind))
                if schema is None:
                    print(f"FAIL {label}: no KEDA CRD schema for {api} {kind}")
                    errors += 1
                    continue
                problems = list(jsonschema.Draft7Validator(schema).iter_errors(d))
                for e in problems:
                    print(f"FAIL {label}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
                errors += len(problems)
                if not problems:
                    print(f"ok   {label} (KEDA CRD schema)")
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                print(f"ok   {label} (Kubernetes {K8S_VERSION}, strict)")
            except kubernetes_validate.ValidationError as e:
                print(f"FAIL {label}: {'/'.join(map(str, e.path))}: {e.message}")
                errors += 1
    if root:
        compose = yaml.safe_load(Path("docker/compose.yaml").read_text())
        schema = json.loads((root / "compose" / "compose-spec.json").read_text())
        problems = list(jsonschema.Draft7Validator(schema).iter_errors(compose))
        for e in problems:
            print(f"FAIL docker/compose.yaml: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        errors += len(problems)
        if not problems:
            print("ok   docker/compose.yaml (Compose Specification schema)")
    print(f"{errors} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
