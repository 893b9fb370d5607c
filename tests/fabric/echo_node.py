"""A node in its own OS process: answers every request with a task.ack naming itself.

Usage: python tests/fabric/echo_node.py BROKER_URL NAMESPACE NODE_ID
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fabric import Endpoint, MqttTransport
from protocol import Capabilities, TaskAck


async def main(url: str, namespace: str, node: str) -> None:
    transport = MqttTransport(url, node, namespace=namespace)
    caps = Capabilities(tier="edge", cores=1, memory_mb=64, task_kinds=["echo"])
    async with Endpoint(node, transport, capabilities=caps, heartbeat_s=0.2) as ep:
        print("ready", flush=True)
        async for env in ep:
            await ep.reply(env, TaskAck(job=node, task=getattr(env.body, "task", "x"), attempt=0))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
