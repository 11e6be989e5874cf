"""Requests and their limits: a bad request is a 4xx whose message names the field, never a 500.

The JSON bodies (see README "Serving features online"):

* ``POST /featurize`` ``{"items": [{"id": "q1", "<modality>": PAYLOAD}, ...]}``: the modality
  key is the output's (``text``: a string; ``image``, ``audio``: base64 of the file's bytes);
  ``id`` is optional (a string; default the item's position).
* ``POST /neighbours`` the same, with ``"k"`` (default 10) and ``"features"`` (default ``fungi``).
* ``POST /classify`` the same, with ``"k"`` (default 20, as ``fungi eval``).

Limits protect a replica's memory: ``max_items`` per request, ``max_body_bytes`` of JSON
(checked on the Content-Length and on what arrives), and the decoder's ``--max-image-pixels``.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

MODALITIES = ("text", "image", "audio")
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_NEIGHBOURS_K = 10
MAX_K = 1000


class BadRequest(Exception):
    """A request the server refuses: ``status`` (400, 401, 413, 422) and a message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_items: int = DEFAULT_MAX_ITEMS
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)


@dataclass(frozen=True)
class Query:
    """A parsed request: item ids and payloads (str for text, bytes otherwise), and its options."""

    ids: list[str]
    payloads: list[Any]
    k: int | None = None
    features: str | None = None


def check_length(content_length: str | None, limits: Limits) -> None:
    """413 before the body is read when its declared length is over the limit."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise BadRequest(413, f"body: {int(content_length)} bytes, over --max-body-mb ({limits.max_body_bytes} bytes)")


def parse_query(body: bytes, modality: str, limits: Limits, *, default_k: int | None = None,
                allow_features: bool = False) -> Query:
    """The request ``body`` (JSON) for an output of ``modality``; :class:`BadRequest` naming the field that is wrong."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"body: {len(body)} bytes, over --max-body-mb ({limits.max_body_bytes} bytes)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"body: expected a JSON object with 'items', got {type(data).__name__}")
    allowed = {"items"} | ({"k"} if default_k is not None else set()) | ({"features"} if allow_features else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(422, f"{unknown[0]}: unknown field; this endpoint takes {', '.join(sorted(allowed))}")
    items = data.get("items")
    if items is None:
        raise BadRequest(422, "items: missing; send {\"items\": [{\"id\": ..., \"" + modality + "\": ...}]}")
    if not isinstance(items, list) or not items:
        raise BadRequest(422, "items: expected a non-empty list")
    if len(items) > limits.max_items:
        raise BadRequest(413, f"items: {len(items)} items, over --max-items ({limits.max_items})")
    ids, payloads = [], []
    for position, item in enumerate(items):
        where = f"items[{position}]"
        if not isinstance(item, dict):
            raise BadRequest(422, f"{where}: expected an object with '{modality}', got {type(item).__name__}")
        others = sorted(set(item) - {"id", modality})
        if others:
            wrong = others[0]
            hint = f"this output's modality is {modality}" if wrong in MODALITIES else f"an item takes 'id' and '{modality}'"
            raise BadRequest(422, f"{where}.{wrong}: unknown key; {hint}")
        if modality not in item:
            raise BadRequest(422, f"{where}.{modality}: missing")
        item_id = item.get("id", str(position))
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise BadRequest(422, f"{where}.id: expected a string, got {type(item_id).__name__}")
        ids.append(str(item_id))
        payloads.append(_payload(item[modality], modality, f"{where}.{modality}"))
    k = None
    if default_k is not None:
        k = data.get("k", default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise BadRequest(422, f"k: expected an integer from 1 to {MAX_K}, got {k!r}")
    features = data.get("features")
    if features is not None and not isinstance(features, str):
        raise BadRequest(422, f"features: expected a string such as 'fungi' or 'embedding+grad_kl', got {features!r}")
    return Query(ids, payloads, k, features)


def _payload(value: Any, modality: str, where: str) -> Any:
    """A text as it is; an image's or audio's base64 decoded to the file's bytes."""
    if modality == "text":
        if not isinstance(value, str):
            raise BadRequest(422, f"{where}: expected a string, got {type(value).__name__}")
        return value
    if not isinstance(value, str):
        raise BadRequest(422, f"{where}: expected base64 of the file's bytes, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(422, f"{where}: not base64 ({exc})") from None


def item_error(item_id: str, error: str, stage: str) -> dict[str, str]:
    """An item that failed, in place of its answer (as the job's ``_errors`` table has it)."""
    return {"id": item_id, "error": error, "stage": stage}
