"""MQTT transport: paho-mqtt's client driven by the asyncio event loop.

Why paho directly and not aiomqtt: aiomqtt is a thin asyncio layer over this same paho client,
and on its receive path it costs a queue hop and a task wake per message; measured here it moved
a fraction of raw paho's messages per second (see benchmarks/mqtt_clients.py and the fabric notes
in docs/fabric.md). We do what aiomqtt does underneath (paho's socket callbacks on the event loop),
but drain every packet available per wakeup and coalesce writes.

Topic layout, under a namespace so fabrics sharing a broker never see each other:

    fl/<ns>/n/<node>    a node's inbox (QoS 1)
    fl/<ns>/g/<group>   a group (QoS 1)
    fl/<ns>/all         broadcast (QoS 1)
    fl/<ns>/p/<node>    retained presence: the node's signed hello frame; emptied (retained,
                        QoS 1) by the Last Will when the node dies, and by the node when it leaves

Sessions are persistent (clean_session false): while a node is away the broker keeps its
subscriptions and queues its QoS 1 messages, the same semantics as the in-process hub.

Flow control, out: at most `max_outstanding` publishes wait for their PUBACK; `send` waits for
room. Messages published while the connection is down stay in paho's outbox and go out on
reconnect.

Flow control, in: a message is acknowledged (PUBACK) only after the endpoint has handled it, so
the broker's in-flight window for this client bounds what is queued here (Mosquitto's
``max_inflight_messages``, MQTT 5's Receive Maximum), and the broker holds the rest
(backpressure; the broker must queue rather than drop for a slow subscriber, e.g. Mosquitto's
``max_queued_messages 0``). The socket is always read, so our own PUBACKs and keepalive answers
keep flowing while the handler is busy; a message handled but not yet acknowledged when the node
dies is delivered again, and dropped as a duplicate.

Errors of paho and sockets are translated into `TransportError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections import deque
from typing import Any, Literal
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fabric._errors import FabricClosed, TransportError
from fabric._transports.base import FrameHandler, PresenceEvent, PresenceHandler

__all__ = ["MqttTransport", "topic_for"]

log = logging.getLogger("fabric.mqtt")

_PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
_FORBIDDEN = frozenset("/+#\0")


def _check_name(name: str, what: str) -> str:
    if not name or _FORBIDDEN & set(name):
        raise ValueError(f"{what} {name!r} cannot be used in an MQTT topic")
    return name


def topic_for(namespace: str, address: str) -> str:
    """The topic an address (node id, ``group:<name>`` or ``*``) is published to."""
    prefix = f"fl/{namespace}"
    if address == "*":
        return f"{prefix}/all"
    if address.startswith("group:"):
        return f"{prefix}/g/{_check_name(address.removeprefix('group:'), 'group')}"
    return f"{prefix}/n/{_check_name(address, 'node id')}"


class MqttTransport:
    """One node's connection to an MQTT broker (MQTT 3.1.1 by default, or 5).

    >>> transport = MqttTransport("mqtt://127.0.0.1:1883", "edge-1")  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        namespace: str = "flowloom",
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        keepalive_s: int = 5,
        max_outstanding: int = 128,
        connect_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 5.0,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
            raise ValueError(f"broker url must look like mqtt://host:1883, got {url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or 1883
        self.node_id = _check_name(node_id, "node id")
        self.namespace = _check_name(namespace, "namespace")
        self.protocol = protocol
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.reconnects = 0
        """How many times the connection was re-established."""
        self._prefix = f"fl/{namespace}"
        self._presence_prefix = f"{self._prefix}/p/"
        self._window = asyncio.Semaphore(max_outstanding)
        self._max_outstanding = max_outstanding
        # Frames and presence events with their message ids, in arrival order: a node's bye must not
        # be overtaken by the withdrawal of its presence that it published after it.
        self._inbound: deque[tuple[bytes | PresenceEvent, int, int]] = deque()
        self._inbound_ready = asyncio.Event()
        self._send_mids: set[int] = set()  # publishes of send() awaiting PUBACK: one window slot each
        self._connecting: asyncio.Future[Any] | None = None
        self._subscribe_mid: int | None = None
        self._writer_registered = False
        self._flush_scheduled = False
        self._announcement: bytes | None = None
        self._groups: list[str] = []
        self._on_frame: FrameHandler | None = None
        self._on_presence: PresenceHandler | None = None
        self._connected = asyncio.Event()
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        kwargs: dict[str, Any] = {
            "client_id": f"{self.namespace}:{self.node_id}",
            "protocol": _PROTOCOLS[self.protocol],
        }
        if self.protocol == "3.1.1":
            kwargs["clean_session"] = False
        client = paho.Client(CallbackAPIVersion.VERSION2, manual_ack=True, **kwargs)
        # Our semaphore bounds the publishes awaiting PUBACK. paho's own window stays unlimited: when
        # set, paho walks every unacknowledged message on each PUBACK (O(window) per message).
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.will_set(f"{self._presence_prefix}{self.node_id}", b"", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    # lifecycle -------------------------------------------------------------------------------

    async def start(self, on_frame: FrameHandler, on_presence: PresenceHandler, groups: list[str]) -> None:
        """Connect (waiting up to `connect_timeout_s`), subscribe, and start reading."""
        if self._state != "new":
            raise FabricClosed(f"MQTT transport of {self.node_id!r} was already started")
        self._state = "running"
        self._loop = asyncio.get_running_loop()
        self._on_frame, self._on_presence = on_frame, on_presence
        self._groups = [_check_name(g, "group") for g in groups]
        self._tasks = [
            asyncio.create_task(self._read_frames(), name=f"mqtt-read:{self.node_id}"),
            asyncio.create_task(self._misc(), name=f"mqtt-keepalive:{self.node_id}"),
        ]
        try:
            await self._connect_once()
            async with asyncio.timeout(self.connect_timeout_s):
                await self._connected.wait()
        except (OSError, TimeoutError, TransportError) as exc:
            await self._stop(graceful=False)
            where = f"mqtt://{self.host}:{self.port}"
            why = str(exc) or "no CONNACK in time"
            raise TransportError(f"cannot connect node {self.node_id!r} to {where}: {why}") from exc

    async def _connect_once(self) -> None:
        rc = await self._in_thread(self._client.connect, self.host, self.port, self.keepalive_s)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(paho.error_string(rc))

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        # paho's connect is blocking (DNS, TCP handshake): keep it off the event loop. Shielded and
        # remembered, so that closing waits for it instead of leaving a socket behind.
        self._connecting = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await asyncio.shield(self._connecting)

    async def close(self) -> None:
        """Withdraw presence, disconnect cleanly (no Last Will), release everything."""
        await self._stop(graceful=True)

    async def crash(self) -> None:
        """Drop the connection without a DISCONNECT: the broker publishes our Last Will."""
        await self._stop(graceful=False)

    async def _stop(self, *, graceful: bool) -> None:
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._connecting is not None and not self._connecting.done():
            await asyncio.wait([self._connecting], timeout=self.connect_timeout_s)
        for _ in range(self._max_outstanding):  # wake senders waiting for window room: they fail
            self._window.release()
        if graceful and self._connected.is_set():
            with contextlib.suppress(Exception):
                info = self._client.publish(f"{self._presence_prefix}{self.node_id}", b"", qos=1, retain=True)
                async with asyncio.timeout(2.0):
                    while not info.is_published() and self._connected.is_set():
                        await asyncio.sleep(0.005)
            self._client.disconnect()
            self._flush()  # write the DISCONNECT now: a closed socket alone would fire our Last Will
        else:
            sock = self._sock
            self._detach_socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *([self._reconnecting] if self._reconnecting else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._detach_socket()
        # paho's __del__ closes its sockets later, maybe after this loop is gone: cut it loose.
        self._loop = None
        self._client._reset_sockets()
        self._state = "closed"

    # sending ---------------------------------------------------------------------------------

    async def send(self, address: str, frame: bytes) -> None:
        """Publish at QoS 1; waits while `max_outstanding` publishes await their PUBACK."""
        if self._state != "running":
            raise FabricClosed(f"MQTT transport of {self.node_id!r} is {self._state}")
        topic = topic_for(self.namespace, address)
        await self._window.acquire()
        if self._state != "running":
            raise FabricClosed(f"MQTT transport of {self.node_id!r} closed while the send waited")
        info = self._client.publish(topic, frame, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._window.release()
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: paho keeps the message and sends it when the connection is back.
        self._send_mids.add(info.mid)

    async def announce(self, frame: bytes) -> None:
        """Publish our presence, retained; it is published again after every reconnect."""
        self._announcement = frame
        if self._connected.is_set():
            self._client.publish(f"{self._presence_prefix}{self.node_id}", frame, qos=1, retain=True)

    # paho callbacks (all run on the event loop thread, except during a connect) -------------

    def _call_in_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call_in_loop(self._attach_socket, sock)

    def _attach_socket(self, sock: Any) -> None:
        if self._loop is None:  # closed meanwhile
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read_socket)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._detach_socket)

    def _detach_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None or self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)
        self._writer_registered = False

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Coalesce: many publishes in one loop iteration become one flush.
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sock is None:
            return
        self._client.loop_write()
        if self._client.want_write() and not self._writer_registered and self._loop is not None:
            self._writer_registered = True  # the socket buffer is full: write when it drains
            self._loop.add_writer(self._sock, self._write_socket)

    def _write_socket(self) -> None:
        self._client.loop_write()

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._writer_registered and self._loop is not None:
            self._writer_registered = False
            with contextlib.suppress(Exception):
                self._loop.remove_writer(sock)

    def _read_socket(self) -> None:
        # loop_read() handles one packet per call when nothing is in flight; drain what is there.
        # _packet_read is paho's own per-packet step (paho-mqtt 2.x).
        client = self._client
        for _ in range(256):
            if self._sock is None:
                return
            rc = client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                client._loop_rc_handle(rc)
                return

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("%s: broker refused the connection: %s", self.node_id, reason)
            return
        topics = [f"{self._prefix}/n/{self.node_id}", f"{self._prefix}/all", f"{self._presence_prefix}+"]
        topics += [f"{self._prefix}/g/{g}" for g in self._groups]
        _, self._subscribe_mid = client.subscribe([(t, 1) for t in topics])
        if self._announcement is not None:
            client.publish(f"{self._presence_prefix}{self.node_id}", self._announcement, qos=1, retain=True)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        # Connected means subscribed: a message sent to us once start() returns is not lost.
        if mid == self._subscribe_mid:
            self._call_in_loop(self._connected.set)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._call_in_loop(self._lost)

    def _lost(self) -> None:
        self._connected.clear()
        self._detach_socket()
        if self._state == "running" and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.create_task(self._reconnect(), name=f"mqtt-reconnect:{self.node_id}")

    async def _reconnect(self) -> None:
        delay = self.reconnect_min_s
        while self._state == "running":
            # Full jitter: nodes that lost the same broker do not all come back at once.
            await asyncio.sleep(random.uniform(0, delay))
            try:
                rc = await self._in_thread(self._client.reconnect)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    async with asyncio.timeout(self.connect_timeout_s):
                        await self._connected.wait()
                    self.reconnects += 1
                    log.info("%s: reconnected to %s:%d", self.node_id, self.host, self.port)
                    return
            except (OSError, TimeoutError) as exc:
                log.debug("%s: reconnect failed: %s", self.node_id, exc)
            except Exception:  # whatever paho raises, keep trying: giving up would strand the node
                log.exception("%s: reconnect attempt failed unexpectedly", self.node_id)
            delay = min(self.reconnect_max_s, delay * 2)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._call_in_loop(self._published, mid)

    def _published(self, mid: int) -> None:
        if mid in self._send_mids:  # presence publishes took no slot and give none back
            self._send_mids.discard(mid)
            self._window.release()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        item: bytes | PresenceEvent
        if topic.startswith(self._presence_prefix):
            node = topic[len(self._presence_prefix) :]
            payload = bytes(message.payload)
            item = PresenceEvent(node, "online" if payload else "offline", payload)
        else:
            item = bytes(message.payload)  # no copy when paho gives bytes
        self._inbound.append((item, message.mid, message.qos))
        self._inbound_ready.set()

    async def _read_frames(self) -> None:
        while True:
            await self._inbound_ready.wait()
            while self._inbound:
                item, mid, qos = self._inbound.popleft()
                if isinstance(item, PresenceEvent):
                    if self._on_presence is not None and item.node != self.node_id:
                        self._on_presence(item)
                elif self._on_frame is not None:
                    try:
                        await self._on_frame(item)
                    except Exception:
                        log.exception("%s: the frame handler failed", self.node_id)
                if qos and self._sock is not None:
                    self._client.ack(mid, qos)  # handled: now the broker may send the next one
            self._inbound_ready.clear()

    async def _misc(self) -> None:
        # Keepalive pings and retries of unacknowledged messages.
        while True:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self._client.loop_misc()
