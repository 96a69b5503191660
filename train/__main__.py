import sys

from idefics_jax.ops.heap import reexec_with_tunables

reexec_with_tunables()  # before anything allocates: see train/heap.py

from idefics_jax.train.trainer import main  # noqa: E402

sys.exit(main())
