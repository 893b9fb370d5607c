"""The ``llm.stage`` service: a node's model stages and their per-session KV caches.

A stage is layers ``[start, end)`` of a model (`models.load_stage`), loaded on the first ``open``
that names it and shared by every session on the node. Each session of a stage has its own KV
cache, the number of positions in it, and a log of what it sent to the next stage, step by step,
so that a replacement of the next stage can be rebuilt from it (``handoff``).

Methods (all arguments by name; ``stage`` is ``{"model", "start", "end"}``):

- ``info(model)``: the model's layer count and sizes (`models.ModelInfo`), for planning.
- ``open(session, stage, epoch, wire)``: load the layers if needed and start an empty session
  whose outputs travel as `wire` (``float32``, ``float16``, ``bfloat16`` or ``int8``).
  Returns ``{"param_bytes", "load_s", "loaded"}``.
- ``forward(session, stage, epoch, pos, x, route, sample, deadline)``: run one step,
  positions ``pos..pos+n``. A session holding more than `pos` positions first drops the rest (a
  step sent again after a failure is recomputed, never appended twice); one holding fewer is
  refused. The output goes on to ``route[0]`` (``{"node", "stage"}``, the next stage), and
  the last stage answers ``{"token"}``, chosen by
  `sample` (`sampling.choose`). The reply travels back along the route.
- ``fill(session, stage, epoch, steps)``: rebuild a fresh session by replaying ``steps`` (each
  ``{"pos", "x"}``, from position 0, in the order they first ran), without passing them on.
  Steps replayed with the same boundaries give the same cache, bit for bit.
- ``handoff(session, stage, epoch, to, upto, deadline)``: ``fill`` the stage `to` (on its
  node) with this stage's outputs for every step before position `upto`.
- ``close(session)``: drop every stage's state of the session.
- ``stats()``: loaded stages with their parameter bytes, and open sessions.

A call with an `epoch` older than the newest one the session has seen is refused: after a failover
the driver raises the epoch, so a step still under way on the old route cannot overwrite the new.
Sessions idle for `idle_s` are evicted, and the least recently used beyond `max_sessions`; a stage
with no sessions left is unloaded after `idle_s`. An evicted session answers "not open", which the
driver treats like a lost stage: it fills it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from agents.services import CallFailed, Fabric, Reply, ServiceError
from backends.llm.models import StageModel, load_stage, model_info
from backends.llm.sampling import choose
from fabric import FabricError
from protocol import Lossy

__all__ = ["SERVICE", "WIRE_DTYPES", "StageService", "wire_bytes"]

SERVICE = "llm.stage"
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")


def wire_bytes(x: Any) -> int:
    """Bytes of tensor data `x` takes on the wire (a `Lossy` in its format, token ids as int64)."""
    if isinstance(x, Lossy):
        return x.data_size()
    if isinstance(x, torch.Tensor):
        return int(x.numel() * x.element_size())
    return 8 * len(x) if isinstance(x, list) else 0


def _on_wire(out: torch.Tensor, wire: str) -> Any:
    return out if wire == "float32" else Lossy(out, wire)  # type: ignore[arg-type]


def _received(x: Any) -> Any:
    """What the stage computes on: token ids as a tensor, a lossy value as its receiver sees it."""
    if isinstance(x, Lossy):  # a call between stages of one node skips the wire, not its rounding
        return x.received()
    if isinstance(x, list):
        return torch.tensor([x], dtype=torch.long)
    if isinstance(x, torch.Tensor):
        return x
    raise ServiceError(f"x must be token ids or a tensor, got {type(x).__name__}")


@dataclass
class _Session:
    cache: Any
    epoch: int
    wire: str
    pos: int = 0
    sent: list[tuple[int, int, Any]] = field(default_factory=list)
    """(pos, positions, value sent on) for each step, in order; a later stage is rebuilt from it."""
    used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def drop_from(self, pos: int) -> None:
        if pos < self.pos:
            self.cache.crop(pos - self.pos)  # transformers 5: a negative count of positions to remove
        self.pos = pos
        while self.sent and self.sent[-1][0] >= pos:
            self.sent.pop()


def _key(stage: Any) -> tuple[str, int, int]:
    try:
        return str(stage["model"]), int(stage["start"]), int(stage["end"])
    except (TypeError, KeyError, ValueError):
        raise ServiceError(f"stage must be {{'model', 'start', 'end'}}, got {stage!r:.200}") from None


class StageService:
    """Serves model stages on one node (see the module docstring)."""

    def __init__(self, fabric: Fabric, *, idle_s: float = 600.0, max_sessions: int = 64) -> None:
        self.fabric = fabric
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._stages: dict[tuple[str, int, int], StageModel] = {}
        self._stage_used: dict[tuple[str, int, int], float] = {}
        self._loading: dict[tuple[str, int, int], asyncio.Lock] = {}
        self._sessions: dict[tuple[str, tuple[str, int, int]], _Session] = {}

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        if method == "info":
            return await self._info(args)
        if method == "open":
            return await self._open(args)
        if method == "forward":
            return await self._forward(args)
        if method == "fill":
            return await self._fill(args)
        if method == "handoff":
            return await self._handoff(args)
        if method == "close":
            return self._close(str(args.get("session")))
        if method == "stats":
            return self.stats()
        raise ServiceError(
            f"{SERVICE} has no method {method!r}; it has info, open, forward, fill, handoff, close, stats"
        )

    async def close(self) -> None:
        self._sessions.clear()
        self._stages.clear()

    def stats(self) -> dict[str, Any]:
        """Loaded stages (parameter bytes) and open sessions (positions cached)."""
        return {
            "stages": [
                {"model": m, "start": a, "end": b, "param_bytes": s.param_bytes}
                for (m, a, b), s in self._stages.items()
            ],
            "sessions": [
                {"session": sid, "start": k[1], "end": k[2], "pos": s.pos}
                for (sid, k), s in self._sessions.items()
            ],
        }

    # sessions --------------------------------------------------------------------------------

    async def _stage(self, key: tuple[str, int, int]) -> tuple[StageModel, bool]:
        stage = self._stages.get(key)
        if stage is not None:
            return stage, False
        async with self._loading.setdefault(key, asyncio.Lock()):
            if key in self._stages:
                return self._stages[key], False
            try:
                stage = await asyncio.to_thread(load_stage, *key)
            except Exception as exc:  # the message names the model and the layers
                raise ServiceError(
                    f"{self.fabric.node_id} cannot load {key[0]} layers {key[1]}-{key[2]}: {exc}"
                ) from exc
            self._stages[key] = stage
            return stage, True

    def _session(self, args: dict[str, Any]) -> tuple[_Session, StageModel]:
        sid, key = str(args.get("session")), _key(args.get("stage"))
        session, stage = self._sessions.get((sid, key)), self._stages.get(key)
        if session is None or stage is None:
            raise ServiceError(
                f"session {sid} is not open on {key[0]} layers {key[1]}-{key[2]} of {self.fabric.node_id}",
                target=self.fabric.node_id,
            )
        epoch = int(args.get("epoch", 0))
        if epoch < session.epoch:
            raise ServiceError(
                f"session {sid}: epoch {epoch} is stale (now {session.epoch})", code="cancelled"
            )
        session.epoch = epoch
        session.used = time.monotonic()
        return session, stage

    async def _info(self, args: dict[str, Any]) -> dict[str, Any]:
        model = str(args.get("model"))
        try:
            info = await asyncio.to_thread(model_info, model)
        except Exception as exc:
            raise ServiceError(f"{self.fabric.node_id} cannot read model {model}: {exc}") from exc
        return dataclasses.asdict(info)

    async def _open(self, args: dict[str, Any]) -> dict[str, Any]:
        self._evict()
        sid, key = str(args.get("session")), _key(args.get("stage"))
        stage, loaded = await self._stage(key)
        self._stage_used[key] = time.monotonic()
        wire = str(args.get("wire", "float32"))
        if wire not in WIRE_DTYPES:
            raise ServiceError(f"wire must be one of {list(WIRE_DTYPES)}, got {wire!r}")
        self._sessions[(sid, key)] = _Session(stage.new_cache(), int(args.get("epoch", 0)), wire)
        return {"param_bytes": stage.param_bytes, "load_s": stage.load_s if loaded else 0.0, "loaded": loaded}

    def _close(self, sid: str) -> int:
        gone = [k for k in self._sessions if k[0] == sid]
        for k in gone:
            del self._sessions[k]
        return len(gone)

    def _evict(self) -> None:
        now = time.monotonic()
        for k, s in list(self._sessions.items()):
            if now - s.used > self.idle_s and not s.lock.locked():
                del self._sessions[k]
        by_age = sorted(
            (k for k, s in self._sessions.items() if not s.lock.locked()),
            key=lambda k: self._sessions[k].used,
        )
        for k in by_age[: max(0, len(by_age) - self.max_sessions + 1)]:
            del self._sessions[k]
        held = {k[1] for k in self._sessions}
        for key in list(self._stages):
            if key not in held and now - self._stage_used.get(key, now) > self.idle_s:
                del self._stages[key]

    # computing -------------------------------------------------------------------------------

    async def _run(self, session: _Session, stage: StageModel, pos: int, x: Any) -> tuple[Any, float]:
        """One step into `session` (caller holds its lock); the value to send on, and compute seconds."""
        if pos > session.pos:
            raise ServiceError(
                f"step at position {pos} but layers {stage.start}-{stage.end} of {self.fabric.node_id} "
                f"hold {session.pos}",
                target=self.fabric.node_id,
            )
        if pos < session.pos:
            session.drop_from(pos)
        tensor = _received(x)
        started = time.perf_counter()
        out = await asyncio.to_thread(stage.forward, tensor, session.cache, pos)
        compute_s = time.perf_counter() - started
        session.pos = pos + tensor.shape[1]
        if stage.last:
            return out, compute_s
        value = _on_wire(out, session.wire)
        session.sent.append((pos, tensor.shape[1], value))
        return value, compute_s

    async def _forward(self, args: dict[str, Any]) -> Reply:
        session, stage = self._session(args)
        pos = int(args["pos"])
        async with session.lock:
            out, compute_s = await self._run(session, stage, pos, args.get("x"))
        if stage.last:
            token = choose(out, args.get("sample") or {}, session.pos - 1)
            return Reply({"token": token}, {"compute_s": compute_s, "wire_bytes": 0.0})
        route = list(args.get("route") or [])
        if not route:
            raise ServiceError(f"layers {stage.start}-{stage.end} are not the last, and the route ends here")
        hop = route[0]
        reply = await self._call(
            hop,
            "forward",
            {**args, "stage": hop["stage"], "x": out, "route": route[1:]},
            args.get("deadline"),
        )
        metrics = dict(reply.metrics)
        metrics["compute_s"] = metrics.get("compute_s", 0.0) + compute_s
        metrics["wire_bytes"] = metrics.get("wire_bytes", 0.0) + wire_bytes(out)
        return Reply(reply.value, metrics)

    async def _call(self, hop: dict[str, Any], method: str, args: dict[str, Any], deadline: Any) -> Reply:
        """Call the stage at `hop`; its failure is reported as that node's, for the driver."""
        node = str(hop["node"])
        timeout = max(0.05, float(deadline) - time.time()) if deadline is not None else 60.0
        try:
            return await self.fabric.call(node, SERVICE, method, args, timeout=timeout)
        except CallFailed as exc:  # keep the code and the node it is about
            raise ServiceError(exc.detail, code=exc.code, target=exc.target) from exc
        except FabricError as exc:
            raise ServiceError(f"next stage on {node}: {exc}", code="unreachable", target=node) from exc

    async def _fill(self, args: dict[str, Any]) -> dict[str, Any]:
        session, stage = self._session(args)
        steps = list(args.get("steps") or [])
        async with session.lock:
            if session.pos:
                session.drop_from(0)
            for step in steps:
                await self._run(session, stage, int(step["pos"]), step["x"])
        return {"pos": session.pos}

    async def _handoff(self, args: dict[str, Any]) -> dict[str, Any]:
        session, _ = self._session(args)
        upto = int(args["upto"])
        steps, covered = [], 0
        for pos, n, value in session.sent:  # the steps must cover [0, upto) without a hole
            if pos >= upto or pos != covered:
                break
            steps.append({"pos": pos, "x": value})
            covered += n
        if covered < upto:
            raise ServiceError(
                f"session {args.get('session')}: {self.fabric.node_id} logged positions 0-{covered} "
                f"only, {upto} needed",
                target=self.fabric.node_id,
            )
        to = args["to"]
        fill = {
            "session": args["session"],
            "stage": to["stage"],
            "epoch": args.get("epoch", 0),
            "steps": steps,
        }
        reply = await self._call(to, "fill", fill, args.get("deadline"))
        return dict(reply.value)
