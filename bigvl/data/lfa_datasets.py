"""Class names and prompt templates of the 11 datasets of black-box few-shot adaptation of CLIP
(CoOp, Tip-Adapter, LFA (ICCV 2023)): ImageNet, Caltech101, OxfordPets, StanfordCars,
Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101.

The data is ``bigvl/data/lfa_datasets.json`` (package data), one entry per dataset under
``datasets``:

* ``class_names``: the readable names, **in TFDS label-id order**: name ``i`` is the class of
  TFDS label ``i`` of ``tfds_name``, except where some TFDS labels are dropped (Caltech101:
  ``tfds_label_ids[i]`` is the TFDS label of name ``i``, see :func:`tfds_to_class`);
* ``templates``: CoOp's single hand-crafted prompt of the dataset (``CUSTOM_TEMPLATES`` of
  CoOp's ``trainers/zsclip.py``, e.g. ``'a photo of a {}, a type of pet.'``); ImageNet has also
  ``template_sets``: ``'clip80'`` (CLIP's 80-prompt ensemble) and ``'select7'`` (the 7 prompts
  Tip-Adapter ensembles on ImageNet);
* ``tfds_name`` / ``label_key`` / ``train_split`` / ``test_split``: where the images are
  (TFDS names and split strings; FGVCAircraft, which TFDS lacks, is ``'folder:<root>'``);
* ``cleaning``: the rule that turns a raw TFDS label name into the readable one
  (:func:`clean_tfds_label`), ``notes``: what differs from CoOp's own splits and orders.

**Sources of the names.** They are CoOp's: the dataset's raw class names with CoOp's
per-dataset clean-up (``datasets/*.py`` of CoOp, plus its ``'_' -> ' '`` when filling a
template): Caltech101 without ``BACKGROUND_Google`` and ``Faces_easy`` (100 classes), Pets breeds
lower-cased, StanfordCars with the year first, SUN397 paths ``'/b/bistro/indoor'`` ->
``'indoor bistro'``, EuroSAT ``'AnnualCrop'`` -> ``'Annual Crop Land'``, UCF101 CamelCase split
into words. ImageNet's names are CLIP's cleaned list (CLIP's ``Prompt_Engineering_for_ImageNet``
notebook, which CoOp's ``classnames.txt`` copies); FGVCAircraft's are the 100 variants of
``variants.txt``. Where TFDS orders labels differently from CoOp (Food101, UCF101, Caltech101,
Pets against CLIP's list), TFDS's order is kept, since the label ids come from TFDS.

**Using them offline.** bigvl reads TFDS datasets prepared as ArrayRecord and never downloads:

1. Prepare each dataset once where its archives are (most TFDS builders download them; ImageNet
   needs ``ILSVRC2012_img_{train,val}.tar`` in TFDS's manual dir)::

     tfds build oxford_iiit_pet --data_dir=$BIGVL_DATA --file_format=array_record

   and copy ``$BIGVL_DATA`` to the offline machine (bigvl's data dir is
   ``config.input.data_dir``, else ``$BIGVL_DATA``, else ``~/tensorflow_datasets``).
   FGVCAircraft: lay out ``<root>/{train,test}/<variant>/*.jpg`` from ``fgvc-aircraft-2013b``
   (the ``notes`` of the entry) and use ``'folder:<root>'``.
2. Extract features with ``tool='extract_features'`` (``bigvl/tools/extract_features.py``):
   ``extract.dataset`` = the entry's ``tfds_name`` (:func:`dataset_spec`), ``extract.splits`` =
   its train / test splits, ``extract.lfa_dataset`` = the key here (``'oxford_pets'``), which
   takes :func:`class_names` and :func:`templates` from this module; then run LFA on the
   ``.npz`` files.

Names resolve case-insensitively, and by the aliases in the JSON (``'OxfordPets'``,
``'oxford_iiit_pet'``, ...).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

_RESOURCE = "lfa_datasets.json"


def _load() -> dict[str, dict[str, Any]]:
  text = resources.files("bigvl.data").joinpath(_RESOURCE).read_text(encoding="utf-8")
  return json.loads(text)["datasets"]


#: The datasets of ``lfa_datasets.json`` by key (``'imagenet'``, ``'caltech101'``, ...).
DATASETS: dict[str, dict[str, Any]] = _load()


def _norm(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def _aliases() -> dict[str, str]:
  table = {}
  for key, entry in DATASETS.items():
    for alias in [key, entry.get("tfds_name", ""), *entry.get("aliases", [])]:
      if alias and not alias.startswith("folder:"):
        table.setdefault(_norm(alias), key)
  return table


def canonical_name(name: str) -> str:
  """The key in :data:`DATASETS` of ``name`` (a key, an alias or the TFDS name, any case);
  ``KeyError`` listing the known names otherwise."""
  key = _aliases().get(_norm(name)) if isinstance(name, str) else None
  if key is None:
    raise KeyError(f"unknown LFA dataset {name!r}; known: {', '.join(DATASETS)} (or their "
                   f"aliases, e.g. 'OxfordPets', 'oxford_iiit_pet')")
  return key


def entry(name: str) -> dict[str, Any]:
  """The JSON entry of ``name`` (shared; do not modify it)."""
  return DATASETS[canonical_name(name)]


def class_names(name: str) -> list[str]:
  """The readable class names, name ``i`` = class index ``i`` (module docstring)."""
  return list(entry(name)["class_names"])


def templates(name: str, template_set: str | None = None) -> list[str]:
  """The prompt templates (each with one ``{}``): CoOp's single template, or a named set of
  ``template_sets`` (ImageNet: ``'clip80'``, ``'select7'``)."""
  e = entry(name)
  if template_set is None:
    return list(e["templates"])
  sets = e.get("template_sets", {})
  if template_set not in sets:
    raise KeyError(f"dataset {canonical_name(name)!r} has no template set {template_set!r}; "
                   f"it has: {', '.join(sets) or 'none (only its single template)'}")
  return list(sets[template_set])


def prompts(name: str, template_set: str | None = None) -> list[list[str]]:
  """Per class, every template filled with the class name: ``[C][P]`` strings."""
  temps = templates(name, template_set)
  return [[t.format(c) for t in temps] for c in class_names(name)]


def dataset_spec(name: str, root: str | None = None) -> str:
  """The ``config.input.dataset`` / ``extract.dataset`` string: the TFDS name, or for an image
  folder dataset ``'folder:<root>'`` (``root`` required)."""
  spec = entry(name)["tfds_name"]
  if spec.startswith("folder:"):
    if not root:
      raise ValueError(f"dataset {canonical_name(name)!r} is an image folder: give its root")
    return f"folder:{root}"
  return spec


def tfds_to_class(name: str) -> list[int]:
  """Per TFDS label id, the class index it maps to, ``-1`` for a dropped label (Caltech101's
  ``background_google`` and ``faces_easy``); the identity where nothing is dropped."""
  e = entry(name)
  ids = e.get("tfds_label_ids")
  if ids is None:
    return list(range(len(e["class_names"])))
  table = [-1] * e["tfds_num_classes"]
  for k, i in enumerate(ids):
    table[i] = k
  return table


def _camel_words(raw: str) -> str:
  return " ".join(re.findall(r"[A-Z][^A-Z]*", raw))


def _sun397(raw: str) -> str:
  # '/b/bistro/indoor' -> 'indoor bistro': drop the letter, reverse the rest (CoOp).
  return " ".join(raw.strip("/").split("/")[1:][::-1]).replace("_", " ")


def _year_first(raw: str) -> str:
  *model, year = raw.split(" ")
  return " ".join([year, *model])


_RULES = {
    "none": lambda raw: raw,
    "underscores": lambda raw: raw.replace("_", " "),
    "lower_underscores": lambda raw: raw.lower().replace("_", " "),
    "year_first": _year_first,
    "sun397_path": _sun397,
    "camel_case": _camel_words,
}


def clean_tfds_label(name: str, raw: str) -> str | None:
  """The readable name of the raw TFDS label name ``raw`` under the dataset's ``cleaning``
  (``renames`` first, then the ``rule``); ``None`` for a dropped label. ImageNet's TFDS labels
  are synset ids, which no rule turns into names (its rule is ``'none'``)."""
  c = entry(name)["cleaning"]
  if raw in c["dropped"]:
    return None
  if raw in c["renames"]:
    return c["renames"][raw]
  return _RULES[c["rule"]](raw)
