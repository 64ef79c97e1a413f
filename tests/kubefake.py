"""A small in-process kube-apiserver for tests: the subset the master and agents use.

Nodes (cluster-scoped), Secrets, Leases, DaemonSets and core/v1 Events (namespaced), over
real HTTP on 127.0.0.1 so that the official `kubernetes` client talks to it unmodified.
What it keeps of the real semantics:
- a global resourceVersion; 409 Conflict on a PUT whose resourceVersion is stale and on a
  POST of an existing name; 404;
- labelSelector (k=v, k!=v, k, !k); fieldSelector on metadata.name and metadata.namespace
  (400 for any other field, as the real server answers for most kinds);
- watch with resourceVersion and timeoutSeconds, chunked JSON lines, and a 410 Gone ERROR
  event for a resourceVersion older than the retained history (`compact()` drops it);
- DELETE with DeleteOptions.propagationPolicy as a watch sees it: Background (the default)
  deletes at once; Foreground and Orphan first set deletionTimestamp and their finalizer
  (MODIFIED), then, the garbage collector's part done, drop it and delete (DELETED);
- on a write: 400 if the body's namespace is not the URL's, 422 without a name
  (generateName gets a random suffix), and for Events the API server's own validation of
  core/v1 Events (legacyValidateEvent: the involved object's namespace must be the Event's,
  or empty only for an Event in "default"; with an eventTime, reportingController,
  reportingInstance, action and reason are required), each as a 422 Invalid Status.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

ROUTES = [
    (re.compile(r"^/api/v1/nodes(?:/([^/]+))?$"), "nodes", "v1", "Node", False),
    (
        re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?$"),
        "secrets",
        "v1",
        "Secret",
        True,
    ),
    (
        re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$"),
        "leases",
        "coordination.k8s.io/v1",
        "Lease",
        True,
    ),
    (
        re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/daemonsets(?:/([^/]+))?$"),
        "daemonsets",
        "apps/v1",
        "DaemonSet",
        True,
    ),
    (
        re.compile(r"^/api/v1/namespaces/([^/]+)/events(?:/([^/]+))?$"),
        "events",
        "v1",
        "Event",
        True,
    ),
]
_QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_event(event: dict[str, Any], ns: str) -> list[str]:
    """kube-apiserver's legacyValidateEvent for a core/v1 create (pkg/apis/core/validation/
    events.go): the rules every Event passes, whatever API version created it."""
    errors = []
    involved = event.get("involvedObject") or {}
    involved_ns = involved.get("namespace") or ""
    mismatch = (
        f'involvedObject.namespace: Invalid value: "{involved_ns}": does not match event.namespace'
    )
    if not event.get("eventTime"):
        if not involved_ns:
            if ns not in ("", "default"):
                errors.append(mismatch)
        elif involved_ns != ns:
            errors.append(mismatch)
    else:
        if not involved_ns and ns not in ("default", "kube-system"):
            errors.append(mismatch)
        controller = event.get("reportingComponent") or ""
        if not controller:
            errors.append("reportingController: Required value")
        elif not _QUALIFIED_NAME.match(controller) or len(controller.split("/")[-1]) > 63:
            errors.append(f'reportingController: Invalid value: "{controller}"')
        instance = event.get("reportingInstance") or ""
        if not instance:
            errors.append("reportingInstance: Required value")
        elif len(instance) > 128:
            errors.append("reportingInstance: Invalid value: can have at most 128 characters")
        if not event.get("action"):
            errors.append("action: Required value")
        elif len(event["action"]) > 128:
            errors.append("action: Invalid value: can have at most 128 characters")
        if not event.get("reason"):
            errors.append("reason: Required value")
        elif len(event["reason"]) > 128:
            errors.append("reason: Invalid value: can have at most 128 characters")
        if len(event.get("message") or "") > 1024:
            errors.append("message: Invalid value: can have at most 1024 characters")
    if ns and not (_DNS_SUBDOMAIN.match(ns) and len(ns) <= 253):
        errors.append(f'namespace: Invalid value: "{ns}"')
    return errors


VALIDATORS: dict[str, Callable[[dict[str, Any], str], list[str]]] = {"events": validate_event}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term.strip() not in labels:
            return False
    return True


FIELDS = {"metadata.name": "name", "metadata.namespace": "namespace"}


def field_terms(selector: str | None) -> list[tuple[str, str, bool]]:
    """(metadata key, value, equal) per term; ValueError names an unsupported field."""
    terms = []
    for term in filter(None, (selector or "").split(",")):
        equal = "!=" not in term
        field, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        if field.strip() not in FIELDS:
            raise ValueError(f'field label not supported: "{field.strip()}"')
        terms.append((FIELDS[field.strip()], value.strip(), equal))
    return terms


def fields_match(terms: list[tuple[str, str, bool]], obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    return all((meta.get(key, "") == value) == equal for key, value, equal in terms)


class FakeKube:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.rv = 0
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []  # rv, res, ns, type, obj
        self.oldest = 0  # watches from a resourceVersion below this get 410 Gone
        self.before_write: Callable[[str, str, str], None] | None = None  # method, resource, name
        self.writes: list[tuple[str, str, str, int]] = []  # method, resource, name, HTTP code
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # The store, also used directly by tests (as another client would through the API).
    def get(self, resource: str, name: str, ns: str = "") -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((resource, ns, name))
            return json.loads(json.dumps(obj)) if obj else None

    def apply(self, resource: str, obj: dict[str, Any], ns: str = "") -> dict[str, Any]:
        """Create or overwrite, unconditionally (a test's out-of-band writer)."""
        with self.cond:
            exists = (resource, ns, obj["metadata"]["name"]) in self.objects
            return self._store(resource, ns, obj, "MODIFIED" if exists else "ADDED")

    def delete(
        self, resource: str, name: str, ns: str = "", policy: str = "Background"
    ) -> dict[str, Any] | None:
        """Foreground and Orphan pass through a MODIFIED with deletionTimestamp and their
        finalizer first; the garbage collector then drops it, which deletes the object."""
        with self.cond:
            obj = self.objects.get((resource, ns, name))
            if obj is None:
                return None
            finalizer = {"Foreground": "foregroundDeletion", "Orphan": "orphan"}.get(policy)
            if finalizer:
                meta = obj["metadata"]
                meta["deletionTimestamp"] = _now()
                meta["finalizers"] = [*meta.get("finalizers", []), finalizer]
                self._store(resource, ns, obj, "MODIFIED")
                meta["finalizers"].remove(finalizer)
            del self.objects[resource, ns, name]
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._event(resource, ns, "DELETED", obj)
            return obj

    def node(self, name: str, ip: str | None, labels: dict[str, str] | None = None) -> None:
        addresses = [{"type": "Hostname", "address": name}]
        if ip:
            addresses.append({"type": "InternalIP", "address": ip})
        self.apply(
            "nodes",
            {
                "metadata": {"name": name, "labels": labels or {}},
                "status": {"addresses": addresses},
            },
        )

    def compact(self) -> None:
        """Forget the event history: older watches must relist (410 Gone)."""
        with self.cond:
            self.events.clear()
            self.oldest = self.rv + 1

    def _store(self, resource: str, ns: str, obj: dict[str, Any], kind: str) -> dict[str, Any]:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        old = self.objects.get((resource, ns, meta["name"]), {}).get("metadata", {})
        meta.update(
            resourceVersion=str(self.rv),
            uid=old.get("uid", str(uuid.uuid4())),
            creationTimestamp=old.get("creationTimestamp", _now()),
        )
        if ns:
            meta["namespace"] = ns
        route = next(r for r in ROUTES if r[1] == resource)
        obj["apiVersion"], obj["kind"] = route[2], route[3]
        self.objects[resource, ns, meta["name"]] = obj
        self._event(resource, ns, kind, obj)
        return json.loads(json.dumps(obj))

    def _event(self, resource: str, ns: str, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((self.rv, resource, ns, kind, json.loads(json.dumps(obj))))
        self.cond.notify_all()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _handler(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *_: Any) -> None:
            pass

        def _route(self) -> tuple[str, str, str | None, dict[str, list[str]]] | None:
            url = urlparse(self.path)
            for pattern, resource, _, _, namespaced in ROUTES:
                match = pattern.match(url.path)
                if match:
                    ns, name = (match[1], match[2]) if namespaced else ("", match[1])
                    return resource, ns, name, parse_qs(url.query)
            self._send(404, status(404, "NotFound", f"no route {url.path}"))
            return None

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def do_GET(self) -> None:
            route = self._route()
            if route is None:
                return
            resource, ns, name, query = route
            if name:
                obj = kube.get(resource, name, ns)
                if obj is None:
                    return self._send(
                        404, status(404, "NotFound", f'{resource} "{name}" not found')
                    )
                return self._send(200, obj)
            selector = query.get("labelSelector", [None])[0]
            try:
                fields = field_terms(query.get("fieldSelector", [None])[0])
            except ValueError as exc:
                return self._send(400, status(400, "BadRequest", str(exc)))
            if query.get("watch", ["false"])[0] in ("true", "1"):
                return self._watch(resource, ns, selector, fields, query)
            with kube.cond:
                items = [
                    o
                    for (r, n, _), o in sorted(kube.objects.items())
                    if r == resource
                    and n == ns
                    and matches(selector, o["metadata"].get("labels") or {})
                    and fields_match(fields, o)
                ]
                body = {
                    "kind": "List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(kube.rv)},
                    "items": items,
                }
                self._send(200, json.loads(json.dumps(body)))

        def _watch(
            self,
            resource: str,
            ns: str,
            selector: str | None,
            fields: list[tuple[str, str, bool]],
            query: dict,
        ) -> None:
            since = int(query.get("resourceVersion", ["0"])[0] or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds", ["30"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with kube.cond:
                if since and since < kube.oldest - 1:
                    gone = status(410, "Expired", f"too old resource version: {since}")
                    self._chunk({"type": "ERROR", "object": gone})
                    return self._chunk(None)
                if not since:  # like the real server: the current state first, as ADDED
                    for (r, n, _), obj in sorted(kube.objects.items()):
                        if r == resource and n == ns and fields_match(fields, obj):
                            self._chunk({"type": "ADDED", "object": obj})
                    since = kube.rv
                while (left := deadline - time.monotonic()) > 0:
                    for rv, r, n, kind, obj in kube.events:
                        labels = obj["metadata"].get("labels") or {}
                        if (
                            rv > since
                            and r == resource
                            and n == ns
                            and matches(selector, labels)
                            and fields_match(fields, obj)
                        ):
                            self._chunk({"type": kind, "object": obj})
                    since = kube.rv
                    kube.cond.wait(min(left, 0.5))
            self._chunk(None)

        def _chunk(self, event: dict[str, Any] | None) -> None:
            data = (json.dumps(event) + "\n").encode() if event else b""
            try:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            except OSError:
                pass

        def _write(self, method: str) -> None:
            route = self._route()
            if route is None:
                return
            resource, ns, name, _ = route
            body = self._body()
            meta = body.setdefault("metadata", {})
            kind = next(r[3] for r in ROUTES if r[1] == resource)
            if meta.get("namespace") and meta["namespace"] != ns:
                message = (
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
                return self._send(400, status(400, "BadRequest", message))
            if method == "POST" and not meta.get("name") and meta.get("generateName"):
                suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                meta["name"] = meta["generateName"] + suffix
            name = name or meta.get("name", "")
            errors = (
                [] if name else ["metadata.name: Required value: name or generateName is required"]
            )
            if method in ("POST", "PUT") and resource in VALIDATORS:
                errors += VALIDATORS[resource](body, ns)
            if errors:
                message = f'{kind} "{name}" is invalid: {"; ".join(errors)}'
                kube.writes.append((method, resource, name, 422))
                return self._send(422, status(422, "Invalid", message))
            if kube.before_write:
                kube.before_write(method, resource, name)
            with kube.cond:
                current = kube.objects.get((resource, ns, name))
                wanted = body.get("metadata", {}).get("resourceVersion")
                if method == "POST" and current is not None:
                    code, reply = (
                        409,
                        status(409, "AlreadyExists", f'{resource} "{name}" already exists'),
                    )
                elif method == "PUT" and current is None:
                    code, reply = 404, status(404, "NotFound", f'{resource} "{name}" not found')
                elif (
                    method == "PUT" and wanted and wanted != current["metadata"]["resourceVersion"]
                ):
                    message = f'cannot update {resource} "{name}": the object has been modified'
                    code, reply = 409, status(409, "Conflict", message)
                else:
                    code = 201 if method == "POST" else 200
                    reply = kube._store(
                        resource, ns, body, "ADDED" if method == "POST" else "MODIFIED"
                    )
                kube.writes.append((method, resource, name, code))
            self._send(code, reply)

        def do_POST(self) -> None:
            self._write("POST")

        def do_PUT(self) -> None:
            self._write("PUT")

        def do_DELETE(self) -> None:
            route = self._route()
            if route is None:
                return
            resource, ns, name, query = route
            options = self._body() if int(self.headers.get("Content-Length") or 0) else {}
            policy = options.get("propagationPolicy") or query.get("propagationPolicy", [""])[0]
            obj = kube.delete(resource, name or "", ns, policy or "Background")
            if obj is None:
                return self._send(404, status(404, "NotFound", f'{resource} "{name}" not found'))
            self._send(200, obj)

    return Handler
