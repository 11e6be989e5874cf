"""The name ``feature_store.yaml`` gives the online store (``type: pipelines.feast_online.FungiSqliteOnlineStore``).

Kept for the repositories that name it; the store is :mod:`pipelines.feast.online_store`.
"""
from pipelines.feast.online_store import FungiSqliteOnlineStore, FungiSqliteOnlineStoreConfig  # noqa: F401
