"""Renders docs/protocol.md from the wire models; run ``python -m protocol.docgen > docs/protocol.md``.

The page is the contract for peers written in other languages, so everything on it comes from the
code: field tables from the pydantic models' JSON Schema, byte layouts from the codec's constants,
and a worked example frame produced by the encoder itself.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, get_args

from pydantic import BaseModel

from protocol._bulk import BulkStatus
from protocol._bulk import __doc__ as bulk_doc
from protocol._chunking import CHUNK_SIZE
from protocol._codec import _MAX_DEPTH as MAX_DEPTH
from protocol._codec import DEFAULT_MAX_FRAME, MAX_VALUES, encode
from protocol._envelope import PROTOCOL_VERSION, Envelope
from protocol._errors import __doc__ as errors_doc
from protocol._messages import Body, Capabilities, Heartbeat, PatchOp, Placement, Resources, TaskSpec
from protocol._models import MAX_HOPS
from protocol._signing import Signer
from protocol._tensor import DTYPES, LOSSY_EXT, MAX_NDIM, TENSOR_EXT, Lossy
from protocol._tensor import __doc__ as tensor_doc
from protocol._values import MAX_VALUE_DEPTH

__all__ = ["render"]


def _type(prop: dict[str, Any]) -> str:
    """A short, language-neutral type name for one JSON Schema property."""
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[-1]}](#{prop['$ref'].rsplit('/', 1)[-1].lower()})"
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "oneOf" in prop:
        return "one of " + ", ".join(_type(p) for p in prop["oneOf"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f'`"{v}"`' for v in prop["enum"])
    kind = prop.get("type")
    if kind is None:
        return "any value"
    if kind == "array":
        return f"array of {_type(prop.get('items', {}))}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"map of string to {_type(extra)}" if isinstance(extra, dict) else "map"
    names = {"string": "string", "integer": "integer", "number": "float", "boolean": "bool", "null": "nil"}
    text: str = names.get(kind, str(kind))
    if prop.get("format") == "binary":
        text = "bin"
    limits = []
    for key, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in prop:
            limits.append(f"{sign} {prop[key]}")
    for key, word in (
        ("minLength", "len >="),
        ("maxLength", "len <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ):
        if key in prop:
            limits.append(f"{word} {prop[key]}")
    if "pattern" in prop:
        limits.append(f"matches `{prop['pattern']}`")
    return text + (f" ({', '.join(limits)})" if limits else "")


def _field_table(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation")
    # The discriminator is optional in Python (it has a default) but required on the wire.
    required = set(schema.get("required", [])) | ({"kind", "op"} & set(schema["properties"]))
    rows = ["| field | type | required | default | meaning |", "|---|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        field = model.model_fields[name]
        value = prop.get("default", field.get_default(call_default_factory=True))
        if isinstance(value, BaseModel):
            value = value.model_dump()
        default = "" if name in required else f"`{json.dumps(value)}`"
        desc = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        if name in getattr(model, "WIRE_OMIT_NONE", ()):
            desc += " *Omitted when unset.*"
        kind = _type(prop).replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {'yes' if name in required else 'no'} | {default} | {desc} |")
    return "\n".join(rows)


def _section(model: type[BaseModel], level: str = "###") -> str:
    doc = " ".join((model.__doc__ or "").split(">>>")[0].split())
    kind = model.model_fields.get("kind")
    is_message = kind is not None and isinstance(kind.default, str)
    title = f"`{kind.default}`: {model.__name__}" if kind is not None and is_message else model.__name__
    anchor = f'<a id="{model.__name__.lower()}"></a>'
    return f"{anchor}\n{level} {title}\n\n{doc}\n\n{_field_table(model)}\n"


def _example_frame() -> tuple[str, str]:
    env = Envelope(
        v=PROTOCOL_VERSION,
        id="018f3a2b4c5d00000123456789abcdef",
        src="edge-1",
        dst="orchestrator",
        ts=1700000000.25,
        body=Heartbeat(seq=7, running=1),
    )
    frame = encode(env, signer=Signer("k1", bytes(range(32))))
    lines = [frame[i : i + 16].hex(" ") for i in range(0, len(frame), 16)]
    return env.model_copy(update={"kid": "k1"}).model_dump_json(exclude={"sig"}), "\n".join(lines)


def render() -> str:
    """The full text of docs/protocol.md."""
    bodies = [m for m in get_args(get_args(Body)[0])]
    ops = list(get_args(get_args(PatchOp)[0]))
    dtype_rows = "\n".join(
        f"| {code} | `{name}` | {size} |" for code, (name, _, size) in sorted(DTYPES.items())
    )
    example_json, example_hex = _example_frame()
    parts = [
        "# The Flowloom wire protocol",
        "",
        "<!-- Generated by `python -m protocol.docgen > docs/protocol.md` (or `make docs`). "
        "Do not edit: tests/test_docs.py fails when this page and the code disagree. -->",
        "",
        f"Protocol version **{PROTOCOL_VERSION}**. Everything a peer in another language needs: the frame, "
        "every message, the tensor and chunk byte layouts, signing, limits and errors.",
        "",
        "## Frames",
        "",
        "A frame is exactly one [msgpack](https://msgpack.org/) value: a map whose keys are the envelope "
        "fields below. Encoders write every key, in this order, unset optional fields as `nil`, except "
        "optional fields added to a version after its first release (marked *omitted when unset*), "
        "which are left out so that peers predating them still decode the frame; decoders "
        "accept any order and absent optional keys, except that `sig` must be the last entry of a "
        "signed frame. "
        "Strings are UTF-8 `str`; bytes are `bin`; integers use the smallest msgpack int that fits; "
        "floats are float64. Nothing may follow the map. Frames larger than "
        f"{DEFAULT_MAX_FRAME} bytes are refused by default. Validation is strict: no field is "
        "coerced from another type (an integer is accepted where a float is expected), unknown "
        "fields are refused, typed float fields must be finite. Fields typed `any value` carry a "
        "*wire value*: nil, bool, int, float (NaN and inf allowed), str, bin, an array of wire values, "
        "a map with string keys, or a tensor (below); nested at most "
        f"{MAX_VALUE_DEPTH} levels. msgpack ext types other than {TENSOR_EXT} and {LOSSY_EXT} (the "
        "timestamp ext -1 included) are refused.",
        "",
        _section(Envelope, "###"),
        f"Destinations (`dst`): a node id, `group:<name>`, or `*` for every node. At most {MAX_HOPS} hops.",
        "",
        "### Version negotiation",
        "",
        "A joining node sends `hello` with every version it speaks; the answer is `welcome` carrying "
        "the highest version both sides share, or `error` with code `version_mismatch`. A frame whose "
        "`v` the receiver does not read is refused with `version_mismatch`; a body `kind` it does not "
        "know, with `unknown_kind`.",
        "",
        "## Signing",
        "",
        "Signing is optional per fabric; a receiver configured with keys refuses unsigned frames. To sign, "
        "set `kid` to the key id, encode the map with `sig` as its last entry, and make the value of "
        "`sig` a 32-byte `bin` (`c4 20` + MAC) where",
        "",
        "    MAC = HMAC-SHA256(key[kid], frame[0 : len(frame) - 34])",
        "",
        'that is, every byte up to and including the key `"sig"` (`a3 73 69 67`). A receiver checks, in '
        "order: `kid` and `sig` are set; the key id is known; the frame ends in `a3 73 69 67 c4 20` + "
        "32 bytes; the MAC matches (constant-time compare); `|now - ts|` is within the accepted skew "
        "(default 30 s); the `id` has not been accepted before. Replay memory is bounded: an id is "
        "forgotten when it falls out of the skew window or, when the cache is full, oldest first; "
        "either way every timestamp at or "
        "below the forgotten one's is refused from then on.",
        "",
        "### A worked example",
        "",
        "The heartbeat envelope",
        "",
        "```json",
        example_json,
        "```",
        "",
        "signed with the 32-byte key `00 01 02 ... 1f` (its `sig` is the MAC) is this frame (hex):",
        "",
        "```",
        example_hex,
        "```",
        "",
        "## Messages",
        "",
        "The body is a map whose `kind` field selects one of these models; the set is closed.",
        "",
        *[_section(m) for m in bodies],
        "## Shared models",
        "",
        *[_section(m) for m in (Capabilities, TaskSpec, Resources, Placement)],
        "### Graph patch operations",
        "",
        "A patch op is a map whose `op` field selects one of these.",
        "",
        *[_section(m, "####") for m in ops],
        "## Tensors",
        "",
        "Numpy arrays and torch tensors may appear anywhere inside `any value` fields. They travel as "
        f"msgpack ext type {TENSOR_EXT}; lossy-compressed float tensors as ext type {LOSSY_EXT}. "
        "Encoders in this codebase always write ext32 (`c9`, uint32 big-endian length, int8 type). "
        "Data are C-contiguous and little-endian; decoders return views on the received frame "
        "when the data are aligned (the encoder pads so they start 16-byte aligned in the frame). "
        "Decoders refuse non-zero pad or reserved bytes, bool elements other than 0 and 1, and data "
        "whose length differs from `prod(dims) * itemsize`.",
        "",
        "```",
        "Tensor ext (type 1)::" + (tensor_doc or "").split("Tensor ext (type 1)::")[1].rstrip(),
        "```",
        "",
        "Lossy float16 and bfloat16 data are `2 * prod(dims)` bytes (bfloat16 as the upper 16 bits of "
        "the float32 pattern); int8 data are `4 * rows + prod(dims)` bytes.",
        "",
        "| code | dtype | bytes per element |",
        "|---|---|---|",
        dtype_rows,
        "",
        "### Lossy formats and their error bounds",
        "",
        " ".join((Lossy.__doc__ or "").split("Error bounds")[0].split()),
        "",
        textwrap.dedent(
            "    Error bounds" + (Lossy.__doc__ or "").split("Error bounds")[1].split(">>>")[0]
        ).strip(),
        "",
        "bfloat16 is rounded to nearest, ties to even; int8 values are `round(x / s)` clipped to "
        "[-127, 127]; decoding computes `q * s` and returns the original dtype.",
        "",
        "## Chunked transfers",
        "",
        f"A payload larger than one frame (default chunk size {CHUNK_SIZE} bytes, under Mosquitto's 2 MB "
        "default packet limit) is cut into `blob.chunk` bodies sharing one `transfer` id. Every chunk but "
        "the last carries exactly `chunk_size` bytes at `offset = index * chunk_size`; the last carries "
        "the rest; `count = ceil(size / chunk_size)` (1 for an empty payload). `crc32c` is the CRC-32C "
        "(Castagnoli polynomial 0x1EDC6F41, reflected, init and final xor 0xFFFFFFFF; iSCSI, RFC 3720) "
        "of `data`. A receiver refuses a chunk whose checksum, count, size, offset or length disagrees "
        "with the transfer, ignores repeated chunks, bounds the bytes it buffers, and drops a partial "
        "transfer that stays idle past its timeout (default 30 s), and ignores chunks of a transfer it "
        "completed within that time. The reassembled payload is a frame: decode it like any other "
        "(its signature and freshness are checked as usual) and refuse it unless its `src` is the "
        "chunks' `src`. On a fabric that signs, chunk envelopes are signed like any other. Senders "
        "chunk every envelope whose frame exceeds the chunk size by more than 4096 bytes.",
        "",
        "## Direct bulk streams",
        "",
        "A node that announces a `bulk` address in its `hello` also accepts large envelopes over a "
        "direct TCP connection, beside the broker: the sender streams the encoded envelope there, then "
        "sends a small `blob.ref` through the fabric naming the stored transfer. The receiver delivers "
        "the stored envelope when the `blob.ref` arrives, so it keeps its place among the sender's "
        "other messages; decode it like a reassembled chunked payload (signature, freshness, same "
        "`src` as the `blob.ref`), and refuse it unless its size and CRC-32C match the `blob.ref`. "
        "A stored frame waits for its `blob.ref` while its sender is alive (the `blob.ref` may queue behind "
        "other messages); it is dropped once its sender is gone, or its `blob.ref` arrives expired. A "
        "sender falls back to `blob.chunk` whenever the stream fails or is refused.",
        "",
        "```",
        (bulk_doc or "").split("Per transfer:")[1].split("After a refusal")[0].strip("\n"),
        "```",
        "",
        "| status byte | meaning |",
        "|---|---|",
        *[f"| {s.value} `{s.name}` | {s.meaning} |" for s in BulkStatus],
        "",
        "After a refusal " + " ".join((bulk_doc or "").split("After a refusal")[1].split()),
        "",
        "## Limits",
        "",
        f"- A frame: {DEFAULT_MAX_FRAME} bytes unless the receiver sets another limit.",
        f"- Hops: {MAX_HOPS}. Tensor dims: {MAX_NDIM}.",
        f"- Nesting: {MAX_VALUE_DEPTH} levels inside an `any value` field, checked by the models "
        f"whichever way a frame was read; a frame nesting deeper than {MAX_DEPTH} levels is refused.",
        f"- Values: at most {MAX_VALUES} scalars and containers in one frame (tensor and bin bytes do not "
        "count); send bulk data as tensors or bins.",
        "- Strings: the patterns in the tables; free text at most 4096 characters.",
        "- Map keys are strings.",
        "",
        "## Which error code to answer with",
        "",
        "| refused because | `error.code` |",
        "|---|---|",
        "| malformed bytes, an invalid field or tensor, a chunk that does not fit its transfer | `decode` |",
        "| an unknown body kind | `unknown_kind` |",
        "| an unsupported `v`, or no common version in `hello` | `version_mismatch` |",
        "| a frame or transfer above the limit | `too_large` |",
        "| unsigned, unknown key id, or wrong MAC | `bad_signature` |",
        "| a replayed id, or a timestamp outside the skew | `replay` |",
        "",
        "A receiver may also stay silent: answering every bad frame would let anyone make it talk.",
        "",
        "## Errors",
        "",
        "Peers report refused messages with an `error` body; its `code` is one of the values in the "
        "table above. In Python, every failure is an exception of this tree:",
        "",
        "```",
        (errors_doc or "").split("::")[1].split("Higher layers")[0].strip("\n"),
        "```",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
