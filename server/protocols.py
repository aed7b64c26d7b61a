"""uvicorn's protocols, trimmed for a process that holds thousands of WebSockets.

Each drops what only a connection's start needs (the HTTP parser once upgraded, the handshake's
request and response once accepted), so an open WebSocket holds less memory and leaves no cyclic
garbage (docs/scaling.md, "Capacity model"; tests/test_memory.py checks both).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, which lets go of its parser once its connection has become a
    WebSocket. The parser holds the protocol's bound methods and the protocol holds the
    parser; after an upgrade nothing else refers to either, so every WebSocket used to leave
    about 5 KiB of cyclic garbage behind, for a full collection to find."""

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, which lets go of the handshake's request and response
    (their headers: about 2 KiB) once the socket is accepted; only the handshake reads them.
    uvicorn starts the keepalive once, right after the accepting response is sent: the send
    path that every event takes stays uvicorn's own."""

    def start_keepalive(self) -> None:
        super().start_keepalive()
        self.request = self.response = None  # type: ignore[assignment]
