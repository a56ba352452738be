"""Scale-out on engines users already run: Ray for the generation stages.

``--executor ray`` (``sl revise``, ``rl sample``, ``rl label``) runs a stage through
:mod:`constitutional.distributed.ray`. This module holds what needs no Ray: the executor
names, the options, and the shard function, so the CLI can parse options without importing Ray.

Sharding is by a stable hash of each input record's id (a prompt id, or a pair id), so a record
always lands in the same shard whatever the order of the inputs, the number of actors, or the
machine; the shard count is pinned in the run directory so a re-run resumes the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from constitutional.errors import UserError
from constitutional.store import stable_hash

#: ``--executor`` values: ``local`` (this process) or ``ray`` (Ray actors, local or a cluster).
EXECUTORS = ("local", "ray")


def shard_of(record_id: str, num_shards: int) -> int:
    """The shard of a record: a stable hash of its id, modulo ``num_shards``."""
    return int(stable_hash("shard", record_id), 16) % num_shards


@dataclass(frozen=True)
class RayOptions:
    """How a stage runs on Ray.

    * ``address`` — a cluster (``host:6379``, ``ray://host:10001``, ``auto``); default
      ``$RAY_ADDRESS``, else a new local Ray with ``num_actors × cpus_per_actor`` CPUs;
    * ``num_actors`` — model replicas; default: the cluster's CPUs (or GPUs, with
      ``gpus_per_actor``) divided by what one actor takes;
    * ``num_shards`` — default: the count pinned in the run directory, else ``num_actors``;
    * ``cpus_per_actor`` — also each actor's ``OMP_NUM_THREADS``, so actors do not
      oversubscribe the cores;
    * ``gpus_per_actor`` — default: 1 when the cluster has GPUs, else 0;
    * ``retries`` — restarts of a dead actor and re-runs of a failed shard;
    * ``model_options`` — passed to ``load_model`` in every actor (``device`` …).
    """

    address: str | None = None
    num_actors: int | None = None
    num_shards: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float | None = None
    retries: int = 3
    model_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("num_actors", "num_shards"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"must be at least 1, got {value}", field=name)
        if self.cpus_per_actor < 1:
            raise UserError(f"must be at least 1, got {self.cpus_per_actor}",
                            field="cpus_per_actor")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UserError(f"must be at least 0, got {self.gpus_per_actor}",
                            field="gpus_per_actor")
        if self.retries < 0:
            raise UserError(f"must be at least 0, got {self.retries}", field="retries")


def check_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise UserError(f"must be one of {', '.join(EXECUTORS)}, got {executor!r}",
                        field="executor")
    return executor
