"""A sweep's trials: the (alpha, beta, lr) grid, each trial's name and its config."""

from __future__ import annotations

import os
from itertools import product

from hdpo_ray.config import Config

TRIALS_DIR = "trials"


def trial_grid(config: Config) -> list[dict[str, float]]:
    """Every (alpha, beta, lr) of the sweep, alpha varying fastest."""
    sweep = config.sweep
    betas, lrs = sweep.betas or [config.loss.beta], sweep.lrs or [config.train.lr]
    return [{"alpha": a, "beta": b, "lr": lr} for lr, b, a in product(lrs, betas, sweep.alphas)]


def trial_name(params: dict[str, float]) -> str:
    return f"alpha={params['alpha']:g}_beta={params['beta']:g}_lr={params['lr']:g}"


def trial_config(base: Config, params: dict[str, float], sweep_dir: str) -> Config:
    """The base config with this trial's alpha, beta and lr, writing under OUTPUT_DIR/trials/<name>."""
    tree = base.to_dict()
    tree["loss"] |= {"alpha": params["alpha"], "beta": params["beta"]}
    storage = tree["train"]["storage_path"]  # null: checkpoints go under the trial's own output_dir
    trial_storage = f"{storage.rstrip('/')}/{TRIALS_DIR}/{trial_name(params)}" if storage else None
    tree["train"] |= {"lr": params["lr"], "storage_path": trial_storage}
    tree["output_dir"] = os.path.join(sweep_dir, TRIALS_DIR, trial_name(params))
    return Config.model_validate(tree)
