"""The sandbox's HTTP layer: a quiet, loopback-only ``ThreadingHTTPServer`` speaking Klaviyo's API.

Why stdlib: tests and the demo need a real socket (real HTTP, real resets and timeouts) without
extra dependencies. The handler is a thin shell: it parses the request, lets
:mod:`faults` decide whether to misbehave, hands everything else to :class:`SandboxApp`, writes
the answer in one ``send`` (with TCP_NODELAY, so keep-alive clients never wait on Nagle), and
records the request in ``state.requests``. It never logs, and never prints the API key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from klaviyo_pipelines.collector import fewer_full_collections
from klaviyo_pipelines.klaviyo.endpoints import endpoint_class
from klaviyo_pipelines.sandbox.app import SandboxApp
from klaviyo_pipelines.sandbox.errors import ApiError, throttled
from klaviyo_pipelines.sandbox.faults import Fault, FaultInjector
from klaviyo_pipelines.sandbox.jobs import JobWorker
from klaviyo_pipelines.sandbox.messages import ApiRequest, ApiResponse
from klaviyo_pipelines.sandbox.ratelimit import RateLimiter
from klaviyo_pipelines.sandbox.state import RequestRecord, SandboxState

JSON_API = "application/vnd.api+json"
MAX_READ_BYTES = 64 * 1024 * 1024  # refuse to even read bodies beyond this
_STATUS_CODES = {
    500: "error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Handler(BaseHTTPRequestHandler):
    """One connection; serves keep-alive requests until the client or the sandbox closes it."""

    protocol_version = "HTTP/1.1"
    server_version = "klaviyo-sandbox"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: request lines can carry filters with emails; never risk leaking anything."""

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

    # ---- request ----------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The body, or None after answering (and closing) for a body that cannot be read."""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self._refuse(400, "parse_error", "Malformed Content-Length or chunked body.")
            return None
        if length > MAX_READ_BYTES:
            self._refuse(413, "payload_too_large", "Request body too large.")
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_READ_BYTES:
                self._refuse(413, "payload_too_large", "Request body too large.")
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer an unreadable request and close the connection (its framing is unknown)."""
        self.close_connection = True
        self._send(ApiError.single(status, code, detail).document(), status)

    def _serve(self) -> None:
        sandbox = self.server.sandbox
        if sandbox.stopping:
            self.close_connection = True
            return
        body = self._read_body()
        if body is None:
            return
        path, _, raw_query = self.path.partition("?")
        method = self.command
        fault = sandbox.faults.pick(method, path)
        if fault is not None:
            self._fault(fault, method, path, raw_query, body)
            return
        response = sandbox.app.handle(self._request(method, path, raw_query, body))
        # Record before answering, so a client that got its response always finds the record.
        sandbox.state.record_request(
            RequestRecord(
                method,
                path,
                response.status,
                response.endpoint,
                response.items,
                len(body),
                response.operation,
            )
        )
        self._answer(response)

    def _request(self, method: str, path: str, raw_query: str, body: bytes) -> ApiRequest:
        headers = {key.lower(): value for key, value in self.headers.items()}
        query = parse_qsl(raw_query, keep_blank_values=True)
        return ApiRequest(method, path, query, headers, body)

    # ---- faults ------------------------------------------------------------------------------

    def _fault(self, fault: Fault, method: str, path: str, raw_query: str, body: bytes) -> None:
        sandbox = self.server.sandbox
        operation, items = sandbox.app.count_raw_items(method, path, body)
        endpoint = endpoint_class(method, path).name

        def record(status: int) -> None:
            sandbox.state.record_request(
                RequestRecord(
                    method, path, status, endpoint, items, len(body), operation, fault.kind
                )
            )

        if fault.kind == "reset":
            record(0)
            self._reset()
        elif fault.kind == "timeout":
            record(0)
            sandbox.stop_event.wait(fault.delay)
            self.close_connection = True  # drop without answering
        elif fault.kind == "rate_limit":
            retry_after = sandbox.limiter.format_seconds(fault.retry_after, at_least_a_tick=True)
            error = throttled(retry_after)
            record(429)
            self._send(error.document(), 429, error.headers)
        else:
            if fault.kind == "applied_status":
                sandbox.app.handle(self._request(method, path, raw_query, body))
            record(fault.status)
            self._send_fault_status(fault)

    def _send_fault_status(self, fault: Fault) -> None:
        if fault.body is not None:
            kind = "text/html" if fault.body.lstrip().startswith("<") else "text/plain"
            self._send_raw(
                fault.status, fault.body.encode(), {"Content-Type": f"{kind}; charset=utf-8"}
            )
            return
        code = _STATUS_CODES.get(fault.status, "error")
        detail = f"The sandbox injected a {fault.status} {_reason(fault.status)} response."
        self._send(ApiError.single(fault.status, code, detail).document(), fault.status)

    def _reset(self) -> None:
        """Close with RST: SO_LINGER(on, 0) then close, so the client sees ECONNRESET."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # drop the makefile() reference so close() really closes
            self.connection.close()
        except OSError:
            pass

    # ---- response ----------------------------------------------------------------------------

    def _answer(self, response: ApiResponse) -> None:
        self._send(response.document, response.status, response.headers)

    def _send(self, document: Any, status: int, headers: dict[str, str] | None = None) -> None:
        payload = b"" if document is None else json.dumps(document, separators=(",", ":")).encode()
        extra = dict(headers or {})
        if payload:
            extra.setdefault("Content-Type", JSON_API)
        self._send_raw(status, payload, extra)

    def _send_raw(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if status != 204 and status >= 200:
            lines.append(f"Content-Length: {len(payload)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + payload)
        except OSError:  # the client went away (e.g. its own timeout fired)
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    """Daemon threads, a deep accept backlog, silent errors, and tracked connections so
    ``stop()`` can close idle keep-alive sockets instead of leaving them served by stale threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sandbox: Sandbox, family: int) -> None:
        self.address_family = family
        self.sandbox = sandbox
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow per-connection errors (resets, broken pipes): they are the client's business."""


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"the sandbox binds to loopback only; {host!r} is not an IP address"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"the sandbox binds to loopback only; refusing {host!r}")
    return str(address)


class Sandbox:
    """A Klaviyo-compatible API server on loopback, for tests and the demo.

    ``time_scale`` > 1 shortens rate-limit windows (1 s / scale, 60 s / scale); ``job_delay`` is
    how long (real seconds) bulk import jobs stay ``queued`` and then ``processing``; ``scopes``
    (None = full access) restricts the key like a Klaviyo private key's scopes."""

    def __init__(
        self,
        api_key: str = "pk_sandbox_test",
        host: str = "127.0.0.1",
        port: int = 0,
        time_scale: float = 1.0,
        enforce_rate_limits: bool = True,
        job_delay: float = 0.0,
        scopes: Iterable[str] | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.host = _loopback_host(host)
        self.port = port
        self.state = SandboxState()
        self.faults = FaultInjector()
        self.limiter = RateLimiter(time_scale)
        self.worker = JobWorker()
        self.app = SandboxApp(
            api_key=api_key,
            state=self.state,
            worker=self.worker,
            limiter=self.limiter,
            scopes=scopes,
            enforce_rate_limits=enforce_rate_limits,
            job_delay=job_delay,
        )
        self.stop_event = threading.Event()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._collections = contextlib.ExitStack()

    def __repr__(self) -> str:  # never include the key
        return f"Sandbox(url={self.url if self._server else None!r})"

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the sandbox is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def reject_profile(self) -> Callable[[dict[str, Any]], str | None] | None:
        return self.state.reject_profile

    @reject_profile.setter
    def reject_profile(self, hook: Callable[[dict[str, Any]], str | None] | None) -> None:
        self.state.reject_profile = hook

    def start(self) -> Sandbox:
        if self._server is not None:
            return self
        self.stop_event.clear()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _HTTPServer((self.host, self.port), self, family)
        self.port = self._server.server_address[1]
        self.app.base_url = self.url
        # Profiles pile up in memory like rows in a database; full collections walking them
        # all cost a fifth of the sandbox's CPU on a bulk import, and find nothing to free.
        self._collections.enter_context(fewer_full_collections())
        self.worker.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"klaviyo-sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self.stop_event.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        self.worker.stop()
        if self._thread is not None:
            self._thread.join(5.0)
        self._server = None
        self._thread = None
        self._collections.close()

    def reset(self) -> None:
        """Forget all data, queued faults, pending jobs and rate-limit counters."""
        self.worker.clear()
        self.state.reset()
        self.faults.clear()
        self.limiter.reset()

    def wait_for_jobs(self, timeout: float = 10.0) -> bool:
        """Block until every bulk import job has been processed; False on timeout."""
        return self.worker.wait_idle(timeout)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_forever(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str = "pk_sandbox_test",
    time_scale: float = 1.0,
    setup: Callable[[Sandbox], None] | None = None,
    **options: Any,
) -> None:
    """Serve until interrupted (the ``klaviyo-pipelines sandbox`` command). Prints the URL only.

    `setup` prepares the account once started (the demo creates its list there)."""
    sandbox = Sandbox(api_key=api_key, host=host, port=port, time_scale=time_scale, **options)
    sandbox.start()
    if setup is not None:
        setup(sandbox)
    print(
        f"Klaviyo sandbox listening on {sandbox.url} (time scale {time_scale:g}); Ctrl+C stops it."
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
