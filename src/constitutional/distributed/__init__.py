"""Scale-out on engines users already run: Ray for the generation stages.

``--executor ray`` (``sl revise``, ``rl sample``, ``rl label``) runs a stage through
:mod:`constitutional.distributed.ray`. This module holds what needs no Ray: the executor
names, the options, and the shard function, so the CLI can parse options without importing Ray.

Sharding is by a stable hash of each input record's id (a prompt id, or a pair id), so a record
always lands in the same shard whatever the order of the inputs, the number of actors, or the
machine; the shard count is pinned in the run directory so a re-run resumes the same shards.
"""

from __future__ import annotations

from typing import Any, Literal

from constitutional.core.io import stable_hash
from constitutional.core.settings import CLI_HIDDEN, Field, Settings


def shard_of(record_id: str, num_shards: int) -> int:
    """The shard of a record: a stable hash of its id, modulo ``num_shards``."""
    return int(stable_hash("shard", record_id), 16) % num_shards


PANEL = {"panel": "Scale-out"}  # where the CLI's help lists these options


class RayOptions(Settings):
    """Where a generation stage runs: in this process, or on Ray actors (a local Ray, or a
    cluster). Sharding, retries and the per-actor share are set here."""

    executor: Literal["local", "ray"] = Field(
        "local", description="local (this process) or ray (Ray actors: a local Ray, or the "
                             "cluster at --ray-address / $RAY_ADDRESS).",
        json_schema_extra=PANEL)
    address: str | None = Field(
        None, description="Ray cluster address (host:6379, ray://host:10001, auto); default "
                          "$RAY_ADDRESS, else a new local Ray with num_actors × cpus_per_actor "
                          "CPUs.", json_schema_extra={**PANEL, "cli": ["--ray-address"]})
    num_actors: int | None = Field(
        None, ge=1, description="Ray actors, each holding one model (default: CPUs, or GPUs, / "
                                "per-actor share).", json_schema_extra=PANEL)
    num_shards: int | None = Field(
        None, ge=1, description="Shards (by a stable hash of the record id); default: as pinned "
                                "in --out, else --num-actors.", json_schema_extra=PANEL)
    cpus_per_actor: int = Field(1, ge=1, description="CPUs (and torch threads) per Ray actor.",
                                json_schema_extra=PANEL)
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per Ray actor (default: 1 when the cluster has GPUs, else "
                                "0).", json_schema_extra=PANEL)
    retries: int = Field(3, ge=0, description="Restarts of a dead actor, and re-runs of a failed "
                                              "shard.", json_schema_extra=PANEL)
    model_options: dict[str, Any] = Field(default_factory=dict, json_schema_extra=CLI_HIDDEN,
                                          description="Passed to load_model in every actor.")

    @property
    def on_ray(self) -> bool:
        return self.executor == "ray"
