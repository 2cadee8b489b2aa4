"""The server: moto's WSGI application behind the authorization layer, served by werkzeug on a
background thread (`SandboxSts`).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Self

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, get_sockaddr, make_server, select_address_family

from sandbox.moto_sts.admin import iam_client
from sandbox.moto_sts.authorization import TrustPolicyMiddleware

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient

# --------------------------------------------------------------------------- the server


class _RequestHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's per-request access log line."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Drop the access log; errors still go through werkzeug's logger."""


class SandboxSts:
    """moto's server plus the trust-policy layer, served by werkzeug in a background thread.

    Use as a context manager, or call `start()` and `stop()`. Port 0 picks a free port;
    `endpoint_url` tells the one in use. Binding happens in `start()`, so a port in use raises
    `OSError` there rather than disappearing into the server thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        platform_principals: Mapping[str, str] | None = None,
        propagation_delay: float = 0.0,
        verbose: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._verbose = verbose
        self.middleware = TrustPolicyMiddleware(
            DomainDispatcherApplication(create_backend_app),
            platform_principals=platform_principals,
            propagation_delay=propagation_delay,
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self once requests can be answered."""
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        if "MOTO_ACCOUNT_ID" in os.environ:
            # moto would put every request, admin or not, in that one account.
            raise RuntimeError("unset MOTO_ACCOUNT_ID: the sandbox serves several accounts")
        # moto builds an EC2 backend per account on its first EC2 call (a permission probe's
        # DescribeRegions) and by default loads hundreds of sample AMIs into it: about a second
        # of CPU per customer account, enough to time a probe out. Nothing here needs them.
        os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        # Bind here rather than in werkzeug: on a port in use werkzeug prints to stderr and calls
        # sys.exit(1), which a test or an embedding program cannot handle as an OSError.
        family = select_address_family(self._host, self._port)
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(get_sockaddr(self._host, self._port, family))
            listener.listen(128)
            # werkzeug duplicates the descriptor, so ours can be closed once it has its own.
            server = make_server(
                self._host,
                self._port,
                self.middleware,
                threaded=True,
                request_handler=MotoRequestHandler if self._verbose else _RequestHandler,
                fd=listener.fileno(),
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            # A short poll makes stop() (and so test teardown and Ctrl-C) quick.
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-sts-{server.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port being served (the chosen one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the sandbox is not running")
        return int(self._server.port)

    @property
    def endpoint_url(self) -> str:
        """The URL clients use for both STS and IAM, e.g. ``http://127.0.0.1:5000``."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host  # noqa: S104 - compared, not bound
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def revoke_platform_credentials(self) -> None:
        """Make STS answer ``InvalidClientTokenId`` to the platform, as for a deleted key."""
        self.middleware.set_platform_credentials_valid(False)

    def restore_platform_credentials(self) -> None:
        """Accept the platform's credentials again."""
        self.middleware.set_platform_credentials_valid(True)

    def set_probe_fault(self, service: str, code: str | None) -> None:
        """Make `service` answer role credentials with a 503 `code` (None: answer normally)."""
        self.middleware.set_probe_fault(service, code)

    def iam_client_for(self, account_id: str) -> IAMClient:
        """An admin IAM client acting inside `account_id` (see `iam_client`)."""
        return iam_client(self.endpoint_url, account_id)
