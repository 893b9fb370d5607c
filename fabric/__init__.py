"""Moves envelopes between nodes: the transport seam (in-process, MQTT), endpoints, relays.

Built in the fabric issue; until then this package holds nothing.
"""
