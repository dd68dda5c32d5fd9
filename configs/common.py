"""Method presets shared by every config file: `--config=configs/<file>.py:<preset>`.

vanilla: clean gradient only; disadv: attack θ_t then gradient (τ = 0, two sequential passes);
conadv: Algorithm 1 with τ = 1; conadv2: τ = 2.
"""
import ml_collections

METHOD_PRESETS = {"vanilla": ("vanilla", 0), "disadv": ("disadv", 0), "conadv": ("conadv", 1),
                  "conadv2": ("conadv", 2)}


def set_method(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Sets config.method and config.staleness from a method preset name."""
  if preset not in METHOD_PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(METHOD_PRESETS)}.")
  config.method, config.staleness = METHOD_PRESETS[preset]
  return config
