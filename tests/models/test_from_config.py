"""The models' ``from_config``: one dtype helper, and every default read from the model's own
dataclass field (written once)."""

import jax.numpy as jnp
import ml_collections
import pytest

from bigvl.config import ConfigError, Reader
from bigvl.models import dtypes, small_cnn, two_tower, wide_resnet


def _model_cfg(**kw) -> Reader:
  return Reader(ml_collections.ConfigDict(kw), "config.model")


def _two_tower(cfg_kw):
  towers = {"image": {"patch_size": 4, "width": 8, "depth": 1, "num_heads": 2, "mlp_dim": 16},
            "text": {"width": 8, "depth": 1, "num_heads": 2, "mlp_dim": 16}}
  return two_tower.from_config(_model_cfg(**towers, **cfg_kw), vocab_size=10, max_len=4)


BUILDERS = {
    "small_cnn": (small_cnn.SmallCNN, lambda kw: small_cnn.from_config(_model_cfg(**kw), 10)),
    "wide_resnet": (wide_resnet.WideResNet,
                    lambda kw: wide_resnet.from_config(_model_cfg(**kw), 10)),
    "two_tower": (two_tower.TwoTower, _two_tower),
}
FIELDS = {"small_cnn": ("width", "stages", "bn_momentum", "bn_epsilon", "dropout_rate", "dtype"),
          "wide_resnet": ("depth", "width", "bn_momentum", "bn_epsilon", "dropout_rate", "dtype"),
          "two_tower": ("embed_dim", "temperature_init", "bias_init", "dtype")}


@pytest.mark.parametrize("name", BUILDERS)
def test_dtype_by_name(name):
  cls, build = BUILDERS[name]
  assert build({"dtype": "bfloat16"}).dtype == jnp.bfloat16
  assert build({"dtype": "float32"}).dtype == jnp.float32
  with pytest.raises(ConfigError, match="config.model.dtype='float16' is not one of "
                                        "'float32', 'bfloat16'"):
    build({"dtype": "float16"})


@pytest.mark.parametrize("name", BUILDERS)
def test_unset_keys_take_the_models_field_defaults(name, monkeypatch):
  """A default changed on the model class is what from_config uses: it is not repeated."""
  cls, build = BUILDERS[name]
  changed = {"width": 6, "stages": 2, "bn_momentum": 0.5, "bn_epsilon": 0.25,
             "dropout_rate": 0.125, "depth": 10, "embed_dim": 24, "temperature_init": 3.0,
             "bias_init": -2.0, "dtype": jnp.bfloat16}
  for field in FIELDS[name]:
    monkeypatch.setattr(cls, field, changed[field])
  model = build({})
  for field in FIELDS[name]:
    assert getattr(model, field) == changed[field], field


def test_dtypes_helper():
  assert dtypes.from_config(_model_cfg(), jnp.float32) == jnp.float32
  assert dtypes.from_config(_model_cfg(dtype="bfloat16"), jnp.float32) == jnp.bfloat16
  assert set(dtypes.DTYPES) == {"float32", "bfloat16"}
