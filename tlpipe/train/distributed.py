"""Several processes (GPUs, CPU processes, nodes) through PyTorch's own launcher, torchrun.

The number of processes is a resource knob, not a param: the stage's command in dvc.yaml stays
`python -m stages.<name>`, so a run on 8 GPUs hits the same DVC cache entries as one on a laptop.

    TLPIPE_NPROC        processes on this node (default 1: no torchrun); one per GPU on CUDA
    TLPIPE_NNODES       nodes (default 1)
    TLPIPE_NODE_RANK    this node's rank, 0..NNODES-1 (default 0); DVC runs on node 0
    TLPIPE_MASTER_ADDR  node 0's address, with several nodes (default localhost)
    TLPIPE_MASTER_PORT  its rendezvous port, with several nodes (default 29500)

A stage started with TLPIPE_NPROC > 1 (or TLPIPE_NNODES > 1) relaunches itself under torchrun's
elastic agent (torch.distributed.launcher, what the `torchrun` command runs) and waits: if any
rank dies, the agent stops the others and the stage fails with one line naming the rank. Started
by `torchrun` directly, a stage simply joins the process group it finds in the environment.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tlpipe.runtime import TlpipeError, _env_int, device


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun (or by launch() below)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def requested() -> tuple[int, int]:
    return _env_int("TLPIPE_NPROC", 1, 1, 1024), _env_int("TLPIPE_NNODES", 1, 1, 4096)


def launch(module: str) -> None:
    """Run `python -m module` in TLPIPE_NPROC processes per node under torchrun's agent."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc, nnodes = requested()
    if nnodes > 1:
        endpoint = (f"{os.environ.get('TLPIPE_MASTER_ADDR', 'localhost')}:"
                    f"{_env_int('TLPIPE_MASTER_PORT', 29500, 1, 65535)}")
        run_id = f"tlpipe-{module}"
    else:
        endpoint, run_id = "localhost:0", str(uuid.uuid4())  # standalone: any free port
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=run_id,
                          rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=0,
                          rdzv_configs={"rank": _env_int("TLPIPE_NODE_RANK", 0, 0, nnodes - 1)} if nnodes > 1 else {},
                          monitor_interval=0.1)
    # On CPU each process keeps the thread count one process would have: oneDNN's results depend
    # on it, and the outputs must not depend on the number of processes (slower, but CPU processes
    # are for testing the distributed path; GPUs are what it is for).
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # The agent logs each step of a failure at length; the one line below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module)
    except ChildFailedError as e:
        # The first failure is the cause; the agent then stops the others (they fail with SIGTERM).
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise TlpipeError(f"{module}: rank {rank} of {nproc * nnodes} failed ({how}); the other "
                          "processes were stopped and no outputs were written") from None


def join() -> Group:
    """This process's place: rank, world size and device; joins the process group under torchrun."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Group(0, 1, device())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = device()
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    return Group(rank, world, dev)


def all_sum(group: Group, *values: float) -> list[float]:
    """Sum scalars over all ranks (float64 on the CPU side; identity with one process)."""
    if group.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_batches(group: Group, mine: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """All ranks' outputs in image order on rank 0 (batch k, of lengths[k] images, was computed by
    rank k % world); an empty tensor on the other ranks."""
    if group.world == 1:
        return mine
    if not lengths:  # an empty split: every rank knows, so none gathers
        return torch.empty(0)
    everyone = [None] * group.world if group.is_main else None
    dist.gather_object(mine, everyone, dst=0)
    if not group.is_main:
        return torch.empty(0)
    per_rank = [list(torch.split(t, lengths[r::group.world])) if lengths[r::group.world] else []
                for r, t in enumerate(everyone)]
    return torch.cat([per_rank[k % group.world][k // group.world] for k in range(len(lengths))])


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def leave(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch, for a DataLoader's `batch_sampler`.

    The global batch (the `batch_size` param) is cut from a permutation that depends only on
    (seed, epoch), and rank r takes every world-th image of it. So the images of each optimizer step
    are the same whatever the number of processes, and a resumed run sees the batches it would have.
    """

    def __init__(self, n: int, batch_size: int, group: Group, seed: int, weights: torch.Tensor | None = None):
        self.n, self.batch_size, self.group, self.seed, self.epoch = n, batch_size, group, seed, 0
        self.weights = weights  # per-image draw weights: an epoch of n draws with replacement

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        else:
            order = torch.randperm(self.n, generator=generator).tolist()
        if self.n <= self.batch_size:
            return [order]
        return [order[i:i + self.batch_size] for i in range(0, self.n - self.batch_size + 1, self.batch_size)]

    def __iter__(self):
        """Each batch as (image, repeat) pairs, `repeat` counting the image's earlier draws this epoch:
        an image drawn twice (draws with replacement) is then augmented twice, not copied."""
        drawn: dict[int, int] = {}
        for batch in self.global_batches():
            keys = []
            for i in batch:
                keys.append((i, drawn.get(i, 0)))
                drawn[i] = drawn.get(i, 0) + 1
            yield keys[self.group.rank::self.group.world]

    def __len__(self) -> int:
        return 1 if self.n <= self.batch_size else self.n // self.batch_size
