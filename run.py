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
    from evaluators.errors import HarnessError
    from evaluators.runner import run
    from evaluators.user_errors import USER_ERRORS

    try:
        run(cfg)
    except (HarnessError, *USER_ERRORS) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
