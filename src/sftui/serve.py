"""``sftui serve``: a run's screen in a web browser, through textual-serve.

For every page that connects, textual-serve starts ``sftui attach RUN_DIR`` (a process and a
TUI of its own, driven by Textual's web driver) and relays it over a websocket; closing the page
ends that process as ``q`` would, and the run goes on. The server listens on 127.0.0.1 only, under
a random token: textual-serve builds every URL of its page (scripts, websocket) from its public
URL, so the token is the first part of every path (a query would not survive: the page appends
its own to the websocket's URL), and any request without it is refused with 403.

Imported by the ``serve`` command only: aiohttp and textual-serve stay out of every other one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shlex
import signal
import socket
import sys
from typing import Any, Awaitable, Callable

from aiohttp import web
from textual_serve.server import Server

from sftui import events as ev
from sftui.rundir import RunDir

HOST = "127.0.0.1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenServer(Server):
    """textual-serve's server with every route under ``/TOKEN/`` and a gate in front of them."""

    def __init__(self, run: RunDir, sock: socket.socket, token: str):
        # textual-serve runs the command through a shell: exec, so that the page's process is the TUI
        command = "exec " + shlex.join([sys.executable, "-m", "sftui", "attach", str(run.path)])
        super().__init__(command, host=HOST, port=sock.getsockname()[1], title=f"sftui {run.path.name}")
        self.run = run
        self.sock = sock
        self.token = token
        self._pages: set[asyncio.Task[Any]] = set()  # the websocket handlers, one per open page

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/{self.token}/"

    async def _make_app(self) -> web.Application:
        outer = web.Application(middlewares=[self._gate])
        outer.add_subapp(f"/{self.token}", await super()._make_app())
        return outer

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        first = request.path.split("/")[1] if request.path.startswith("/") else ""
        if not secrets.compare_digest(first.encode(), self.token.encode()):
            raise web.HTTPForbidden(text="sftui serve: open the URL with the token that `sftui serve` printed\n")
        return await handler(request)

    async def handle_index(self, request: web.Request) -> Any:
        # The page's script and websocket URLs name the host and port the browser used, which an
        # SSH tunnel (`ssh -L 9000:127.0.0.1:8000`) may change; no await until they are built.
        self.public_url = f"http://{request.host}"
        return await super().handle_index(request)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        page = asyncio.current_task()
        assert page is not None
        self._pages.add(page)
        try:
            return await super().handle_websocket(request)
        finally:
            self._pages.discard(page)

    async def on_shutdown(self, app: web.Application) -> None:
        # Stopping the server ends every page's `sftui attach` now: aiohttp would wait a minute for
        # the pages to close. A cancelled handler quits its app as a closed page does.
        for page in self._pages:
            page.cancel()

    def serve(self, debug: bool = False) -> None:
        """textual-serve's ``serve``, on the socket already listening: aiohttp would bind its own
        only after the start-up hook has printed the URL."""
        self.initialize_logging()
        loop = asyncio.new_event_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_exit)
        web.run_app(self._make_app(), sock=self.sock, handle_signals=False, loop=loop, print=lambda *args: None)

    async def on_startup(self, app: web.Application) -> None:
        print(f"sftui: serving the screen of {self.run.path} on\n  {self.url}\n"
              f"From another machine: ssh -L {self.port}:127.0.0.1:{self.port} HOST, then open that URL there.\n"
              "Each page runs its own `sftui attach`; closing it leaves the run as it is. Ctrl-C stops serving.",
              flush=True)

    def initialize_logging(self) -> None:
        # textual-serve logs every request (token included) in colour; errors are what matter here.
        logging.basicConfig(level=logging.WARNING, format="sftui serve: %(message)s")


def serve(run: RunDir, port: int) -> int:
    """Serve until Ctrl-C or SIGTERM; exit 2 with one line when the port cannot be had."""
    try:
        sock = socket.create_server((HOST, port))
    except OSError as e:
        print(f"sftui: --port {port}: cannot listen on {HOST}:{port}: {e.strerror or e}", file=sys.stderr)
        return ev.EXIT_USAGE
    TokenServer(run, sock, secrets.token_urlsafe(24)).serve()
    return ev.EXIT_FINISHED
