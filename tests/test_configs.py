"""Every experiment config has the keys a user relies on, and its ``:tiny`` variants build
(``train.build``: task, data, model, optimizer, evaluators, every key read) on local data."""

import glob
import os

import pytest

from bigvl import train
from bigvl.config import ConfigError, load_sibling
from bigvl.tasks import semisup_methods
from tests.helpers import REPO

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{REPO}/configs/*.py"))
REQUIRED = ("seed", "log_every", "ckpt_every", "mesh", "evals", "input.batch_size")
# Shared pieces other configs load, not experiments: get_config raises ConfigError.
NOT_EXPERIMENTS = ("semisup_base",)
# Their data cannot exist offline (TFDS datasets a user prepares with `tfds build`): building
# them here must fail with the ConfigError that says so, nothing else.
NEEDS_TFDS_DATA = {"semisup_cifar10": "cifar10", "semisup_svhn": "svhn_cropped"}
# The data every other tiny variant reads: shapes_captions (the session's small copy of it;
# the experiments' own configs of the builder differ only in size) or embedded MNIST.
SHAPES = ("siglip_shapes", "clip_shapes", "fff_shapes", "lvlm_shapes", "lvlm_llava15_7b",
          "vladva_shapes", "vladva_llava15_7b", "clip_dpo_shapes", "lfa_shapes")
# CLIP-DPO's stages that read the previous stage's output: built with stub files below.
# Segmentation: the small copy of shapes_segmentation.
SEGMENTATION = ("cct_shapes", "arseg_shapes")
# Few-shot: the small copy of shapes_fewshot.
FEWSHOT = ("scl_shapes",)
CLIP_DPO_STAGES = [("clip_dpo_shapes", "tiny,stage=candidates"),
                   ("clip_dpo_shapes", "tiny,stage=rank"), ("clip_dpo_shapes", "tiny,stage=dpo"),
                   ("clip_dpo_llava15_7b", None)]
TINY = ([(name, "tiny") for name in SHAPES] + [("fff_shapes", "tiny,baseline")]
        + [("lvlm_shapes", "tiny,answer=both"), ("lvlm_shapes", "tiny,lora=True")]
        + [("vladva_shapes", f"tiny,variant={v}") for v in ("full", "no_soft", "full_ft")]
        + [("clip_dpo_shapes", "tiny,stage=sft"), ("clip_dpo_shapes", "tiny,stage=ranker")]
        + [("da_digits", a) for a in ("tiny", "method=source_only,tiny", "tc_cliv,tiny",
                                      "method=dann,tc_cliv,direction=mnist2uci,tiny")]
        + [("semisup_mnist", f"{m},tiny") for m in sorted(semisup_methods.METHODS)]
        + [("cct_shapes", a) for a in ("tiny", "tiny,supervised", "tiny,aux=feature",
                                       "tiny,aux=cutout+vat")]
        + [("arseg_shapes", a) for a in ("tiny", "tiny,single", "tiny,objective=both")]
        + [("scl_shapes", a) for a in ("tiny", "tiny,ce", "tiny,global_weight=1.0")])
EXPERIMENTS = [n for n in CONFIGS if n not in NOT_EXPERIMENTS]


def _get(name, arg):
  return load_sibling(f"{REPO}/configs/x.py", name).get_config(arg)


def test_every_config_is_covered():
  """A new config gets a tiny build below, or is named in one of the explicit lists."""
  built = {name for name, _ in TINY + CLIP_DPO_STAGES} | {"da_benchmarks", "cct_benchmarks",
                                                           "fewshot_benchmarks"}
  assert set(CONFIGS) == built | set(NEEDS_TFDS_DATA) | set(NOT_EXPERIMENTS)
  assert set(semisup_methods.METHODS) >= {"supervised", "fixmatch", "mean_teacher", "vat"}


@pytest.mark.parametrize("name", NOT_EXPERIMENTS)
def test_shared_bases_are_not_experiments(name):
  with pytest.raises(ConfigError, match="not an experiment"):
    _get(name, None)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_has_required_keys(name, arg):
  c = _get(name, arg)
  flat = c.to_dict()
  for key in REQUIRED:
    node = flat
    for part in key.split("."):
      assert part in node, f"{name}:{arg} lacks {key}"
      node = node[part]
  assert any(flat.get(k) for k in ("total_steps", "total_epochs", "total_examples")), name
  assert {"data", "fsdp", "tensor"} <= set(flat["mesh"])


@pytest.mark.parametrize("name,arg", TINY, ids=[f"{n}:{a}" for n, a in TINY])
def test_tiny_variant_builds(name, arg, shapes_data_dir, seg_data_dir, fewshot_data_dir,
                             tmp_path):
  """``train.build`` of the variant as shipped, on local data: a config error (an unread or
  misspelt key, a bad value, a model field that does not exist) fails here."""
  c = _get(name, arg)
  if name in SHAPES:
    assert c.input.dataset.startswith("shapes_captions")
    c.input.dataset = ("shapes_captions/cooc_small" if "cooc" in c.input.dataset
                       else "shapes_captions/small")
    c.input.data_dir = shapes_data_dir
  elif name in SEGMENTATION:
    assert c.input.dataset in ("shapes_segmentation", "shapes_segmentation/textures")
    c.input.dataset = ("shapes_segmentation/textures_small" if "textures" in c.input.dataset
                       else "shapes_segmentation/small")
    c.input.data_dir = seg_data_dir
    if "num_labels" in c.input:
      c.input.num_labels = 32
  elif name in FEWSHOT:
    assert c.input.dataset == "shapes_fewshot/small"
    c.input.data_dir = fewshot_data_dir
  else:
    datasets = ([c.input.source.dataset, c.input.target.dataset] if "source" in c.input
                else [c.input.dataset])  # domain adaptation reads two domains
    assert all(d.startswith("embedded:") for d in datasets)
    c.input.data_dir = str(tmp_path)  # nothing may be read from a data dir
  unset = [k for k, v in c.get("init_from", {}).items() if v.get("path") is None]
  if unset:  # weights a user names (a public checkpoint): refused clearly until then
    with pytest.raises(ConfigError, match=f"init_from.{unset[0]}.path is not set"):
      train.build(c)
    c.init_from = {}
  run = train.build(c)
  assert run.total_steps == c.total_steps > 0
  assert {name for name, _, _ in run.evaluators} == set(c.evals)
  assert run.task.batch_size == c.input.batch_size
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["office31", "officehome", "visda", "mnist_usps"])
def test_da_benchmarks_say_their_data_is_missing(name, tmp_path):
  """The real benchmarks' configs build up to their data, and say which folder is missing."""
  c = _get("da_benchmarks", f"benchmark={name},root={tmp_path}")
  c.input.data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match="does not exist|not prepared"):
    train.build(c)


@pytest.mark.parametrize("arg", ["benchmark=voc", "benchmark=voc,weak", "benchmark=cityscapes",
                                 "benchmark=cocostuff,supervised", "benchmark=potsdam"])
def test_cct_benchmarks_say_their_lists_are_missing(arg, tmp_path):
  """The real segmentation benchmarks build up to their list files and name the missing one;
  with a stub list (one labeled image) the VOC config builds, 30 decoders and all."""
  import jax

  c = _get("cct_benchmarks", f"{arg},root={tmp_path}")  # the official 10 + 10 crops: 1 device
  with pytest.raises(ConfigError, match="no list file|not found|does not exist|missing"):
    train.build(c, devices=jax.devices()[:1])


def test_cct_voc_config_builds_with_its_lists(tmp_path):
  import numpy as np
  from PIL import Image

  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.jpg")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
  for split in ("1464_train_supervised", "val"):
    (tmp_path / f"{split}.txt").write_text("/a.jpg /a.png\n")
  (tmp_path / "1464_train_unsupervised.txt").write_text("/a.jpg\n")
  import jax

  run = train.build(_get("cct_benchmarks", f"benchmark=voc,root={tmp_path}"),
                    devices=jax.devices()[:1])
  assert len(run.task.aux_kinds) == 30 and run.task.num_classes == 21


@pytest.mark.parametrize("name", sorted(NEEDS_TFDS_DATA))
def test_tfds_tiny_variant_says_its_data_is_missing(name, tmp_path):
  c = _get(name, "tiny")
  assert c.input.dataset == NEEDS_TFDS_DATA[name]
  c.input.data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match=f"{NEEDS_TFDS_DATA[name]}.*not prepared"):
    train.build(c)


@pytest.mark.parametrize("name,arg", CLIP_DPO_STAGES, ids=[f"{n}:{a}" for n, a in CLIP_DPO_STAGES])
def test_clip_dpo_stages_say_what_they_need_then_build(name, arg, shapes_data_dir, tmp_path):
  """Each stage refuses to start without the previous stage's output (one clear line), and
  builds with it (stub files: a candidates chunk, a preference file)."""
  import json

  c = _get(name, arg)
  c.input.data_dir = shapes_data_dir
  c.input.dataset = "shapes_captions/cooc_small"
  stage = (arg or "stage=dpo").split("stage=")[1]
  need = {"candidates": "init_from.sft.path is not set", "rank": "rank.candidates is not set",
          "dpo": "needs config.dpo.reference_path"}[stage]
  with pytest.raises(ConfigError, match=need):
    train.build(c)
  if stage == "dpo":
    c.dpo.reference_path = str(tmp_path)  # read only when a run starts
    with pytest.raises(ConfigError, match="input.preferences is not set"):
      train.build(c)
  row = {"image_index": 0, "kind": "caption", "question": "caption", "text": "a red circle",
         "source": "sample", "chosen": "a red circle", "rejected": "a blue star",
         "chosen_score": 1.0, "rejected_score": 0.0, "chosen_source": "sample",
         "rejected_source": "sample"}
  (tmp_path / "candidates").mkdir()
  (tmp_path / "candidates" / "chunk_00000.jsonl").write_text(json.dumps(row) + "\n")
  (tmp_path / "preferences.jsonl").write_text(json.dumps(row) + "\n")
  c.init_from = {}
  if stage == "rank":
    c.rank.candidates = str(tmp_path)
    c.rank.dataset = "shapes_captions/cooc_small"
    c.input.dataset = "shapes_captions/small"  # the ranker's own training data
  if stage == "dpo":
    c.input.preferences = str(tmp_path)
  run = train.build(c)
  assert (run.tool is None) == (stage == "dpo")
