"""``python -m bigvl.main``: a bad config exits 2 with one line before anything compiles."""

import ml_collections
import pytest

from bigvl import train
from bigvl.config import ConfigError
from tests.helpers import run_main, tiny_config

TINY = "configs/siglip_shapes.py:tiny"


@pytest.mark.parametrize("override, needle", [
    ("--config.optim.lerning_rate=1", "lerning_rate"),          # unknown key
    ("--config.total_steps=abc", "total_steps"),                # wrong type
    ("--config.input.dataset=no_such_dataset", "no_such_dataset"),
    ("--config.model.name=no_such_model", "no_such_model"),
    ("--config.loss.name=no_such_loss", "no_such_loss"),
    ("--config.task=no_such_task", "no_such_task"),
    ("--config.input.batch_size=12", "divisible"),               # 12 % 8 devices
])
def test_bad_config_exits_2_with_one_line(shapes_data_dir, tmp_path, override, needle):
  out = run_main(["--config", TINY, "--workdir", str(tmp_path / "w"), override,
                  f"--config.input.data_dir={shapes_data_dir}",
                  "--config.input.dataset=shapes_captions/small"] +
                 (["--config.input.dataset=no_such_dataset"] if "dataset" in override else []),
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                 timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  err = [ln for ln in out.stderr.splitlines() if ln.startswith("bigvl: bad config")]
  assert len(err) == 1 and needle in err[0], out.stderr[-2000:]
  assert "step " not in out.stdout  # nothing trained
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_key_in_config_file_that_nothing_reads_is_an_error(shapes_data_dir):
  c = tiny_config(shapes_data_dir)
  c.optim.lerning_rate = 0.1  # a typo in the file itself: nothing reads it
  with pytest.raises(ConfigError, match="optim.lerning_rate"):
    train.build(c)


def test_wrong_type_in_config_file(shapes_data_dir):
  d = tiny_config(shapes_data_dir).to_dict()
  d["input"]["batch_size"] = "16"  # as written in a config file: ConfigDict takes the str
  c = ml_collections.ConfigDict(d)
  with pytest.raises(ConfigError, match="batch_size"):
    train.build(c)


def test_durations_in_epochs_and_examples(shapes_data_dir):
  c = tiny_config(shapes_data_dir)
  c.total_steps = None
  c.total_epochs = 2.0  # shapes_captions/small has 512 train examples, batch 16
  assert train.build(c).total_steps == 64
  c.total_epochs = None
  c.total_examples = 160
  assert train.build(c).total_steps == 10
  c.total_steps = 5
  with pytest.raises(ConfigError, match="exactly one"):
    train.build(c)
