"""Multi-process training with the existing engine: torchrun (or SLURM) + DistributedDataParallel.

``torchrun --nproc_per_node=N -m audiomae pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; under
SLURM (``srun``) the SLURM_* variables are used when torchrun's are absent, with MASTER_ADDR taken
from the first host of the allocation. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import gc
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _from_slurm() -> bool:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        try:
            host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                  check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            host = nodes.split(",")[0].split("[")[0]
        os.environ["MASTER_ADDR"] = host
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    return True


def init(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun or srun; a no-op for a single process."""
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return info


def pick_device(name: str, info_local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise SystemExit(f"error: --device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        try:  # another backend torch has (mps, xpu, ...): used where it is there
            torch.empty(0, device=dev)
        except Exception:
            raise SystemExit(f"error: --device {name}: not available here (this machine and torch "
                             f"{torch.__version__} have no {dev.type} device; use auto, cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name} was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise SystemExit(f"error: --device {name}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0 to cuda:{n - 1})")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", info_local_rank)))
        torch.cuda.set_device(dev)
    return dev


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def cleanup() -> None:
    """Leave the process group at the end of a run that every rank finished: wait for the others (no
    rank tears the group down while another still uses it), then destroy it. A wrapper of the model
    that is left in a reference cycle (the frames of a lazy import can hold a trainer) keeps the group
    alive past ``destroy_process_group``; one collection before and one after release it while the
    interpreter still runs: a gloo group destroyed during interpreter shutdown can abort the process
    after a finished run."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
