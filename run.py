"""Entry point: ``python run.py vlm=tiny_llava dataset=shapes attack=apgd defense=diffcap`` (see README.md).

With no arguments it runs the embedded default, ``python run.py -m vlm=tiny_llava,tiny_clip``: one run has one
VLM, and captioning and VQA need a generative model while zero-shot classification needs a text tower, so the
tiny LLaVA (captioning, VQA) and the tiny CLIP (zero-shot) run one after the other, then their rows are printed
side by side.

Bad input of any kind ends the process with one line ``error: ...`` naming what to fix and exit status 2: the
overrides are composed and validated once before Hydra starts (so a typo creates no run folder), and the run's own
errors go through the harness's one handler (``evaluators.errors``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from evaluators.config import compose_config, register_resolvers
from evaluators.errors import report

register_resolvers()

#: What ``python run.py`` with no arguments runs (the README's first command).
DEFAULT_ARGS = ["-m", "vlm=tiny_llava,tiny_clip"]


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> None:
    from evaluators.jobs import guarded
    from evaluators.runner import run

    try:
        guarded(lambda: run(cfg), cfg.paths.output_dir)  # in a multirun a failing job is recorded, others go on
    except Exception as e:  # noqa: BLE001 (report() re-raises what is not a user error)
        sys.exit(report(e))


def precheck(argv: list[str]) -> None:
    """Compose and validate a single run's overrides before Hydra creates its run folder. Multiruns and Hydra's own
    flags (--help, --cfg, ...) are left to Hydra; each job of a multirun is validated when it starts."""
    if any(a.startswith("-") for a in argv):
        return
    try:
        compose_config([a for a in argv if not a.lstrip("+~").startswith("hydra")])
    except Exception as e:  # noqa: BLE001
        sys.exit(report(e))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv += DEFAULT_ARGS
    precheck(sys.argv[1:])
    main()
