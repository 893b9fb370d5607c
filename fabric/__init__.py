"""Moves envelopes between nodes, wherever they are.

One transport seam (`fabric._transports`): in-process (`InprocHub`) and MQTT (`MqttTransport`).
Above it, `Endpoint` gives every node the same semantics on both: send, request/reply with
deadlines, streamed replies, broadcast, presence with failure detection, dedupe, chunked
transfer of large envelopes, and link emulation (`LinkTable`).
"""

from fabric._endpoint import TERMINAL_KINDS, Endpoint, EndpointStats
from fabric._errors import DeadlineExceeded, FabricClosed, FabricError, PeerUnreachable, TransportError
from fabric._links import LinkSpec, LinkTable
from fabric._peers import Peer, PeerEvent, PeerTable
from fabric._transports.base import PresenceEvent, Transport
from fabric._transports.inproc import InprocHub, InprocTransport
from fabric._transports.mqtt import MqttTransport

__all__ = [
    "TERMINAL_KINDS",
    "DeadlineExceeded",
    "Endpoint",
    "EndpointStats",
    "FabricClosed",
    "FabricError",
    "InprocHub",
    "InprocTransport",
    "LinkSpec",
    "LinkTable",
    "MqttTransport",
    "Peer",
    "PeerEvent",
    "PeerTable",
    "PeerUnreachable",
    "PresenceEvent",
    "Transport",
    "TransportError",
]
