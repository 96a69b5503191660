import sys

from idefics_jax.train.trainer import main

sys.exit(main())
