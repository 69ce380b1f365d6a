"""The ranks other than 0: load the same model, then follow rank 0's steps (no HTTP).

`follower_main` is a spawned local rank's entry (``-tp N``, a ``MISTRALRS_MN_*`` node);
`serve_as_follower` is what ``mistralrs serve`` does on such a rank under torchrun or on an MN
worker node. Both load through `serving.ModelService`, exactly as rank 0 does, so every rank
builds the same shards, the same KV pool and runs the same warm-up forward.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mistralrs.distributed.world import (
    DistributedError,
    World,
    exit_with_parent,
    init_rank,
    join_world,
)
from mistralrs.errors import MistralRsError

log = logging.getLogger("mistralrs.distributed")


def follower_main(opts: Any, rank: int, size: int, local_rank: int, addr: str, port: int, parent: int) -> None:
    """A spawned local rank: join, load the same model, follow rank 0's steps until told to stop."""
    import sys

    exit_with_parent(parent)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank)})
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    try:
        from mistralrs.nn.kernels import device_type_of
        from mistralrs.plugins import get_registry
        from mistralrs.serving import pick_device

        kind = device_type_of(pick_device(get_registry(), cpu=opts.cpu, device=opts.device))
        world = init_rank(rank, size, local_rank, kind, addr, port)
        run_follower(opts, world)
    except MistralRsError as exc:
        print(f"mistralrs: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - a rank's death is reported, then the process ends
        print(f"mistralrs: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


def run_follower(opts: Any, world: World) -> None:
    """Load the model as rank `world.rank` (the same `ModelService` path as rank 0) and follow."""
    from mistralrs.distributed.steps import follow
    from mistralrs.serving import ModelService

    service = ModelService(opts, world=world)
    try:
        follow(service.engine.runner, world)
    finally:
        world.close()


def serve_as_follower(opts: Any) -> int:
    """`serve` on a rank other than 0 (torchrun, or an MN worker node): no HTTP, follow the steps."""
    from mistralrs.nn.kernels import device_type_of
    from mistralrs.plugins import get_registry
    from mistralrs.serving import pick_device

    kind = device_type_of(pick_device(get_registry(), cpu=opts.cpu, device=opts.device))
    world = join_world(opts, kind)
    log.warning("rank %d of %d: following rank 0's steps", world.rank, world.size)
    try:
        run_follower(opts, world)
    except DistributedError as exc:
        log.error("%s", exc)
        return 1
    return 0


