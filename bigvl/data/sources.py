"""Random-access data sources by name, for grain.

``config.input.dataset`` names one of:
* a TFDS builder of bigvl's own (``bigvl/data/builders/<name>.py``), e.g.
  ``'shapes_captions'`` or ``'shapes_captions/dups'``: prepared once (ArrayRecord) under the
  data dir, then read with ``tfds.data_source``;
* any TFDS dataset already prepared as ArrayRecord under the data dir (``'coco_captions'``,
  ``'cifar10'``, ...): the path real users take with a config change;
* ``'embedded:<name>'``: real data an installed package ships, from the registry of
  :func:`register_embedded` (filled by the modules in :data:`EMBEDDED_PROVIDERS`);
* ``'folder:<root>'``: an image folder, one sub-directory per class (``bigvl.data.folders``:
  Office-31, Office-Home, VisDA as distributed);
* ``'pairs:<root>'``: a segmentation dataset given as list files, ``<root>/<split>.txt`` with
  lines ``image_path [mask_path]`` (``bigvl.data.pairs``: CCT's Pascal VOC / Cityscapes lists).

The data dir is ``config.input.data_dir``, else ``$BIGVL_DATA``, else ``~/tensorflow_datasets``.

TensorFlow is only TFDS's engine for preparing a dataset here: its start-up logging and TFDS's
download/prepare messages are kept out of the user's output (:func:`_quiet_tfds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from bigvl import registry
from bigvl.config import ConfigError

log = logging.getLogger(__name__)


#: Modules that register ``embedded:`` datasets when imported (first use of the prefix).
EMBEDDED_PROVIDERS = ("bigvl.data.digits",)


@dataclasses.dataclass(frozen=True)
class Embedded:
  """An ``embedded:<name>`` dataset: ``load(split) -> random-access source``."""

  load: Callable[[str], Any]
  splits: tuple[str, ...]


_EMBEDDED: dict[str, Embedded] = {}


def register_embedded(name: str, load: Callable[[str], Any], splits: Sequence[str]) -> None:
  """Makes ``config.input.dataset = 'embedded:<name>'`` read ``load(split)``, ``split`` one
  of ``splits``."""
  _EMBEDDED[name] = Embedded(load, tuple(splits))


def embedded_names() -> list[str]:
  """The registered ``embedded:`` dataset names (imports :data:`EMBEDDED_PROVIDERS`)."""
  for module in EMBEDDED_PROVIDERS:
    importlib.import_module(module)
  return sorted(_EMBEDDED)


def _embedded_source(name: str, split: str) -> Any:
  if name not in embedded_names():
    raise ConfigError(f"unknown dataset 'embedded:{name}'; embedded datasets: "
                      f"{', '.join(embedded_names())}")
  entry = _EMBEDDED[name]
  if split not in entry.splits:
    raise ConfigError(f"dataset 'embedded:{name}' has no split {split!r}; splits: "
                      f"{', '.join(entry.splits)}")
  return entry.load(split)


def data_dir(explicit: str | None = None) -> str:
  return os.path.expanduser(explicit or os.environ.get("BIGVL_DATA") or "~/tensorflow_datasets")


def _quiet_tfds():
  """Imports ``tensorflow_datasets`` with TensorFlow's C++ start-up logging off (oneDNN's
  notice, absl's pre-init warning: TF reads these variables when it loads; a value the user
  set wins) and TFDS's progress bars off."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only encodes images here
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  return tfds


class SkippingSource:
  """Wraps a source; a record that fails to read or decode comes back as ``None`` and is
  counted (``num_skipped``), so one corrupt sample never stops a run."""

  def __init__(self, source: Any, name: str):
    self._source, self._name = source, name
    self._lock = threading.Lock()
    self.num_skipped = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    try:
      return self._source[index]
    except Exception as e:  # noqa: BLE001 -- any unreadable record is skipped
      with self._lock:
        self.num_skipped += 1
      log.warning("skipping unreadable record %d of %s: %s", index, self._name, e)
      return None


def tfds_builder(name: str, root: str):
  """The TFDS builder for ``name`` (``'ds'`` or ``'ds/config'``), prepared if it is ours."""
  tfds = _quiet_tfds()

  base = name.split("/")[0].split(":")[0]
  own = base in registry.available("data.builders")
  if own:
    importlib.import_module(f"bigvl.data.builders.{base}")  # registers the builder
  try:
    builder = tfds.builder(name, data_dir=root, file_format="array_record")
  except Exception as e:  # noqa: BLE001 -- tfds raises several kinds for unknown names
    raise ConfigError(f"unknown dataset {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}"
                      ) from None
  if not builder.is_prepared():
    if not own:
      raise ConfigError(f"dataset {name!r} is not prepared under {root}; run `tfds build "
                        f"{name} --data_dir={root} --file_format=array_record` first")
    _prepare_locked(builder, root)
    # Re-open: another process may have prepared it while we waited for the lock.
    builder = tfds.builder(name, data_dir=root, file_format="array_record")
  return builder


def _prepare_locked(builder: Any, root: str) -> None:
  """Prepares once even if several processes start together (a lock file in the data dir)."""
  import fcntl

  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{builder.name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      if not builder.is_prepared():
        print(f"bigvl: preparing {builder.info.full_name} under {root} (once)", flush=True)
        # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ...
        # downloaded and prepared ..." to stdout; nothing is downloaded here.
        with contextlib.redirect_stdout(io.StringIO()):
          builder.download_and_prepare(file_format="array_record")
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_source(name: str, split: str, root: str | None = None) -> tuple[Any, Any]:
  """Returns ``(random-access source, info)``; info is the TFDS DatasetInfo (or the embedded
  dataset's info object, with ``features`` and ``splits``; ``folder:`` / ``pairs:``: a small
  object with the ``features`` (and ``splits``) that code reads)."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f"config.input.dataset must be a dataset name, got {name!r}")
  root = data_dir(root)
  if name.startswith("embedded:"):
    return SkippingSource(_embedded_source(name.split(":", 1)[1], split), name), None
  if name.startswith("folder:"):
    from bigvl.data import folders

    src, info = folders.load(name.split(":", 1)[1], split)
    return SkippingSource(src, name), info
  if name.startswith("pairs:"):
    from bigvl.data import pairs

    src, info = pairs.load(name.split(":", 1)[1], split)
    return SkippingSource(src, f"{name}:{split}"), info
  builder = tfds_builder(name, root)
  if split.split("[")[0] not in builder.info.splits:
    raise ConfigError(f"dataset {name!r} has no split {split!r}; splits: "
                      f"{', '.join(builder.info.splits)}")
  return SkippingSource(_tfds_source(builder, split), f"{name}:{split}"), builder.info


def _tfds_source(builder: Any, split: str) -> Any:
  """The split's records decoded to numpy: by :mod:`bigvl.data.tfds_decode` (TFDS's own
  result, in less than half the decoding time) when the features are plain, else by TFDS."""
  from bigvl.data import tfds_decode

  decode = tfds_decode.fast_decoder(builder.info.features)
  if decode is None:
    return builder.as_data_source(split=split)
  tfds = _quiet_tfds()
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return tfds_decode.DecodedSource(raw, decode)
