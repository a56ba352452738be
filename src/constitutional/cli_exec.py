"""The ``--executor`` options shared by the generation commands (``sl revise``, ``rl sample``,
``rl label``): run in this process, or on Ray actors (:mod:`constitutional.distributed.ray`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from constitutional.distributed import RayOptions, check_executor

ExecutorOpt = Annotated[str, typer.Option(
    help="local (this process) or ray (Ray actors: a local Ray, or the cluster at "
         "--ray-address / $RAY_ADDRESS).", rich_help_panel="Scale-out")]
RayAddressOpt = Annotated[str | None, typer.Option(
    help="Ray cluster address (host:6379, ray://host:10001, auto); default $RAY_ADDRESS, else a "
         "new local Ray.", rich_help_panel="Scale-out")]
NumActorsOpt = Annotated[int | None, typer.Option(
    help="Ray actors, each holding one model (default: CPUs, or GPUs, / per-actor share).",
    rich_help_panel="Scale-out")]
NumShardsOpt = Annotated[int | None, typer.Option(
    help="Shards (by a stable hash of the record id); default: as pinned in --out, else "
         "--num-actors.", rich_help_panel="Scale-out")]
CpusPerActorOpt = Annotated[int, typer.Option(
    help="CPUs (and torch threads) per Ray actor.", rich_help_panel="Scale-out")]
GpusPerActorOpt = Annotated[float | None, typer.Option(
    help="GPUs per Ray actor (default: 1 when the cluster has GPUs, else 0).",
    rich_help_panel="Scale-out")]


def ray_options(executor: str, ray_address: str | None, num_actors: int | None,
                num_shards: int | None, cpus_per_actor: int, gpus_per_actor: float | None,
                model_options: dict[str, Any] | None = None) -> RayOptions | None:
    """The Ray options for ``--executor ray``, or None to run in this process."""
    if check_executor(executor) == "local":
        return None
    options = RayOptions(address=ray_address, num_actors=num_actors, num_shards=num_shards,
                         cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                         model_options=dict(model_options or {}))
    options.validate()
    return options
