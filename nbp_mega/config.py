"""The root config: load YAML, merge strictly over dataclass defaults, apply overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=10", "model.block_shape=[1,1,1]"])

A YAML file may start with `base: other.yaml` (relative to itself) to inherit a preset.
`raw DeepSpeed keys`: anything under `deepspeed:` is deep-merged over the DeepSpeed JSON that
nbp_mega generates (nbp_mega/parallel/deepspeed.py), for options we do not model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import yaml

from nbp_mega.config_fields import ConfigError, check, deep_merge, merge, option, parse_overrides
from nbp_mega.data.loader import DataConfig
from nbp_mega.metrics import LogConfig
from nbp_mega.model.config import ModelConfig
from nbp_mega.optim import OptimConfig
from nbp_mega.parallel.dims import ParallelConfig
from nbp_mega.trainer import TrainConfig


@dataclass
class Config:
    run_dir: str = option("runs/default", "run directory: config, checkpoints, logs")
    seed: int = option(0, "seed of initialisation, data order and dropout", min=0)
    model: ModelConfig = option(default_factory=ModelConfig)
    data: DataConfig = option(default_factory=DataConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    optim: OptimConfig = option(default_factory=OptimConfig)
    parallel: ParallelConfig = option(default_factory=ParallelConfig)
    log: LogConfig = option(default_factory=LogConfig)
    deepspeed: dict[str, Any] = option({}, "raw DeepSpeed config keys merged over the "
                                       "generated ones (pass-through)")


def read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    """Read a config file, following `base:` chains (deep-merged, child wins)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at top level, got {type(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,)),
                      data)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides; checked; model sizes resolved."""
    updates = read_yaml(path) if path else {}
    updates = deep_merge(updates, parse_overrides(overrides or []))
    cfg = merge(Config(), updates)
    check(cfg)
    return dataclasses.replace(cfg, model=cfg.model.resolved())


def config_from_dict(data: dict) -> Config:
    """Rebuild a (resolved) config saved by `dump_config`."""
    cfg = merge(Config(), data)
    check(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
