"""Entry point: ``python run.py vlm=tiny dataset=shapes attack=apgd defense=diffcap`` (see README.md)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from evaluators.config import register_resolvers

register_resolvers()
log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> None:
    from evaluators.jobs import guarded
    from evaluators.runner import run
    from evaluators.user_errors import user_error

    try:
        guarded(lambda: run(cfg), cfg.paths.output_dir, user_error)  # a multirun records failures, goes on
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        log.error("%s", cause)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
