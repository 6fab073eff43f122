"""One rank of a real job that only shares the host's cores: prints torch's thread count alone
(``default``), what `share_cpu_cores` returned and torch's count after it.

    deepspeed --num_gpus N tests/workers/share_cores.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from molf_ds.runtime import shutdown
from molf_ds.train.distributed import share_cpu_cores


def main() -> None:
    dist.init_process_group("gloo")
    default = torch.get_num_threads()
    threads = share_cpu_cores()
    after = torch.get_num_threads()
    print(f"rank {dist.get_rank()} default {default} threads {threads} torch {after}")
    shutdown(0)


if __name__ == "__main__":
    main()
