"""A TCP proxy in front of a broker that a test can cut and hold down, to drop clients abruptly."""

from __future__ import annotations

import trio


class Proxy:
    """Forwards each connection on 127.0.0.1:``port`` to ``target_port`` (settable: retarget).

    :meth:`down` cuts every forwarded connection at once (no WebSocket close, just TCP EOF)
    and drops new ones until :meth:`up`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.is_up = True
        self._links: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def serve(
        self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report started with the proxy, forward until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._forward, listeners)

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        self.is_up = False
        for link in self._links:
            link.cancel()

    def up(self) -> None:
        """Forward new connections again."""
        self.is_up = True

    async def _forward(self, client: trio.SocketStream) -> None:
        try:
            if not self.is_up:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return  # the broker is down: so is this connection
            with trio.CancelScope() as link:
                self._links.add(link)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, upstream, link)
                        nursery.start_soon(_pump, upstream, client, link)
                finally:
                    self._links.discard(link)
            await trio.aclose_forcefully(upstream)
        finally:
            await trio.aclose_forcefully(client)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
    except trio.BrokenResourceError:
        pass
    link.cancel()  # one side ended: end both
