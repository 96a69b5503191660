"""Minor page faults of each training step of configs/tiny.yaml, run as `idefics-jax train` or as a Python call.

    python tests/_heap_worker.py cli|python OUT.json WORKDIR STEPS [key=value ...]

`cli` runs the command's own entry point (`idefics_jax.cli.main()` on the process's command line, as the console
script does); `python` calls `trainer.train` as a notebook would. Every step is counted (process-wide `ru_minflt`
around the step, waited for); after STEPS of them the list goes to OUT.json and the process exits at once (the
run's final checkpoint is not what is measured).
"""

from __future__ import annotations

import json
import os
import resource
import sys


def main() -> None:
    mode, out, workdir, steps, *extra = sys.argv[1:]
    steps = int(steps)
    import jax

    from idefics_jax.train import step as step_lib

    faults: list[int] = []
    make = step_lib.make_train_step

    def counted(*args, **kwargs):
        step = make(*args, **kwargs)

        def run(*a, **k):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            result = jax.block_until_ready(step(*a, **k))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            if len(faults) == steps:
                with open(out, "w") as f:
                    json.dump(faults, f)
                os._exit(0)
            return result

        return run

    step_lib.make_train_step = counted  # the trainer looks it up on the module when it builds its step
    overrides = [f"workdir={workdir}", f"steps={steps + 1}", "eval_every=0", *extra]
    if mode == "cli":
        from idefics_jax import cli

        sys.argv = ["idefics-jax", "train", "tiny", *overrides]
        sys.exit(cli.main())
    from idefics_jax.train import config, trainer

    trainer.train(config.load("tiny", overrides))


if __name__ == "__main__":
    main()
