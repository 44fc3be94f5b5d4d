"""Helpers shared by the preset configs (big_vision `configs/common.py` style)."""

import ml_collections


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses a config file's string argument 'key=value,key=value,flag' against defaults.

  `spec` gives every allowed key with its default; a value is converted to the default's type,
  and a bare key sets a boolean to True. So `get_config('size=tiny,runlocal')` with
  `parse_arg(arg, size='small', runlocal=False)` gives {size: 'tiny', runlocal: True}.

  Raises:
    ValueError naming the key when it is unknown or its value does not convert.
  """
  values = dict(spec)
  for item in filter(None, (arg or '').split(',')):
    key, has_value, text = item.partition('=')
    key, text = key.strip(), text.strip()
    if key not in spec:
      raise ValueError(f'config argument {key!r} is unknown: expected one of {sorted(spec)}')
    default = spec[key]
    if isinstance(default, bool):
      if has_value and text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={text!r} is invalid: expected true or false')
      values[key] = not has_value or text.lower() in ('true', '1')
      continue
    try:
      values[key] = type(default)(text)
    except ValueError:
      raise ValueError(f'config argument {key}={text!r} is invalid: expected a '
                       f'{type(default).__name__}') from None
  return ml_collections.ConfigDict(values)


def workdir_config(spec: str) -> ml_collections.ConfigDict:
  """The config train.py workdir `spec` = '<workdir>[:<step>]' saved (a converted Hugging Face
  checkpoint, `python -m stmoe_jax.convert --from_hf`, or any run): the model a preset's
  `from=` argument starts from. FileNotFoundError naming the path when it has none."""
  # Imported here: presets without `from=` need no workdir machinery.
  from stmoe_jax.config import parse_init_from  # pylint: disable=g-import-not-at-top
  from stmoe_jax.train import entry_points  # pylint: disable=g-import-not-at-top
  workdir, _ = parse_init_from(spec)
  return entry_points.load_config(workdir)
