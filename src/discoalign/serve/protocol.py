"""uvicorn's h11 protocol with a header timeout: a client that opens a connection (or keeps one alive) and does not
send a complete request head within `header_timeout` seconds is disconnected, so slow clients cannot hold
connections open indefinitely. (uvicorn's own timeouts cover idle keep-alive connections, not a slow head; the
body's timeout is the app's, `serve.http.read_body`.)"""

from __future__ import annotations


def timed_h11_protocol(header_timeout: float) -> type:
    """An `H11Protocol` subclass for `uvicorn.Config(http=...)` that closes a connection whose request head is late."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head on a kept-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol
