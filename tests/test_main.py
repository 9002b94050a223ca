"""``python -m bigvl.main``: a bad config exits 2 with one line before anything compiles."""

import ml_collections
import pytest

from bigvl import train
from bigvl.config import ConfigError
from tests.helpers import REPO, run_main, tiny_config

TINY = "configs/siglip_shapes.py:tiny"


#: Config files outside configs/: the tiny config with one bad line (keys the file does not
#: define cannot be set from the command line).
BAD_FILES = {
    "bad_lr_mults": "c.optim.lr_mults = (('img/(', 0.1),)",
    "bad_init_from": "c.init_from = {'lm': {'path': '/nonexistent/run', 'dst': 'params/img'}}",
}


def _bad_config_file(tmp_path, name):
  path = tmp_path / f"{name}.py"
  path.write_text("from bigvl.config import load_config\n\n\ndef get_config(arg=None):\n"
                  f"  c = load_config({REPO + '/' + TINY!r})\n"
                  f"  {BAD_FILES[name]}\n  return c\n")
  return str(path)


# (config file[:arg], override, the start of stderr's one line after "bigvl: bad config: ")
CASES = [
    (TINY, "--config.optim.lerning_rate=1", "unknown config key config.optim.lerning_rate "
     "(did you mean config.optim.name or config.optim.lr or config.optim.clip_norm?)"),
    (TINY, "--config.no_such_key=1", "unknown config key config.no_such_key "
     "(no similar key in the config)"),
    (TINY, "--config.totl_steps=3", "unknown config key config.totl_steps "
     "(did you mean config.total_steps?)"),
    (TINY, "--config.total_steps=abc",
     "flag --config.total_steps=abc: invalid literal for int() with base 10: 'abc'"),
    (TINY, "--config.input.dataset=no_such_dataset", "unknown dataset 'no_such_dataset'"),
    (TINY, "--config.model.name=no_such_model", "unknown model name 'no_such_model'"),
    (TINY, "--config.loss.name=no_such_loss", "config.loss.name='no_such_loss' is not one of"),
    (TINY, "--config.task=no_such_task", "unknown task name 'no_such_task'"),
    (TINY, "--config.input.batch_size=12", "config.input.batch_size=12 is not divisible by"),
    (TINY, "--config.evals.zeroshot.batch_size=500",
     "config.evals.zeroshot.batch_size=500 is not divisible by the data axes"),
    (TINY, "--config.optim.name=sgd", "config.optim.b2 is not used by optim.name='sgd'"),
    (TINY, "--config.runtime.profile_steps=-1", "config.runtime.profile_steps must be >= 0, "
     "got -1"),
    (TINY, "--config.runtime.host_heap=big", "config.runtime.host_heap='big': one of auto, "
     "retain, system"),
    ("configs/no_such.py", None, "--config configs/no_such.py: no such file"),
    ("configs/siglip_shapes.py:tiny,nosuch", None,
     "--config configs/siglip_shapes.py:tiny,nosuch: unknown config arg 'nosuch'; "
     "known: size, tiny"),
    ("configs/fff_shapes.py:k=three", None,
     "--config configs/fff_shapes.py:k=three: config arg k='three' must be int"),
    ("configs/siglip_shapes.py:tiny=maybe", None, "--config configs/siglip_shapes.py:tiny=maybe"
     ": config arg tiny='maybe' must be bool (true/false, 1/0, yes/no)"),
    ("bad_lr_mults", None, "config.optim.lr_mults: bad regex 'img/(': "),
    # checked when a fresh run starts, before anything compiles
    ("bad_init_from", None, "config.init_from.lm.path='/nonexistent/run' holds no bigvl "
     "checkpoint"),
]


@pytest.mark.parametrize("config, override, message", CASES)
def test_bad_config_exits_2_with_one_line(shapes_data_dir, tmp_path, config, override, message):
  if config in BAD_FILES:
    config = _bad_config_file(tmp_path, config)
  flags = [f"--config.input.data_dir={shapes_data_dir}",
           "--config.input.dataset=shapes_captions/small"] + ([override] if override else [])
  out = run_main(["--config", config, "--workdir", str(tmp_path / "w"), *flags],
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                 timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  line = out.stderr.splitlines()
  assert len(line) == 1 and line[0].startswith(f"bigvl: bad config: {message}"), out.stderr
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
