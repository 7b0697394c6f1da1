"""Validates rendered Kubernetes manifests, KEDA resources, docker/compose.yaml and the AsyncAPI
document of the message contract offline.

Usage: validate.py RENDERED.yaml...  (run by scripts/deploy/check.sh from the repository root)

* Kubernetes kinds: kubernetes-validate, strict (unknown fields are errors), against the schemas of
  KUBERNETES_VERSION (default 1.32.0) that the package ships.
* keda.sh kinds: the openAPIV3Schema of KEDA's own CRDs (schemas/keda beside this file), strict too.
* docker/compose.yaml: the Compose Specification JSON Schema (schemas/compose beside this file).
* schemas/asyncapi.yaml: parses as YAML, is AsyncAPI 3, and every `$ref` resolves (`#/...` inside it,
  a file name to a JSON Schema beside it).
* infra/base/monitoring: the Prometheus rule file (groups of rules, each with a name, an expression,
  a duration, a severity and a summary) and the Grafana dashboard (JSON, unique panel ids, a query
  in every target); every `t2i_` metric they query is one the README's Observability paragraph
  names, every RabbitMQ one is in RABBITMQ_METRICS, and parentheses balance.
The schemas are vendored in the repository (schemas/README.md says where they come from). Nothing is
ever skipped: a missing schema, an unknown kind or an unreadable file is a failure.
"""

import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("KUBERNETES_VERSION", "1.32.0")


SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE_FILE = Path("docker/compose.yaml")
ASYNCAPI_FILE = Path("schemas/asyncapi.yaml")
ALERTS_FILE = Path("infra/base/monitoring/alerts.yaml")
DASHBOARD_FILE = Path("infra/base/monitoring/dashboard.json")
README_FILE = Path("README.md")
# RabbitMQ exporter (rabbitmq_prometheus) series the rules and dashboard rely on, per-object mode.
RABBITMQ_METRICS = {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


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


def expr_problems(expr, where: str, known: set) -> list[str]:
    """An expression that is a non-empty string, with balanced brackets, naming known metrics."""
    if not isinstance(expr, str) or not expr.strip():
        return [f"{where}: no expression"]
    problems = []
    depth = 0
    for c in re.sub(r'"(\\.|[^"\\])*"', '""', expr):  # brackets inside label values do not count
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            break
    if depth != 0:
        problems.append(f"{where}: unbalanced parentheses")
    for name in re.findall(r"\b(?:t2i|rabbitmq)_[a-z0-9_]+", re.sub(r'"[^"]*"', '""', expr)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in known and base not in known:
            problems.append(f"{where}: unknown metric {name}")
    return problems


def monitoring_problems(alerts: Path, dashboard: Path, readme: Path) -> list[str]:
    """What is wrong with the alert rules and the dashboard (see the module docstring)."""
    known = set(re.findall(r"\bt2i_[a-z0-9_]+", readme.read_text())) | RABBITMQ_METRICS
    problems = []
    try:
        doc = yaml.safe_load(alerts.read_text())
    except yaml.YAMLError as e:
        return [f"{alerts}: not YAML: {e}"]
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        problems.append(f"{alerts}: no rule groups")
        groups = []
    for g in groups:
        gname = g.get("name") if isinstance(g, dict) else None
        rules = g.get("rules") if isinstance(g, dict) else None
        if not gname or not isinstance(rules, list) or not rules:
            problems.append(f"{alerts}: a group without a name or rules")
            continue
        for r in rules:
            where = f"{alerts}: {gname}/{r.get('alert', '?')}"
            extra = set(r) - {"alert", "expr", "for", "labels", "annotations"}
            if extra:
                problems.append(f"{where}: unknown keys {sorted(extra)}")
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", str(r.get("alert", ""))):
                problems.append(f"{where}: alert name missing or not CamelCase")
            if not DURATION.match(str(r.get("for", ""))):
                problems.append(f"{where}: `for` is not a Prometheus duration")
            if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{where}: severity is not warning or critical")
            if not (r.get("annotations") or {}).get("summary"):
                problems.append(f"{where}: no summary annotation")
            problems.extend(expr_problems(r.get("expr"), where, known))
    try:
        dash = json.loads(dashboard.read_text())
    except ValueError as e:
        return problems + [f"{dashboard}: not JSON: {e}"]
    panels = dash.get("panels") if isinstance(dash, dict) else None
    if not dash.get("title") or not dash.get("uid") or not isinstance(panels, list) or not panels:
        return problems + [f"{dashboard}: no title, uid or panels"]
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or None in ids:
        problems.append(f"{dashboard}: panel ids missing or repeated")
    for p in panels:
        where = f"{dashboard}: panel {p.get('title', '?')!r}"
        if not p.get("targets"):
            problems.append(f"{where}: no targets")
        for t in p.get("targets", []):
            problems.extend(expr_problems(t.get("expr"), where, known))
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
                           ASYNCAPI_FILE, ALERTS_FILE, DASHBOARD_FILE, README_FILE]
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
    checked += 2
    problems = monitoring_problems(ALERTS_FILE, DASHBOARD_FILE, README_FILE)
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        print(f"ok   {ALERTS_FILE}, {DASHBOARD_FILE} (structure, metric names known)")
    errors += len(problems)
    print(f"{checked} checked, {errors} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
