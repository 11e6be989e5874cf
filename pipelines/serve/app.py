"""The Ray Serve application: a FastAPI ingress whose replicas featurize, search and vote.

Each replica (:class:`FungiReplica`) loads the served version (:func:`pipelines.serve.index.load_version`)
with the batch job's featurize stage (:class:`pipelines.serve.engine.ServingFeaturizer`), then
follows the output's commits in a thread: a new version is built beside the one serving and
swapped in whole. A request reads ``self.served`` once and answers from that version alone.

Concurrent requests are coalesced by ``@serve.batch`` into one featurize call (at most
``max_batch_size`` requests, waiting at most ``batch_wait_s`` for them). Serve caps the requests a
replica holds at ``max_ongoing_requests``, which would silently cap the batch too (Ray issue
43288): :func:`build_app` sets it above the batch size.

Serve pickles the ingress class by value when it is decorated: what its methods call must be
defined above it, and no ``from __future__ import annotations`` here (FastAPI, on the replica,
could not resolve ``request: "Request"`` and would take the request for a query parameter).
"""
import asyncio
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from pipelines.serve.api import (
    DEFAULT_NEIGHBOURS_K, BadRequest, Limits, Query, check_length, item_error, parse_query,
)
from pipelines.serve.index import DEFAULT_EXACT_ROWS, FUNGI, ServedVersion, commit_point, load_version, unit_rows

log = logging.getLogger("fungi.serve")

APP_NAME = "fungi"


@dataclass(frozen=True)
class ServeSettings:
    """What every replica needs, as plain data (it travels to the replicas pickled).

    ``token_sha256``: the bearer token's digest, never the token (the settings are visible in Ray's state).
    """

    output: str
    catalog: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    label_column: str | None = None
    features: tuple[str, ...] = (FUNGI,)
    exact_rows: int = DEFAULT_EXACT_ROWS
    poll_s: float = 60.0
    max_image_pixels: int = 100_000_000
    limits: Limits = Limits()
    token_sha256: str | None = None
    batch_size: int | str = "auto"
    threads: int | None = None
    gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_s: float = 0.01


def token_digest(token: str) -> str:
    """The digest a replica compares a presented bearer token's with."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def build_app(settings: ServeSettings, *, replicas: int | tuple[int, int] = 1, cpus_per_replica: float = 1.0,
              gpus_per_replica: float = 0.0) -> Any:
    """The bound Serve application: ``replicas`` fixed, or ``(min, max)`` autoscaled on ongoing requests."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # above the batch: Serve holds no more requests per replica than this (Ray issue 43288)
        "max_ongoing_requests": 2 * settings.max_batch_size + 8,
        "health_check_period_s": 10,
    }
    if isinstance(replicas, tuple):
        options["autoscaling_config"] = {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                         "target_ongoing_requests": settings.max_batch_size}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(FungiReplica, name="FungiReplica", **options).bind(settings)


def _combination(served: ServedVersion, requested: str | None) -> str:
    """The index a ``features`` value names; 422 naming the indexed ones otherwise."""
    if requested is None:
        requested = FUNGI
    if requested in served.indexes:
        return requested
    parts = requested.split("+")
    for name, columns in served.combos.items():
        if set(columns) == set(parts):
            return name
    raise BadRequest(422, f"features: {requested!r} is not indexed; this server indexes {', '.join(served.indexes)} "
                          "(start it with --features to index others)")


def _json(value: Any) -> Any:
    """A kept column's value as JSON has it (timestamps as ISO text, bytes as their length-free hex)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _nearest(served: ServedVersion, items: list[Any], name: str,
             k: int) -> tuple[list[Any], list[tuple[int, np.ndarray, np.ndarray]]]:
    """The ``k`` nearest rows of each featurized item on combination ``name``.

    ``(answers, hits)``: ``answers`` holds each failed item's error in its place (the caller
    fills the others); ``hits`` one ``(position, similarities, row indices)`` per featurized
    item, best first, without the ``-1`` rows an IVF search leaves when it finds fewer than ``k``.
    """
    answers: list[Any] = [item_error(item.id, item.error, item.stage) for item in items]
    good = [i for i, item in enumerate(items) if item.error is None]
    if not good:
        return answers, []
    vectors = served.unit_rows({c: np.stack([items[i].features[c] for i in good]) for c in served.dims}, name)
    scores, rows = served.indexes[name].search(vectors, k)
    found = rows >= 0
    return answers, [(i, scores[p, found[p]], rows[p, found[p]]) for p, i in enumerate(good)]


api = FastAPI(title="fungi serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)
class FungiReplica:
    """One replica: the served version (featurizer and indexes), its following thread, the endpoints."""

    def __init__(self, settings: ServeSettings) -> None:
        from pipelines.formats import open_output
        from pipelines.serve.engine import ServingFeaturizer

        logging.basicConfig(level=logging.INFO)
        self.settings = settings
        self.output = open_output(settings.output, settings.storage_options, catalog=settings.catalog)
        root = self.output.root

        def make_featurizer(manifest: Any) -> ServingFeaturizer:
            return ServingFeaturizer(root, manifest, max_image_pixels=settings.max_image_pixels,
                                     threads=settings.threads, batch_size=settings.batch_size, gpus=settings.gpus)

        self.make_featurizer = make_featurizer
        self.served: ServedVersion = self._load(None)
        self.follow_error: str | None = None
        self._featurize_batched.set_max_batch_size(settings.max_batch_size)
        self._featurize_batched.set_batch_wait_timeout_s(settings.batch_wait_s)
        if settings.version is None and settings.poll_s > 0:
            threading.Thread(target=self._follow, name="fungi-follow", daemon=True).start()

    # -- versions -------------------------------------------------------------------
    def _load(self, previous: ServedVersion | None) -> ServedVersion:
        settings = self.settings
        served = load_version(self.output, version=settings.version, label_column=settings.label_column,
                              features=settings.features, exact_rows=settings.exact_rows,
                              make_featurizer=self.make_featurizer, previous=previous)
        for name, index in served.indexes.items():
            log.info("fungi serve: version %s, index %s: %s", served.version, name, index.describe())
        return served

    def _follow(self) -> None:
        """Poll the commit point; build the new version beside the served one, then swap it in whole."""
        while True:
            time.sleep(self.settings.poll_s)
            try:
                if commit_point(self.output) == self.served.point:
                    continue
                self.served = self._load(self.served)
                self.follow_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving the version held, and say why in /spec
                self.follow_error = f"{type(exc).__name__}: {exc}"
                log.warning("fungi serve: keeps serving version %s: %s", self.served.version, self.follow_error)

    # -- requests -------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        digest = self.settings.token_sha256
        if digest is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), digest):
            raise BadRequest(401, "authorization: missing or wrong bearer token (send 'Authorization: Bearer TOKEN')")

    async def _query(self, request: Request, served: ServedVersion, *, default_k: int | None = None,
                     allow_features: bool = False) -> Query:
        self._authorize(request)
        limits = self.settings.limits
        check_length(request.headers.get("content-length"), limits)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limits.max_body_bytes:
                raise BadRequest(413, f"body: over --max-body-mb ({limits.max_body_bytes} bytes)")
        return parse_query(bytes(body), served.featurizer.modality, limits, default_k=default_k,
                           allow_features=allow_features)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _featurize_batched(self, jobs: list[tuple[ServedVersion, Query]]) -> list[list[Any]]:
        """One featurize call per featurizer for the items of every request in the batch, split back."""
        results: list[list[Any]] = [[] for _ in jobs]
        groups: dict[int, list[int]] = {}
        for position, (served, _) in enumerate(jobs):
            groups.setdefault(id(served.featurizer), []).append(position)
        for positions in groups.values():
            featurizer = jobs[positions[0]][0].featurizer
            ids = [i for p in positions for i in jobs[p][1].ids]
            payloads = [x for p in positions for x in jobs[p][1].payloads]
            items = await asyncio.to_thread(featurizer.featurize, ids, payloads)
            start = 0
            for p in positions:
                count = len(jobs[p][1].ids)
                results[p] = items[start:start + count]
                start += count
        return results

    async def _features(self, request: Request, **options: Any) -> tuple[ServedVersion, Query, list[Any]]:
        served = self.served  # this request's one version
        query = await self._query(request, served, **options)
        return served, query, await self._featurize_batched((served, query))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """200 once this replica answers (no token: probes call it)."""
        return {"ok": True, "version": self.served.version}

    @api.get("/spec")
    async def spec(self, request: Request) -> Any:
        """What is served: :meth:`spec_document`."""
        try:
            self._authorize(request)
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return self.spec_document()

    def spec_document(self) -> dict[str, Any]:
        """What ``GET /spec`` answers (the CLI prints it at start)."""
        served = self.served
        return {
            "spec": served.manifest.spec, "spec_hash": served.spec_hash, "version": served.version,
            "run_id": served.run_id, "rows": int(len(served.ids)), "features": served.dims,
            "indexes": {name: index.describe() for name, index in served.indexes.items()},
            "recall_at_10": {name: index.recall_at_10 for name, index in served.indexes.items()},
            "label_column": self.settings.label_column, "kept_columns": served.kept.column_names,
            "following": self.settings.version is None and self.settings.poll_s > 0,
            "follow_error": self.follow_error,
        }

    @api.post("/featurize")
    async def featurize(self, request: Request) -> Any:
        """Each item's feature columns and their FUNGI concatenation, or its error."""
        try:
            served, query, items = await self._features(request)
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        answers = []
        columns = served.combos.get(FUNGI) or tuple(served.dims)
        for item in items:
            if item.error is not None:
                answers.append(item_error(item.id, item.error, item.stage))
                continue
            answer: dict[str, Any] = {"id": item.id}
            answer.update({name: vector.tolist() for name, vector in item.features.items()})
            answer[FUNGI] = unit_rows({c: item.features[c][None, :] for c in columns}, columns)[0].tolist()
            answers.append(answer)
        return {"spec_hash": served.spec_hash, "version": served.version, "items": answers}

    @api.post("/neighbours")
    async def neighbours(self, request: Request) -> Any:
        """Each item's ``k`` nearest rows of the served version, by cosine on the requested combination."""
        try:
            served, query, items = await self._features(request, default_k=DEFAULT_NEIGHBOURS_K, allow_features=True)
            name = _combination(served, query.features)
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        answers, hits = _nearest(served, items, name, query.k)
        for i, scores, rows in hits:
            kept = served.kept.take(rows).to_pylist() if served.kept.num_columns else [{} for _ in rows]
            answers[i] = {"id": items[i].id, "neighbours": [
                {"id": _json(served.ids[r]), "score": float(s), **{k: _json(v) for k, v in extra.items()}}
                for r, s, extra in zip(rows, scores, kept)
            ]}
        return {"spec_hash": served.spec_hash, "version": served.version, "features": name, "items": answers}

    @api.post("/classify")
    async def classify(self, request: Request) -> Any:
        """Each item's label by ``fungi eval``'s weighted k-NN vote over the served rows."""
        from fungi_ops.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, vote_scores

        try:
            served, query, items = await self._features(request, default_k=DEFAULT_K)
            if served.classes is None:
                raise BadRequest(422, "classify: the server was started without --label-column, and the output keeps no 'label'")
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        answers, hits = _nearest(served, items, FUNGI, query.k)
        for i, sims, rows in hits:
            row = vote_scores(sims[None, :], served.codes[rows][None, :], len(served.classes),
                              temperature=DEFAULT_TEMPERATURE)[0]
            order = [c for c in np.argsort(-row, kind="stable") if row[c] > 0]
            total = float(row.sum())
            answers[i] = {"id": items[i].id, "label": _json(served.classes[int(row.argmax())]),
                          "scores": [{"label": _json(served.classes[c]), "score": float(row[c]) / total} for c in order]}
        return {"spec_hash": served.spec_hash, "version": served.version, "k": query.k, "items": answers}
