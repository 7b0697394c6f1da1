"""Webhook receiver for tests/it/webhooks.rs: verifies every request with the official
`standardwebhooks` package, parses it with the CloudEvents SDK (structured mode, both its current
and its v1 API), validates the event against schemas/event.schema.json and its `data` against the
schema its `dataschema` names, and logs it as a JSON line (`cloudevent`, `data_valid`: true or why not).

    webhook_receiver.py SECRET LOG_FILE FAIL_FIRST [CHECKS_FILE]

CHECKS_FILE holds a JSON object {name: "whsec_..."}, read on every request (so a test can write
it once it knows the ports): each request is also verified with each of these secrets, and
`checks` in its log line says which accepted it (per-receiver secrets, rotation).

Serves on two ports and prints "PORTS <main> <other>" once listening:
* main  POST /hook      verify, answer 500 to the first FAIL_FIRST deliveries of each webhook-id, then 200
        POST /redirect  302 to the other port (a private address the relay must refuse to follow)
        POST /gone      410
        POST /gone-once 410 to the first request on this path, then 200 (a receiver that comes back)
        POST /ok/...    200
* other: anything       logged; the relay must never reach it
"""

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cloudevents.v1.http
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SCHEMA = json.loads((Path(__file__).parents[2] / "schemas/event.schema.json").read_text())
# The published schema under its own $id, as a consumer's schema registry would hold it.
REGISTRY = Registry().with_resource(SCHEMA["$id"], Resource.from_contents(SCHEMA))

SECRET, LOG, FAIL_FIRST = sys.argv[1], sys.argv[2], int(sys.argv[3])
CHECKS_FILE = Path(sys.argv[4]) if len(sys.argv) > 4 else None


def check_secrets():
    """{name: secret} from CHECKS_FILE, empty until it exists."""
    if CHECKS_FILE is None or not CHECKS_FILE.exists():
        return {}
    return json.loads(CHECKS_FILE.read_text())
lock = threading.Lock()
seen = Counter()
ports = {}


def cloudevent(headers, body):
    """(True or why not, the parsed event or None): what a CloudEvents receiver makes of it."""
    try:
        event = from_http(HTTPMessage(headers, body), JSONFormat())
        cloudevents.v1.http.from_http(headers, body)
    except Exception as e:  # every SDK error: the test reports it
        return f"{type(e).__name__}: {e}"[:500], None
    return True, event


def data_valid(event, body):
    """True, or why the event or its data does not match the schemas it names."""
    if event is None:
        return "not a CloudEvent"
    if not event.get_dataschema():
        return "no dataschema"
    try:
        for schema, value in [(SCHEMA, json.loads(body)),
                              ({"$ref": event.get_dataschema()}, event.get_data())]:
            errors = [e.message for e in
                      Draft202012Validator(schema, registry=REGISTRY).iter_errors(value)]
            if errors:
                return "; ".join(errors)[:500]
    except Exception as e:  # an unresolvable dataschema
        return f"{type(e).__name__}: {e}"[:500]
    return True


def log(entry):
    with lock, open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


class Main(BaseHTTPRequestHandler):
    server_name = "main"

    def log_message(self, *args):
        pass

    def answer(self, status, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            Webhook(SECRET).verify(body, headers)
            verified = True
        except WebhookVerificationError as e:
            verified = str(e)
        checks = {}
        for name, secret in check_secrets().items():
            try:
                Webhook(secret).verify(body, headers)
                checks[name] = True
            except WebhookVerificationError:
                checks[name] = False
        wid = headers.get("webhook-id")
        with lock:
            seen[(self.path, wid)] += 1
            n = seen[(self.path, wid)]
            seen[self.path] += 1
            on_path = seen[self.path]
        event = json.loads(body) if body else {}
        parsed, ce = cloudevent(headers, body)
        entry = {"server": self.server_name, "path": self.path, "id": wid, "n": n,
                 "verified": verified, "type": event.get("type"), "subject": event.get("subject"),
                 "content_type": headers.get("content-type"), "cloudevent": parsed,
                 "source": ce and ce.get_source(), "data_valid": data_valid(ce, body),
                 "checks": checks, "signatures": len(headers.get("webhook-signature", "").split())}
        if self.server_name == "other":
            log(entry)
            return self.answer(200)
        if self.path == "/hook":
            status = 500 if n <= FAIL_FIRST else 200
            log({**entry, "status": status})
            return self.answer(status)
        if self.path == "/redirect":
            log({**entry, "status": 302})
            return self.answer(302, [("Location", f"http://127.0.0.1:{ports['other']}/stolen")])
        if self.path == "/gone" or (self.path == "/gone-once" and on_path == 1):
            log({**entry, "status": 410})
            return self.answer(410)
        if self.path == "/gone-once" or self.path.startswith("/ok/"):
            log({**entry, "status": 200})
            return self.answer(200)
        log({**entry, "status": 404})
        return self.answer(404)


class Other(Main):
    server_name = "other"


main = ThreadingHTTPServer(("127.0.0.1", 0), Main)
other = ThreadingHTTPServer(("127.0.0.1", 0), Other)
ports["main"], ports["other"] = main.server_address[1], other.server_address[1]
threading.Thread(target=other.serve_forever, daemon=True).start()
print(f"PORTS {ports['main']} {ports['other']}", flush=True)
main.serve_forever()
