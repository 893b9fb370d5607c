"""A real Mosquitto broker for tests, benchmarks and demos: private, on a free loopback port.

``MosquittoBroker`` writes its own ``mosquitto.conf`` into a private temporary directory, runs
``mosquitto -c`` on it, and waits until the listener answers an MQTT CONNECT. It can be stopped
cleanly (SIGTERM, the broker saves its persistence database), killed (SIGKILL, a crash) and
restarted on the same port with the same configuration and persistence directory::

    with MosquittoBroker() as broker:
        client.connect(broker.host, broker.port)
        ...
        broker.restart()  # retained messages and persistent sessions survive

Generated configuration (Mosquitto 2.0 syntax) and why:

- ``listener <port> 127.0.0.1`` and ``allow_anonymous true``: a private, loopback-only broker
  (Mosquitto 2.0 refuses anonymous clients unless told otherwise).
- ``max_packet_size <n>``: explicit, so a test sees the same limit on every machine. Mosquitto
  disconnects a client that sends a larger packet (whole packet, not just the payload), and tells
  MQTT 5 clients the limit in CONNACK.
- ``max_queued_messages 0`` (0 means no maximum): the broker queues QoS 1/2 messages for a slow or
  offline subscriber with a persistent session instead of silently dropping them past the default
  of 1000. ``max_queued_bytes`` stays at its default 0 (no maximum) for the same reason. Bounded
  memory is the fabric's job, not the test broker's.
- ``max_inflight_messages 1000`` (default 20): at most 1000 QoS 1 messages delivered to a client
  and not yet acknowledged. Fabric nodes acknowledge a message only once they have handled it, so
  this is what bounds a node's inbound queue; 1000 keeps the broker from being the bottleneck.
- ``persistence true``, ``persistence_location <dir>/``, ``autosave_interval 1`` with
  ``autosave_on_changes false``: the in-memory database is written on a clean stop and, in
  addition, once a second. So ``stop()`` + ``start()`` (or ``restart()``) keeps retained messages,
  persistent sessions and their queued messages; after ``kill()`` (SIGKILL) whatever changed in
  the last second before the kill is lost, as it would be in a real crash.
- ``persistent_client_expiration 1h``: sessions that tests abandon do not pile up forever.
- ``set_tcp_nodelay true`` (supported since Mosquitto 2.0): no Nagle delay on small packets.
- ``log_dest file <dir>/mosquitto.log``, ``log_type error warning notice``, ISO timestamps. The
  process's own stdout and stderr are appended to the same file, so messages Mosquitto prints
  before it opens its log (configuration errors, the warning about running as root) are there
  too; see ``MosquittoBroker.log``.
- ``user root``, only when running as root: Mosquitto started as root would otherwise switch to
  the ``mosquitto`` user, which cannot write to our temporary directory. (As any other user
  Mosquitto keeps running as that user, and the line is left out.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port"]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"
_INFLIGHT = 1000
_START_TIMEOUT = 10.0  # seconds until the listener must answer an MQTT CONNECT
_STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
_LOG_TAIL_LINES = 30
_PORT_ATTEMPTS = 3  # fresh ports tried when an automatically chosen one is taken meanwhile


def find_mosquitto() -> str | None:
    """The path of the ``mosquitto`` binary: on ``PATH``, else ``/usr/sbin/mosquitto``, else None."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    if os.path.isfile(_FALLBACK_BINARY) and os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listened on a moment ago (the OS picks it).

    The port is released before this returns, so another process may take it meanwhile;
    ``MosquittoBroker`` retries with a fresh port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM `process`, wait for it, SIGKILL it if it has not exited in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# MQTT 3.1.1 CONNECT, clean session, keepalive 60 s, client id "flowloom-probe"; then DISCONNECT.
_PROBE_ID = b"flowloom-probe"
_PROBE_CONNECT = (
    bytes([0x10, 12 + len(_PROBE_ID)])
    + b"\x00\x04MQTT\x04\x02\x00\x3c"
    + len(_PROBE_ID).to_bytes(2, "big")
    + _PROBE_ID
)
_PROBE_DISCONNECT = b"\xe0\x00"


def _answers_mqtt(host: str, port: int) -> bool:
    """Whether an MQTT broker accepts a connection on `host`:`port` (CONNECT answered by CONNACK 0).

    A bare TCP connect is not enough: another process may have taken an automatically chosen
    port between ``free_port()`` and Mosquitto binding it.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as probe:
            probe.sendall(_PROBE_CONNECT)
            connack = b""
            while len(connack) < 4:
                chunk = probe.recv(4 - len(connack))
                if not chunk:
                    return False
                connack += chunk
            with contextlib.suppress(OSError):
                probe.sendall(_PROBE_DISCONNECT)
            return connack[:2] == b"\x20\x02" and connack[3] == 0  # CONNACK, accepted
    except OSError:  # refused, reset, timed out
        return False


def _cleanup(process_box: list[subprocess.Popen[bytes]], tempdir: str) -> None:
    """Finalizer: stop a broker that is still running and remove its temporary directory."""
    for process in process_box:
        _terminate(process)
    shutil.rmtree(tempdir, ignore_errors=True)


class MosquittoBroker:
    """A private Mosquitto broker on a free loopback port with its own generated config.

    The port is fixed at construction (a free one unless `port` is given), so ``url`` is known
    before ``start()`` and stays the same across ``restart()``. Configuration, log and (unless
    `persistence_dir` is given) the persistence database live in a private temporary directory
    that is removed by ``close()``, by ``__exit__``, or when the object is garbage collected or the
    interpreter exits; a broker still running then is stopped. A given `persistence_dir` is never
    removed.

    Raises RuntimeError at construction when no Mosquitto binary is found (install it with
    ``make broker``); use ``find_mosquitto()`` to skip instead.
    """

    host: str
    port: int

    def __init__(
        self,
        *,
        port: int | None = None,
        max_packet_size: int = 4 * 1024 * 1024,
        persistence_dir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        if max_packet_size <= 0:
            raise ValueError(f"max_packet_size must be a positive number of bytes, got {max_packet_size}")
        found = binary if binary is not None else find_mosquitto()
        if found is None:
            raise RuntimeError(
                "mosquitto not found on PATH nor at /usr/sbin/mosquitto; install it (`make broker`)"
            )
        self.binary = found
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port = free_port(self.host) if port is None else port
        self.max_packet_size = max_packet_size
        self._dir = Path(tempfile.mkdtemp(prefix="flowloom-mosquitto-"))
        self.persistence_dir = persistence_dir if persistence_dir is not None else self._dir / "data"
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self._dir / "mosquitto.conf"
        self.log_path = self._dir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        # The finalizer sees the running process through this box, never through `self`.
        self._process_box: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._process_box, str(self._dir))

    # --- properties -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def log(self) -> str:
        """The broker's log so far, across restarts ("" once ``close()`` removed it)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines of ``log``."""
        return "\n".join(self.log.splitlines()[-lines:])

    # --- configuration --------------------------------------------------------------------------

    def config_text(self) -> str:
        """The ``mosquitto.conf`` that ``start()`` writes (see the module docstring for why)."""
        location = str(self.persistence_dir.resolve())
        if not location.endswith("/"):
            location += "/"  # Mosquitto appends the file name to this string as is
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"max_packet_size {self.max_packet_size}",
            "max_queued_messages 0",  # 0 = no maximum: never drop a slow subscriber's QoS 1/2
            "max_queued_bytes 0",  # 0 = no maximum (the default, stated)
            f"max_inflight_messages {_INFLIGHT}",  # bounds what a client has not yet acknowledged
            "persistence true",
            f"persistence_location {location}",
            "autosave_interval 1",  # seconds, with autosave_on_changes false
            "autosave_on_changes false",
            "persistent_client_expiration 1h",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.insert(2, "user root")  # else Mosquitto drops to a user that cannot write our files
        return "\n".join(lines) + "\n"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start Mosquitto and return once it accepts MQTT connections.

        Readiness is polled every 20 ms with a TCP connect plus an MQTT 3.1.1 CONNECT that must be
        answered by a CONNACK (client id ``flowloom-probe``, visible in the log), and the process
        must still be running: a bare TCP connect could reach another process on the port.

        Does nothing if the broker is already running. Raises RuntimeError, naming the binary,
        the port and the tail of the broker's log, if the process exits or the port does not
        accept connections within about 10 s. When the port was chosen automatically and turns
        out to be taken by another process, a fresh port is tried (up to 3 times) on the first
        start only: after that the port must stay the same for ``restart()``.
        """
        if self.running:
            return
        attempts = _PORT_ATTEMPTS if self._auto_port and self._process is None else 1
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except RuntimeError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_tail():
                    raise
                self.port = free_port(self.host)

    def _start_once(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this MosquittoBroker is closed; create a new one")
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        with open(self.log_path, "ab") as output:  # O_APPEND, shared with Mosquitto's own log
            process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal does not reach it first
            )
        self._process = process
        self._process_box[:] = [process]
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if process.poll() is not None:
                self._process_box.clear()
                raise self._start_error(f"exited with code {process.returncode}")
            if _answers_mqtt(self.host, self.port) and process.poll() is None:
                return
            if time.monotonic() >= deadline:
                _terminate(process)
                self._process_box.clear()
                raise self._start_error(f"did not answer an MQTT CONNECT within {_START_TIMEOUT:g} s")
            time.sleep(0.02)

    def _start_error(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"mosquitto ({self.binary}) on {self.host}:{self.port} {what}; "
            f"config {self.config_path}; log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the broker cleanly: SIGTERM (it saves its database), wait, SIGKILL after 5 s.

        Idempotent: does nothing if the broker is not running.
        """
        process = self._process
        if process is not None:
            _terminate(process)
            self._process_box.clear()

    def kill(self) -> None:
        """SIGKILL the broker, as in a crash, and reap it; changes not yet autosaved are lost."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self._process_box.clear()

    def restart(self) -> None:
        """Stop the broker (if still running) and start it again on the same port.

        Same configuration and persistence directory, so after a clean stop retained messages
        and persistent sessions survive; after ``kill()`` only what was autosaved does.
        """
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove the temporary directory (config, log, default persistence)."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> MosquittoBroker:
        """Start the broker and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``close()``."""
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.url} {state}>"
