"""The run configuration: schema (one dataclass per YAML section), reading with ``--set`` overrides,
validation, and which keys change the trajectory (identity).

    schema.py    the dataclasses: keys, types, defaults, one help line each
    parse.py     YAML and ``--set`` -> a typed Config, then validate.py's checks; the reference table
    validate.py  ranges and consistency between keys; the batch split over a world size
    identity.py  which keys change the trajectory (resume and verify compare those)
"""

from ..errors import ConfigError
from .parse import config_from_dict, load_config, reference_table
from .schema import (ClipConfig, CommConfig, Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig,
                     TrainConfig)
from .validate import check_world_size

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "CommConfig", "ScheduleConfig",
           "ClipConfig", "TrainConfig", "load_config", "config_from_dict", "reference_table", "check_world_size"]
