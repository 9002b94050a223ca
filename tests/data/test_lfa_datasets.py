"""The 11 LFA / CoOp datasets' class names and templates (bigvl/data/lfa_datasets.json): counts,
uniqueness, templates, and the names against the label lists the installed TFDS ships
(label files and builders' ClassLabel names, read offline without preparing anything)."""

from __future__ import annotations

import re

import pytest

from bigvl.data import lfa_datasets as lfa

COUNTS = {
    "imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
    "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47,
    "eurosat": 10, "ucf101": 101,
}

# ImageNet ids where CLIP's clean name shares no word with the raw ILSVRC synonyms (a synonym
# or a finer word, checked by hand): any shift of the list breaks far more positions than these.
IMAGENET_SYNONYMS = {
    7, 27, 84, 97, 236, 243, 255, 393, 455, 502, 505, 520, 601, 607, 608, 630, 636, 638, 667,
    670, 680, 690, 697, 699, 707, 770, 814, 824, 836, 865, 884, 896, 913, 914, 930, 964, 970,
    978, 995, 998,
}


def test_the_eleven_datasets_and_their_class_counts():
  assert set(lfa.DATASETS) == set(COUNTS)
  for name, n in COUNTS.items():
    names = lfa.class_names(name)
    assert len(names) == n == lfa.entry(name)["num_classes"], name
    assert all(isinstance(c, str) and c.strip() == c and c for c in names), name
    dups = {c for c in names if names.count(c) > 1}
    assert dups == set(lfa.entry(name).get("known_duplicates", {})), name


def test_imagenet_duplicates_are_clips_and_anchors():
  names = lfa.class_names("imagenet")
  assert lfa.entry("imagenet")["known_duplicates"] == {"missile": [657, 744],
                                                       "sunglasses": [836, 837]}
  for word, ids in lfa.entry("imagenet")["known_duplicates"].items():
    assert [i for i, c in enumerate(names) if c == word] == ids
  anchors = {0: "tench", 1: "goldfish", 2: "great white shark", 207: "golden retriever",
             281: "tabby cat", 340: "zebra", 409: "analog clock", 530: "digital clock",
             817: "sports car", 954: "banana", 999: "toilet paper"}
  assert {i: names[i].lower() for i in anchors} == anchors
  assert names[134] == "crane bird" and names[517] == "construction crane"


def test_templates_have_one_slot_and_prompts_fill_them():
  for name in COUNTS:
    sets = [lfa.templates(name)] + [lfa.templates(name, s)
                                    for s in lfa.entry(name).get("template_sets", {})]
    for temps in sets:
      assert temps and all(t.count("{}") == 1 for t in temps), name
  assert lfa.templates("oxford_pets") == ["a photo of a {}, a type of pet."]
  assert lfa.templates("eurosat") == ["a centered satellite photo of {}."]
  assert lfa.templates("ucf101") == ["a photo of a person doing {}."]
  assert lfa.templates("imagenet") == ["a photo of a {}."]
  assert len(lfa.templates("imagenet", "clip80")) == 80
  assert len(lfa.templates("imagenet", "select7")) == 7
  p = lfa.prompts("eurosat")
  assert len(p) == 10 and p[0] == ["a centered satellite photo of Annual Crop Land."]
  assert len(lfa.prompts("imagenet", "clip80")[999]) == 80


def test_lookup_by_alias_and_clear_errors():
  assert lfa.class_names("OxfordPets") == lfa.class_names("oxford_iiit_pet")
  assert lfa.canonical_name("eurosat/rgb") == "eurosat"
  assert lfa.canonical_name("SUN397") == "sun397"
  with pytest.raises(KeyError, match="known: imagenet, caltech101"):
    lfa.class_names("cifar10")
  with pytest.raises(KeyError, match="no template set"):
    lfa.templates("dtd", "clip80")
  assert lfa.dataset_spec("oxford_pets") == "oxford_iiit_pet"
  assert lfa.dataset_spec("fgvc_aircraft", "/data/fgvc") == "folder:/data/fgvc"
  with pytest.raises(ValueError):
    lfa.dataset_spec("fgvc_aircraft")


def test_cleaning_rules_on_examples():
  assert lfa.clean_tfds_label("sun397", "/a/airplane_cabin") == "airplane cabin"
  assert lfa.clean_tfds_label("sun397", "/b/bistro/indoor") == "indoor bistro"
  assert lfa.clean_tfds_label("stanford_cars", "AM General Hummer SUV 2000") == (
      "2000 AM General Hummer SUV")
  assert lfa.clean_tfds_label("ucf101", "ApplyEyeMakeup") == "Apply Eye Makeup"
  assert lfa.clean_tfds_label("oxford_pets", "British_Shorthair") == "british shorthair"
  assert lfa.clean_tfds_label("eurosat", "AnnualCrop") == "Annual Crop Land"
  assert lfa.clean_tfds_label("caltech101", "background_google") is None
  assert lfa.clean_tfds_label("caltech101", "faces") == "face"


def test_fgvc_aircraft_folder_order_is_the_name_order():
  # bigvl's folder: source labels sorted sub-directories; '/' cannot be in a directory name.
  names = lfa.class_names("fgvc_aircraft")
  dirs = [c.replace("/", "_") for c in names]
  assert dirs == sorted(dirs) and len(set(dirs)) == 100


def test_caltech101_map_drops_background_and_faces_easy():
  table = lfa.tfds_to_class("caltech101")
  assert len(table) == 102 and table.count(-1) == 2
  assert sorted(k for k in table if k >= 0) == list(range(100))
  assert lfa.tfds_to_class("dtd") == list(range(47))


# -- against the installed TFDS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def _tfds_names(tfds, name, tmp_path_factory):
  """Raw ClassLabel names of a TFDS builder, without data (its info is defined in code)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  return list(tfds.builder(name, data_dir=str(data_dir)).info.features["label"].names)


def _label_file(tfds, path):
  with open(tfds.core.tfds_path(path)) as f:
    return [line.strip() for line in f if line.strip()]


@pytest.mark.parametrize("name", ["caltech101", "oxford_pets", "stanford_cars",
                                  "oxford_flowers", "food101", "sun397", "dtd", "eurosat"])
def test_names_are_tfds_labels_cleaned_in_order(name, tfds, tmp_path_factory):
  e = lfa.entry(name)
  raw = _tfds_names(tfds, e["tfds_name"], tmp_path_factory)
  cleaned = [lfa.clean_tfds_label(name, r) for r in raw]
  kept = [c for c in cleaned if c is not None]
  assert kept == lfa.class_names(name)
  table = lfa.tfds_to_class(name)
  assert len(table) == len(raw)
  assert [lfa.class_names(name)[k] if k >= 0 else None for k in table] == cleaned


def test_label_files_agree(tfds, tmp_path_factory):
  # The label files behind the builders above, and UCF101's (its builder imports slowly).
  def check(name, path):
    cleaned = [lfa.clean_tfds_label(name, r) for r in _label_file(tfds, path)]
    assert [c for c in cleaned if c is not None] == lfa.class_names(name), name

  check("caltech101", "image_classification/caltech101_labels.txt")
  check("sun397", "image_classification/sun397_labels.txt")
  check("food101", "image_classification/food-101_classes.txt")
  check("ucf101", "video/ucf101_labels.txt")


def test_imagenet_order_matches_tfds_and_the_ilsvrc_list(tfds, tmp_path_factory):
  synsets = _tfds_names(tfds, "imagenet2012", tmp_path_factory)
  assert synsets == sorted(synsets) and len(set(synsets)) == 1000
  assert synsets[:2] == ["n01440764", "n01443537"]  # tench, goldfish
  from tensorflow_datasets.datasets.siscore import labels as siscore

  readable = siscore.IMAGENET_LABELS_LIST  # "tench, Tinca tinca", ... in ILSVRC id order
  assert len(readable) == 1000

  def words(s):
    return set(re.findall(r"[a-z0-9]+", s.lower()))

  names = lfa.class_names("imagenet")
  pairs = enumerate(zip(names, readable, strict=True))
  unmatched = {i for i, (c, r) in pairs if not words(c) & words(r)}
  assert unmatched == IMAGENET_SYNONYMS
  # SI-Score's own name -> ImageNet id table (112 ids) agrees too; the 4 without a shared word:
  # flowerpot / plant pot, hedgehog / porcupine, maracas / maraca, taxi / taxicab.
  for word, i in siscore.IMAGENET_LABELS.items():
    assert words(word) & words(names[i]) or i in {334, 468, 641, 738}, (word, i, names[i])
