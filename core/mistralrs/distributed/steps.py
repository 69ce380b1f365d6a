"""Every rank runs the same engine step: rank 0 schedules, the others follow.

Rank 0's `LeaderRunner` prepares a step (`ModelRunner.prepare`: plain CPU tensors), broadcasts it
over the world's control group, then runs it like every other rank (`execute`); the forward's
all-reduces and the logits' all-gather keep the ranks in lock step. `follow` is the other ranks'
loop. A failed broadcast or collective marks the world broken (`World.fail`): the step's requests
fail with that error, later steps fail at once, and whoever registered `World.on_broken` (the
server) shuts down instead of waiting on a rank that is gone.
"""

from __future__ import annotations

import logging
from typing import Any

from mistralrs.distributed.world import DistributedError, World
from mistralrs.engine.runner import ModelRunner, StepInputs

log = logging.getLogger("mistralrs.distributed")


def _broadcast(message: Any, world: World) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


class LeaderRunner(ModelRunner):
    """Rank 0's runner: each step's inputs go to every rank before the forward."""

    def __init__(self, model: Any, backend: Any, device: Any, world: World) -> None:
        super().__init__(model, backend, device)
        self.world = world

    def execute(self, inputs: StepInputs) -> Any:
        world = self.world
        if world.broken is not None:
            raise world.broken
        try:
            _broadcast(("step", inputs), world)
            return super().execute(inputs)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL (a peer closed, a timeout), or a forward
            # that failed here but maybe not on the other ranks: they are out of step either way
            raise world.fail(exc) from None

    def stop_followers(self) -> None:
        if self.world.broken is None:
            try:
                _broadcast(("stop", None), self.world)
            except RuntimeError as exc:
                log.warning("could not tell the other ranks to stop: %s", exc)


def follow(runner: ModelRunner, world: World) -> None:
    """The other ranks' loop: run every step rank 0 broadcasts until it says stop (or is gone)."""
    while True:
        try:
            kind, inputs = _broadcast(None, world)
        except RuntimeError as exc:
            raise world.fail(exc) from None
        if kind == "stop":
            return
        runner.execute(inputs)
