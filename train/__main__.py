import sys

from idefics_jax.train.run import main

sys.exit(main())
