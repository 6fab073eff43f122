"""One rank of a real job that only shares the host's cores: prints ``RANK THREADS CORES``.

deepspeed --num_gpus N tests/workers/share_cores.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from molf_ds.runtime import shutdown
from molf_ds.train.distributed import share_cpu_cores


def main() -> None:
    dist.init_process_group("gloo")
    threads = share_cpu_cores()
    cores = len(os.sched_getaffinity(0))
    print(f"rank {dist.get_rank()} threads {threads} torch {torch.get_num_threads()} cores {cores}")
    shutdown(0)


if __name__ == "__main__":
    main()
