"""``configs/fewshot_benchmarks.py`` without its data (the real benchmarks are never here): every
variant loads, the official SCL settings and step counts, the CIFAR-FS / FC100 class lists
(checked against CIFAR-100's own names and fine -> coarse map, kept here independently of the
config), and ``train.build`` on stand-ins: image folders of blank images (mini / tiered) and an
in-memory CIFAR-100 with its class names (CIFAR-FS / FC100)."""

import numpy as np
import pytest

from bigvl import train
from bigvl.config import ConfigError, load_config, load_sibling
from tests.helpers import REPO

CONFIG = f"{REPO}/configs/fewshot_benchmarks.py"
BENCHMARKS = ("mini", "tiered", "cifar_fs", "fc100")

#: CIFAR-100's fine label names in label-id order (the dataset's ``fine_label_names.txt``, which
#: TFDS ``cifar100`` reads into ``features['label'].names`` when it prepares the data; offline
#: and unprepared its names are '0'..'99')
CIFAR100_FINE = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")
#: ``coarse_label_names.txt``, in coarse-id order
CIFAR100_COARSE = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2")
#: the coarse id of each fine id (CIFAR-100's fixed map, as its records pair them)
FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13,
    15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4,
    17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13,
    15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)
#: scripts/run.sh of github.com/yassouali/SCL: (epochs, lr decay epochs, CE / spatial weights);
#: images: the official training sets (mini / CIFAR-FS 64 x 600, tiered (Ren et al. 2018)
#: 448,695 of 351 classes, FC100 60 x 600)
OFFICIAL = {"mini": (90, (60, 80), (1.0, 1.0), 38_400, 64, 84, 5),
            "tiered": (60, (30, 40, 50), (1.0, 1.0), 448_695, 351, 84, 5),
            "cifar_fs": (90, (45, 60, 75), (0.5, 0.5), 38_400, 64, 32, 2),
            "fc100": (90, (45, 60, 75), (1.0, 1.0), 36_000, 60, 32, 2)}
#: epochs x floor(images / 64) (the official loader's drop_last)
STEPS = {"mini": 54_000, "tiered": 420_600, "cifar_fs": 54_000, "fc100": 50_580}


def _load(bench, extra=""):
  return load_config(f"{CONFIG}:benchmark={bench}" + (f",{extra}" if extra else ""))


def _module():
  return load_sibling(CONFIG, "fewshot_benchmarks")


@pytest.mark.parametrize("bench", BENCHMARKS)
@pytest.mark.parametrize("extra", ["", "ce", "teacher=/tmp/run", "tiny", "ce,tiny,root=/x"])
def test_every_variant_loads(bench, extra):
  c = _load(bench, extra)
  assert c.task == "fewshot" and c.method == ("ce" if "ce" in extra else "scl")
  assert c.input.views == (1 if "teacher" in extra else 2)
  assert set(c.evals) == {"fewshot", "val"}
  default = {"mini": "folder:/data/miniImageNet", "tiered": "folder:/data/tieredImageNet"}
  if bench in ("cifar_fs", "fc100"):
    assert c.input.dataset == "cifar100"
    assert c.input.data_dir == ("/x" if "root" in extra else None)
  else:
    assert c.input.dataset == ("folder:/x" if "root" in extra else default[bench])


def test_unknown_benchmark_is_refused():
  with pytest.raises(ConfigError, match="benchmark='cub'"):
    _load("cub")


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_official_settings(bench):
  epochs, decay, weights, images, classes, size, block = OFFICIAL[bench]
  mod = _module()
  b = mod.BENCHMARKS[bench]
  assert (b["epochs"], b["decay_epochs"], b["images"], b["classes"]) == (epochs, decay, images,
                                                                         classes)
  assert mod.steps_per_epoch(bench) == images // 64
  assert mod.total_steps(bench) == epochs * (images // 64) == STEPS[bench]
  c = _load(bench)
  assert c.total_steps == STEPS[bench] and c.input.batch_size == 64
  assert c.input.image_size == size
  # the official ResNet-12
  assert tuple(c.model.widths) == (64, 160, 320, 640) and tuple(c.model.pool) == (2, 2, 2, 2)
  assert c.model.dropblock_size == block and c.model.drop_rate == 0.1
  assert c.fewshot.dropblock_warmup_steps == 40_000
  assert (c.fewshot.ce_weight, c.fewshot.spatial_weight) == weights
  assert c.fewshot.global_weight == 0.0 and c.fewshot.temperature == 0.1
  assert c.fewshot.proj_dim == 80
  o = c.optim
  assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.05, 0.9, False)
  assert o.wd == pytest.approx(5e-4 / (1 - 0.9))  # PyTorch's coupled L2 5e-4, decoupled
  assert c.schedule.decay == "cosine" and c.schedule.warmup_steps == 0
  mean, std = (((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
               if size == 32 else ((0.4721, 0.4533, 0.4100), (0.2772, 0.2677, 0.2845)))
  np.testing.assert_allclose(c.input.mean, mean, atol=1e-4)
  np.testing.assert_allclose(c.input.std, std, atol=1e-4)
  shift = c.input.transforms[0]["max_translate"] * size  # RandomCrop's padding
  assert round(shift) == (8 if size == 84 else 4)
  for name in ("fewshot", "val"):
    e = c.evals[name]
    assert (e["n_way"], tuple(e["shots"]), e["queries"], e["episodes"]) == (5, (1, 5), 15, 600)
    assert tuple(e["features"]) == ("global", "spatial")
  assert c.evals.fewshot["every"] == c.total_steps


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_ce_baseline_and_distillation(bench):
  ce = _load(bench, "ce")
  assert ce.method == "ce" and "spatial_weight" not in ce.fewshot
  d = _load(bench, "teacher=/runs/scl")
  assert d.fewshot.teacher == "/runs/scl" and d.input.views == 1
  assert (d.fewshot.ce_weight, d.fewshot.spatial_weight, d.fewshot.kd_weight,
          d.fewshot.kd_temperature, d.fewshot.feature_distill_weight) == (0, 0, 1, 4, 10)
  assert d.optim.lr == 0.01 and d.total_steps == STEPS[bench]


def test_cifar_class_lists():
  mod = _module()
  fine, coarse = set(CIFAR100_FINE), set(CIFAR100_COARSE)
  assert len(fine) == 100 and len(coarse) == 20 and len(FINE_TO_COARSE) == 100
  # the config's superclass table is CIFAR-100's fixed map
  assert set(mod.CIFAR100_SUPERCLASSES) == coarse
  for i, name in enumerate(CIFAR100_FINE):
    assert name in mod.CIFAR100_SUPERCLASSES[CIFAR100_COARSE[FINE_TO_COARSE[i]]]
  sizes = {"cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}
  for bench, split in mod.CLASS_SPLITS.items():
    lists = [split[s] for s in ("train", "val", "test")]
    assert tuple(len(x) for x in lists) == sizes[bench]
    assert all(len(set(x)) == len(x) and set(x) <= fine for x in lists)
    assert set().union(*lists) == fine  # disjoint and together every class
  supers = mod.FC100_SUPERCLASSES
  assert tuple(len(supers[s]) for s in ("train", "val", "test")) == (12, 4, 4)
  assert set().union(*supers.values()) == coarse
  for s, names in supers.items():  # FC100: exactly the fine classes of its superclasses
    ids = {CIFAR100_COARSE.index(n) for n in names}
    pairs = zip(CIFAR100_FINE, FINE_TO_COARSE, strict=True)
    assert set(mod.FC100[s]) == {f for f, k in pairs if k in ids}
  # TADAM's superclass ids (Oreshkin et al. 2018)
  assert {CIFAR100_COARSE.index(n) for n in supers["val"]} == {8, 11, 13, 16}
  assert {CIFAR100_COARSE.index(n) for n in supers["test"]} == {0, 7, 12, 14}
  for bench, split in mod.CLASS_SPLITS.items():
    c = _load(bench)
    assert tuple(c.input.classes) == split["train"] and c.input.train_split == "train"
    assert tuple(c.evals.fewshot["classes"]) == split["test"]
    assert tuple(c.evals.val["classes"]) == split["val"]
    assert c.evals.fewshot["split"] == c.evals.val["split"] == "test"


# --- train.build on stand-ins for the data ------------------------------------------------


def _folder(root, classes, per_class, first=0):
  from PIL import Image

  for k in range(first, first + classes):
    d = root / f"n{k:08d}"
    d.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("bench", ["mini", "tiered"])
def test_imagenet_benchmarks_build_from_folders(bench, tmp_path):
  import jax

  with pytest.raises(ConfigError, match="does not exist"):
    train.build(_load(bench, f"root={tmp_path}/none"), devices=jax.devices()[:1])
  _folder(tmp_path / "train", 3, 1)
  _folder(tmp_path / "val", 5, 20, first=3)
  _folder(tmp_path / "test", 5, 20, first=2)  # class n00000002 is also a train class
  with pytest.raises(ConfigError, match="shares 1 classes"):
    train.build(_load(bench, f"root={tmp_path}"), devices=jax.devices()[:1])
  (tmp_path / "test" / "n00000002").rename(tmp_path / "test" / "n00000099")
  run = train.build(_load(bench, f"root={tmp_path}"), devices=jax.devices()[:1])
  assert run.total_steps == STEPS[bench] and len(run.task.classes) == 3
  assert {name for name, _, _ in run.evaluators} == {"fewshot", "val"}


class _Names:
  def __init__(self, names):
    self.names, self.num_classes = list(names), len(names)


class _Info:
  features = {"label": _Names(CIFAR100_FINE), "coarse_label": _Names(CIFAR100_COARSE)}


@pytest.mark.parametrize("bench", ["cifar_fs", "fc100"])
def test_cifar_benchmarks_build_on_cifar100(bench, tmp_path, monkeypatch):
  """Unprepared: the ConfigError that says so; on an in-memory CIFAR-100 (20 blank images per
  class and split, TFDS's names): the base classes train, the novel and validation classes are
  evaluated, by name."""
  import jax

  from bigvl.data import sources

  with pytest.raises(ConfigError, match="cifar100.*not prepared"):
    train.build(_load(bench, f"root={tmp_path}"), devices=jax.devices()[:1])
  image = np.zeros((32, 32, 3), np.uint8)
  records = [{"image": image, "label": k, "coarse_label": FINE_TO_COARSE[k]}
             for k in range(100) for _ in range(20)]
  read = []

  def get_source(name, split, root=None):
    assert name == "cifar100" and split in ("train", "test")
    read.append(split)
    return records, _Info()

  monkeypatch.setattr(sources, "get_source", get_source)
  mod = _module()
  run = train.build(_load(bench), devices=jax.devices()[:1])
  split = mod.CLASS_SPLITS[bench]
  ids = lambda names: sorted(CIFAR100_FINE.index(n) for n in names)
  assert run.task.classes.tolist() == ids(split["train"])
  assert run.total_steps == STEPS[bench]
  evs = {name: ev for name, ev, _ in run.evaluators}
  for name, key in (("fewshot", "test"), ("val", "val")):
    labels = [evs[name].source[i]["label"] for i in range(len(evs[name].source))]
    assert sorted(set(labels)) == ids(split[key])
  assert read == ["train", "test", "test"]
