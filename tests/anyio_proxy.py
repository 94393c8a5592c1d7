"""A TCP proxy in front of a broker that a test can cut and hold down, to drop clients abruptly.

:class:`tests.proxy.Proxy` on anyio, so that it runs in a test under asyncio or under Trio.
"""

from __future__ import annotations

import anyio
import anyio.abc


class Proxy:
    """Forwards each connection on 127.0.0.1:``port`` to ``target_port`` (settable: retarget).

    :meth:`down` cuts every forwarded connection at once (no WebSocket close, just TCP EOF)
    and drops new ones until :meth:`up`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.is_up = True
        self._links: set[anyio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Proxy] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report started with the proxy, forward until cancelled."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started(self)
            await listener.serve(self._forward)

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        self.is_up = False
        for link in self._links:
            link.cancel()

    def up(self) -> None:
        """Forward new connections again."""
        self.is_up = True

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        try:
            if not self.is_up:
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return  # the broker is down: so is this connection
            with anyio.CancelScope() as link:
                self._links.add(link)
                try:
                    async with anyio.create_task_group() as pumps:
                        pumps.start_soon(_pump, client, upstream, link)
                        pumps.start_soon(_pump, upstream, client, link)
                finally:
                    self._links.discard(link)
            await anyio.aclose_forcefully(upstream)
        finally:
            await anyio.aclose_forcefully(client)


async def _pump(
    source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, link: anyio.CancelScope
) -> None:
    try:
        async for data in source:
            await sink.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    link.cancel()  # one side ended: end both


async def start_proxy(task_group: anyio.abc.TaskGroup, target_port: int) -> Proxy:
    """A :class:`Proxy` to ``target_port``, serving in ``task_group``."""
    proxy: Proxy = await task_group.start(Proxy(target_port).serve)
    return proxy
