"""The tensor-parallel world: who this process is, the torch.distributed groups, local workers.

Three ways in (docs/distributed.md):

- ``-tp N`` (``Runner(tensor_parallel_size=N)``) on one machine: this process is rank 0; it picks a
  free port and spawns ranks 1..N-1 as worker processes (`follower.follower_main`), which load the same
  model with the same `ServiceOptions` and follow rank 0's steps.
- ``torchrun --nnodes ... -m mistralrs serve ...``: torchrun's ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; rank 0 serves, the others follow.
- mistral.rs's ``MISTRALRS_MN_*`` variables: ``MISTRALRS_MN_GLOBAL_WORLD_SIZE`` (the world),
  ``MISTRALRS_MN_LOCAL_WORLD_SIZE`` (ranks per node), on the head ``MISTRALRS_MN_HEAD_NUM_WORKERS``
  and ``MISTRALRS_MN_HEAD_PORT``, on a worker node ``MISTRALRS_MN_WORKER_SERVER_ADDR`` and
  ``MISTRALRS_MN_WORKER_ID``: mapped onto the same rendezvous (`rendezvous_from_env`); each node
  spawns its local ranks as ``-tp`` does.

The backend is NCCL for CUDA devices and gloo on the CPU; step inputs travel over a gloo group
(`control`) either way. Collectives time out (``MISTRALRS_DIST_TIMEOUT`` seconds, default 600)
rather than hang, and a local worker exits when rank 0's process is gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from typing import Any

import attrs

from mistralrs.errors import ConfigError, MistralRsError

log = logging.getLogger("mistralrs.distributed")

MN_PREFIX = "MISTRALRS_MN_"


class DistributedError(MistralRsError):
    """A rank is gone or a collective failed: the tensor-parallel world cannot go on."""

    exit_code = 1


@attrs.define(kw_only=True)
class Rendezvous:
    """Where and who: torch.distributed's env-style rendezvous for this process's node."""

    world_size: int
    node_rank: int = 0
    local_world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    torchrun: bool = False  # the launcher made every rank: spawn nothing
    rank: int = 0  # torchrun: this process's global rank
    local_rank: int = 0


def _env_int(env: dict[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; set it to a number") from None


def rendezvous_from_env(tp_size: int, env: dict[str, str] | None = None) -> Rendezvous | None:
    """The rendezvous the environment describes (torchrun's variables, else MISTRALRS_MN_*), or a
    single-node one for ``-tp N`` (None when N is 1 and nothing is set)."""
    env = dict(os.environ if env is None else env)
    if "MISTRALRS_MN_GLOBAL_WORLD_SIZE" in env:
        world = _env_int(env, "MISTRALRS_MN_GLOBAL_WORLD_SIZE")
        local = _env_int(env, "MISTRALRS_MN_LOCAL_WORLD_SIZE") if "MISTRALRS_MN_LOCAL_WORLD_SIZE" in env else tp_size
        if local < 1 or world % local:
            raise ConfigError(f"MISTRALRS_MN_GLOBAL_WORLD_SIZE={world} must be a multiple of "
                              f"MISTRALRS_MN_LOCAL_WORLD_SIZE={local}")
        if "MISTRALRS_MN_WORKER_SERVER_ADDR" in env:
            addr = env["MISTRALRS_MN_WORKER_SERVER_ADDR"].strip()
            host, _, port = addr.rpartition(":") if ":" in addr else (addr, "", "")
            if "MISTRALRS_MN_WORKER_ID" not in env:
                raise ConfigError("MISTRALRS_MN_WORKER_SERVER_ADDR is set but MISTRALRS_MN_WORKER_ID is not; "
                                  "give each worker node its index (0-based)")
            node = _env_int(env, "MISTRALRS_MN_WORKER_ID") + 1
            master_port = int(port) if port.isdigit() else _env_int(env, "MISTRALRS_MN_HEAD_PORT") \
                if "MISTRALRS_MN_HEAD_PORT" in env else 0
            if not master_port:
                raise ConfigError("MISTRALRS_MN_WORKER_SERVER_ADDR needs the head's port (HOST:PORT) or "
                                  "MISTRALRS_MN_HEAD_PORT")
            return Rendezvous(world_size=world, node_rank=node, local_world_size=local, master_addr=host,
                              master_port=master_port)
        if "MISTRALRS_MN_HEAD_PORT" not in env:
            raise ConfigError("MISTRALRS_MN_GLOBAL_WORLD_SIZE is set: on the head node set MISTRALRS_MN_HEAD_PORT "
                              "(and MISTRALRS_MN_HEAD_NUM_WORKERS), on workers MISTRALRS_MN_WORKER_SERVER_ADDR")
        workers = _env_int(env, "MISTRALRS_MN_HEAD_NUM_WORKERS") if "MISTRALRS_MN_HEAD_NUM_WORKERS" in env else None
        if workers is not None and (workers + 1) * local != world:
            raise ConfigError(f"MISTRALRS_MN_HEAD_NUM_WORKERS={workers} worker nodes x {local} local ranks + the head's "
                              f"{local} != MISTRALRS_MN_GLOBAL_WORLD_SIZE={world}")
        return Rendezvous(world_size=world, node_rank=0, local_world_size=local,
                          master_addr=env.get("MASTER_ADDR", "0.0.0.0"),
                          master_port=_env_int(env, "MISTRALRS_MN_HEAD_PORT"))
    if "WORLD_SIZE" in env and "RANK" in env and _env_int(env, "WORLD_SIZE") > 1:
        world = _env_int(env, "WORLD_SIZE")
        if tp_size not in (1, world):
            raise ConfigError(f"-tp {tp_size} disagrees with the launcher's WORLD_SIZE={world}; drop -tp under torchrun")
        return Rendezvous(world_size=world, local_world_size=_env_int(env, "LOCAL_WORLD_SIZE")
                          if "LOCAL_WORLD_SIZE" in env else world, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=_env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
                          torchrun=True, rank=_env_int(env, "RANK"),
                          local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    if tp_size <= 1:
        return None
    return Rendezvous(world_size=tp_size, local_world_size=tp_size)


def is_follower(tp_size: int = 1) -> bool:
    """Whether this process is a rank other than 0 of a launcher-made or MN world (it must not
    serve HTTP: `serve` then follows rank 0's steps instead)."""
    rdv = rendezvous_from_env(tp_size)
    if rdv is None:
        return False
    return rdv.rank != 0 if rdv.torchrun else rdv.node_rank != 0


def agree_min(value: int, world: World) -> int:
    """The smallest of every rank's `value` (KV pool sizes must match across ranks)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.long)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=world.control)
    except RuntimeError as exc:  # a rank failed while loading
        raise world.fail(exc) from None
    return int(t.item())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timeout_seconds() -> float:
    try:
        return float(os.environ.get("MISTRALRS_DIST_TIMEOUT", "600"))
    except ValueError:
        return 600.0


@attrs.define(kw_only=True, eq=False)
class World:
    """This process's place in an initialised world."""

    rank: int
    size: int
    local_rank: int
    device: str
    control: Any = None  # gloo group for step inputs
    workers: list[Any] = attrs.field(factory=list)  # local worker processes this process spawned
    broken: BaseException | None = None
    closing: bool = False  # shutting down: workers exiting is expected
    on_broken: list[Any] = attrs.field(factory=list)  # callbacks(error) when a rank is lost

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def fail(self, error: BaseException) -> DistributedError:
        """Mark the world broken (once) and tell whoever listens; returns the error to raise."""
        if self.broken is None:
            self.broken = error if isinstance(error, DistributedError) else DistributedError(
                f"tensor parallelism failed on rank {self.rank}: a rank is gone or a collective failed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); restart the server")
            log.error("%s", self.broken)
            for callback in list(self.on_broken):
                try:
                    callback(self.broken)
                except Exception:  # noqa: BLE001 - a listener's failure must not hide the error
                    log.exception("on_broken callback failed")
        assert isinstance(self.broken, DistributedError)
        return self.broken

    def close(self) -> None:
        import torch.distributed as dist

        self.closing = True
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken world may not tear down cleanly
                pass
        for proc in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def join_world(opts: Any, device_type: str) -> World:
    """Initialise torch.distributed for this process: rank 0 of a ``-tp``/MN node spawns the
    node's other local ranks first. Returns the `World` (device ``cuda:<local rank>`` or cpu)."""
    rdv = rendezvous_from_env(opts.tensor_parallel_size)
    assert rdv is not None
    if rdv.torchrun:
        return init_rank(rdv.rank, rdv.world_size, rdv.local_rank, device_type, rdv.master_addr, rdv.master_port)
    if rdv.node_rank == 0 and not rdv.master_port:
        rdv.master_port = free_port()
    base = rdv.node_rank * rdv.local_world_size
    workers = spawn_workers(opts, rdv, base) if rdv.local_world_size > 1 else []
    try:
        world = init_rank(base, rdv.world_size, 0, device_type, rdv.master_addr, rdv.master_port)
    except BaseException:
        for proc in workers:
            proc.terminate()
        raise
    world.workers = workers
    _watch_workers(world)
    return world


class Worker:
    """A spawned local rank: ``python -c`` running `follower.follower_main` with its arguments
    pickled on stdin (not on the command line, where a literal token would show; and not through
    multiprocessing, which would re-import the caller's script in the child)."""

    def __init__(self, name: str, target: str, args: tuple) -> None:
        import base64
        import pickle
        import subprocess
        import sys

        self.name = name
        code = ("import base64, pickle, sys; from mistralrs.distributed.world import run_named; "
                "run_named(*pickle.loads(base64.b64decode(sys.stdin.buffer.read())))")
        self.popen = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        assert self.popen.stdin is not None
        self.popen.stdin.write(base64.b64encode(pickle.dumps((target, *args))))
        self.popen.stdin.close()

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()


def spawn_workers(opts: Any, rdv: Rendezvous, base: int) -> list[Worker]:
    procs = []
    for local in range(1, rdv.local_world_size):
        # named, not imported: the follower module sits above serving, which imports this one
        procs.append(Worker(f"mistralrs-tp-rank{base + local}", "mistralrs.distributed.follower:follower_main",
                            (opts, base + local, rdv.world_size, local, rdv.master_addr, rdv.master_port,
                             os.getpid())))
    return procs


def run_named(target: str, *args: Any) -> None:
    """A spawned process's entry: ``module:function`` called with `args`."""
    from mistralrs.specs import resolve

    resolve(target)(*args)


def init_rank(rank: int, size: int, local_rank: int, device_type: str, addr: str, port: int) -> World:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    device = f"cuda:{local_rank}" if device_type == "cuda" else device_type
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds())
    connect = "127.0.0.1" if addr in ("0.0.0.0", "") else addr
    try:
        dist.init_process_group(backend=backend, init_method=f"tcp://{connect}:{port}", rank=rank, world_size=size,
                                timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except Exception as exc:
        raise DistributedError(f"cannot join the tensor-parallel world as rank {rank} of {size} at {connect}:{port} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check that "
                               "every rank started and the address is reachable") from None
    return World(rank=rank, size=size, local_rank=local_rank, device=device, control=control)


def _watch_workers(world: World) -> None:
    """Rank 0: a worker process that exits while the world is up breaks it (fail fast, not a
    collective timeout)."""

    def watch(proc: Worker) -> None:
        proc.popen.wait()
        if world.broken is not None or world.closing:
            return
        world.fail(DistributedError(f"tensor-parallel worker {proc.name} exited (code {proc.exitcode}); "
                                    "the model cannot run without it - restart the server"))

    for proc in world.workers:
        threading.Thread(target=watch, args=(proc,), name="mistralrs-tp-watch", daemon=True).start()


def exit_with_parent(parent: int) -> None:
    """A spawned rank never outlives rank 0's process (killed with SIGKILL, it cannot say goodbye)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="mistralrs-parent-watch", daemon=True).start()


def distributed_report(env: dict[str, str] | None = None) -> dict[str, Any]:
    """What `doctor` says about distribution: torch.distributed and its backends, the devices a
    world could span, and the world this environment describes (torchrun / MISTRALRS_MN_*)."""
    env = dict(os.environ if env is None else env)
    report: dict[str, Any] = {}
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        return {"available": False, "error": str(exc)}
    report["available"] = dist.is_available()
    report["backends"] = {"gloo": bool(dist.is_available() and dist.is_gloo_available()),
                          "nccl": bool(dist.is_available() and dist.is_nccl_available())}
    report["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        rdv = rendezvous_from_env(1, env)
        report["rendezvous"] = None if rdv is None else attrs.asdict(rdv)
        report["source"] = ("torchrun" if rdv is not None and rdv.torchrun else
                            "MISTRALRS_MN_*" if rdv is not None else None)
    except ConfigError as exc:
        report["rendezvous"] = None
        report["error"] = str(exc)
    report["env"] = {k: v for k, v in env.items() if k.startswith(MN_PREFIX) or k in (
        "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RING_CONFIG",
        "MISTRALRS_NO_NCCL")}
    if "RING_CONFIG" in env:
        report["ring"] = "RING_CONFIG is set, but this build's distributed engine is torch.distributed: use -tp / torchrun"
    return report
