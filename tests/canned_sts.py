"""An STS endpoint that answers AssumeRole with answers a test queues, word for word.

For the answers whose exact text matters (the root-credentials and service-control-policy
variants of AccessDenied, a ValidationError quoting the external ID, codes nobody has seen) and
to see exactly what was sent: a real HTTP server speaking STS's XML, so the worker's own request,
signing, parsing and retries run as they do against AWS. GetCallerIdentity always answers with
the platform's identity; an AssumeRole with nothing queued is a 500 that names the mistake.
"""

from __future__ import annotations

import collections
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
PLATFORM_ACCOUNT = "111122223333"


def error_answer(code: str, message: str = "", *, status: int = 400) -> tuple[int, bytes]:
    """STS's ErrorResponse for `code` (docs/sts-errors.md)."""
    kind = "Receiver" if status >= 500 else "Sender"
    body = (
        f'<ErrorResponse xmlns="{_NS}">\n  <Error>\n    <Type>{kind}</Type>\n'
        f"    <Code>{escape(code)}</Code>\n    <Message>{escape(message)}</Message>\n"
        "  </Error>\n  <RequestId>c0ffee00-0000-4000-8000-000000000000</RequestId>\n"
        "</ErrorResponse>\n"
    )
    return status, body.encode()


def assumed_answer(arn: str, credentials: dict[str, str] | None = None) -> tuple[int, bytes]:
    """AssumeRole's answer naming the assumed role `arn`, with `credentials` (or made-up ones)."""
    issued = credentials or {
        "AccessKeyId": "ASIACANNED0000000000",
        "SecretAccessKey": "canned-secret",
        "SessionToken": "canned-token",
        "Expiration": "2030-01-01T00:00:00Z",
    }
    fields = "".join(f"      <{k}>{escape(v)}</{k}>\n" for k, v in issued.items())
    body = (
        f'<AssumeRoleResponse xmlns="{_NS}">\n  <AssumeRoleResult>\n'
        f"    <AssumedRoleUser>\n      <AssumedRoleId>AROACANNED:s</AssumedRoleId>\n"
        f"      <Arn>{escape(arn)}</Arn>\n    </AssumedRoleUser>\n"
        f"    <Credentials>\n{fields}    </Credentials>\n  </AssumeRoleResult>\n"
        "  <ResponseMetadata>\n    <RequestId>c0ffee01-0000-4000-8000-000000000000</RequestId>\n"
        "  </ResponseMetadata>\n</AssumeRoleResponse>\n"
    )
    return 200, body.encode()


def _identity_answer() -> bytes:
    return (
        f'<GetCallerIdentityResponse xmlns="{_NS}">\n  <GetCallerIdentityResult>\n'
        f"    <Arn>arn:aws:iam::{PLATFORM_ACCOUNT}:user/verifier</Arn>\n"
        "    <UserId>AIDACANNED</UserId>\n"
        f"    <Account>{PLATFORM_ACCOUNT}</Account>\n  </GetCallerIdentityResult>\n"
        "  <ResponseMetadata>\n    <RequestId>c0ffee02-0000-4000-8000-000000000000</RequestId>\n"
        "  </ResponseMetadata>\n</GetCallerIdentityResponse>\n"
    ).encode()


class CannedSts:
    """The server: `queue` answers, then read `requests` (each AssumeRole's form fields and
    headers, in order)."""

    def __init__(self) -> None:
        self._answers: collections.deque[tuple[int, bytes]] = collections.deque()
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def queue(self, *answers: tuple[int, bytes]) -> None:
        """AssumeRole's next answers, in order."""
        with self._lock:
            self._answers.extend(answers)

    def left(self) -> int:
        """Answers queued and not given yet."""
        with self._lock:
            return len(self._answers)

    def _answer(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        if form.get("Action") == "GetCallerIdentity":
            return 200, _identity_answer()
        with self._lock:
            self.requests.append((form, headers))
            if self._answers:
                return self._answers.popleft()
        return error_answer("NothingQueued", "the test queued no answer", status=500)

    def __enter__(self) -> CannedSts:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(sts: CannedSts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
            status, body = sts._answer(form, dict(self.headers.items()))
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    return Handler
