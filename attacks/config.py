"""One-line checks of the attack config, run before anything loads."""

from __future__ import annotations

from omegaconf import DictConfig

from evaluators.errors import ConfigError

ZERO_SHOT_ATTACKS = ("apgd-ce", "apgd-t")


def validate_attack(acfg: DictConfig) -> None:
    """Raise ConfigError naming the key to fix."""
    if acfg.get("method") is None:
        return
    schedule = acfg.get("schedule", "single")  # its values are checked with the other config values
    zs = acfg.get("zero_shot")
    if zs is not None:
        attacks = list(zs.get("attacks") or [])
        if not attacks or any(a not in ZERO_SHOT_ATTACKS for a in attacks):
            raise ConfigError(f"attack.zero_shot.attacks must be a non-empty subset of {list(ZERO_SHOT_ATTACKS)}, "
                              f"got {attacks}")
        if int(zs.get("ce_restarts", 1)) < 1 or int(zs.get("target_classes", 0)) < 0:
            raise ConfigError("attack.zero_shot.ce_restarts must be >= 1 and attack.zero_shot.target_classes >= 0")
    if acfg.get("adaptive") is True:  # a non-bool value is reported by the shared value checks
        if schedule != "single":
            raise ConfigError(f"attack={acfg.name} runs one APGD stage through the defense; attack.schedule="
                              f"{schedule} is not supported (use attack.schedule=single)")
        if zs is not None and (list(zs.attacks) != ["apgd-ce"] or int(zs.get("ce_restarts", 1)) != 1):
            raise ConfigError(f"attack={acfg.name} runs one APGD stage through the defense; set "
                              "attack.zero_shot.attacks=[apgd-ce] attack.zero_shot.ce_restarts=1")
        verdict = acfg.get("verdict", "any_iterate")
        if verdict not in ("any_iterate", "final"):
            raise ConfigError(f"attack.verdict must be 'any_iterate' or 'final', got {verdict!r}")
        if int(acfg.get("verdict_draws", 1)) < 1:
            raise ConfigError(f"attack.verdict_draws must be >= 1, got {acfg.verdict_draws}")
