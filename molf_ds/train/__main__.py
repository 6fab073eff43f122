"""``python -m molf_ds.train`` (and ``deepspeed --module molf_ds.train``) runs `molf-train`."""

from molf_ds.train.recipe import main

main()
