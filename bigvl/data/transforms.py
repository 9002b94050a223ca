"""Composable per-example transforms, shared by every task and chosen by the config.

A transform maps one example dict to another on the host, inside grain's ``random_map``
(``bigvl/data/pipeline.py``)::

    transform(example: dict, rng: np.random.Generator) -> dict

It is a list of **ops** applied in order. Each op reads the keys it names (``key=`` /
``keys=``) and writes its result under ``out=`` (default: the key it read); every other key
passes through. Ops never modify an array in place (they return new arrays), so keys may
share arrays. Random ops draw from ``rng`` in a fixed order, so the same example and the same
generator state give bitwise the same output.

**Spatial keys.** Geometric ops (``resize``, ``random_flip``, ``random_translate``, ``weak``,
``strong``) move every key in ``keys`` with one random geometry. A key in ``masks`` (default:
the keys whose name ends in ``mask``) is a label map (``[H, W]`` or ``[H, W, 1]``, integer): it is
resampled nearest-neighbour, so labels stay on their pixels, and where a warp leaves the
image it gets ``mask_fill``. Images are ``[H, W, C]``: bilinear resize, reflect-padded
translation, PIL nearest affine warps (``bigvl.data.augment``).

**Specs.** A config writes a pipeline as a list of op specs, each either a string
``"name(arg, ..., kw=value)"`` (or just ``"name"``) or a dict ``{'op': name, 'args': [...],
kw: value}``::

    config.input.transforms = [
        "sample_captions(5, key='captions')",
        "resize(224, keys=('image', 'mask'))",
        "value_range(-1, 1)",
        {"op": "tokenize", "max_len": 32, "bos": True},
        "keep(('image', 'mask', 'tokens'))",
    ]

Strings are parsed with ``ast``; every argument must be a Python literal
(``ast.literal_eval``: numbers, strings, tuples, lists, dicts, True/False/None), so a spec can
never run code. An unknown op, a non-literal or a bad argument is a ``ConfigError`` naming the
spec. Objects a config cannot write (the tokenizer) come from the task: ``build(specs,
tokenizer=...)``.

Ops (``OPS``; ``register`` adds more):

=================  ========================================================================
keep               keep only ``keys`` (+ ``optional`` ones that are present), in that order
drop               remove ``keys``
rename / copy      ``{src: dst}``: move / duplicate values
cast               ``key`` -> numpy ``dtype`` (scalars stay numpy scalars); ``default`` if absent
multi_hot          a list of class ids -> float32 ``[num]`` with ones at those ids (image-level
                   labels of weakly-labelled segmentation)
classes_present    a label map -> float32 ``[num_classes - 1]``: which object classes (ids
                   1..) it shows (image-level labels derived from masks)
value_range        uint8 ``[0, 255]`` -> float32 ``[lo, hi]``: ``x (hi - lo) / 255 + lo``
resize             to ``size`` (int: square, or ``(h, w)``): images bilinear (PIL), masks nearest
random_flip        horizontal flip of every key with probability ``p`` (one draw)
random_scale_crop  longer side to ``base_size * s``, ``s ~ U(scale)``, pad to ``crop`` (masks
                   with ``mask_fill``), one random ``crop x crop`` window (segmentation training)
random_translate   one integer shift ``(dy, dx)`` (``augment.random_shift``) of every key,
                   reflect-filled (masks too: a reflected pixel keeps its own label)
weak               ``random_flip`` (if ``flip``) then ``random_translate``: FixMatch's weak
                   augmentation, bitwise ``augment.weak_augment`` on the image
strong             ``weak``, RandAugment (geometric ops warp the masks too), Cutout (image
                   only): bitwise ``augment.strong_augment`` on the image
sample_captions    ``k`` of the example's captions: random (with replacement only if fewer
                   than ``k``) or, ``random=False``, the first ``k`` cycling (eval)
tokenize           text(s) -> int32 ``[max_len]`` / ``[N, max_len]`` with the task's tokenizer;
                   ``bos`` / ``eos`` / ``pad_id`` override the tokenizer's choices
chat_encode        an answer (``answer_key``; several keys: one drawn, with its question) in the
                   task's chat template -> ``tokens`` / ``loss_mask`` int32 ``[L]`` (unpadded;
                   ``bigvl.data.captioning.ChatEncoder.encode``)
chat_prompt        the template's generation prompt, left-padded -> ``prompt`` / ``prompt_mask``
                   int32 ``[max_len]`` (``ChatEncoder.prompt_row``)
channels           an image to 1 (luma) or 3 (repeated gray) channels
views              run several sub-pipelines on the same example and stack their ``out`` keys
                   ``[V, ...]`` (multi-view methods: Pi-model, FixMatch, few-shot episodes)
=================  ========================================================================
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bigvl.config import ConfigError
from bigvl.data import augment

Example = dict[str, Any]
#: one op spec as a config writes it.
Spec = str | Mapping[str, Any]

#: name -> op class. An op class is constructed from a spec's arguments (plus the context
#: values named in its ``context`` attribute) and called as ``op(example, rng) -> example``.
OPS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the op available to specs as ``name``."""
  def add(cls: type) -> type:
    if name in OPS:
      raise ValueError(f"transform op {name!r} is registered twice")
    cls.op_name = name
    OPS[name] = cls
    return cls
  return add


class _NoRandom:
  """The generator of a deterministic (eval) transform: any use is an error."""

  def __getattr__(self, name: str) -> Any:
    raise RuntimeError("a deterministic (eval) transform contains a random op")


#: pass as ``rng`` to run a transform that must not draw random numbers.
NO_RNG: Any = _NoRandom()


class Transform:
  """A composed pipeline: ``transform(example, rng=NO_RNG)`` applies ``ops`` in order."""

  def __init__(self, ops: Sequence[Callable[[Example, Any], Example]],
               specs: Sequence[Spec] = ()):
    self.ops, self.specs = tuple(ops), tuple(specs)

  def __call__(self, example: Example, rng: np.random.Generator = NO_RNG) -> Example:
    for op in self.ops:
      try:
        example = op(example, rng)
      except KeyError as e:
        raise KeyError(f"transform op {getattr(op, 'op_name', op)!r}: the example has no key "
                       f"{e}; it has {sorted(example)}") from None
    return example

  def __repr__(self) -> str:
    return f"Transform({list(self.specs)!r})"


# ---------------------------------------------------------------------------------------------
# Specs.
# ---------------------------------------------------------------------------------------------


def _literal(node: ast.expr, spec: str, where: str) -> Any:
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
    raise ConfigError(
        f"{where}={spec!r}: argument {ast.unparse(node)!r} is not a literal (numbers, "
        f"strings, tuples, lists, dicts, True/False/None)") from None


def parse(spec: Spec, where: str = "transforms") -> tuple[str, tuple, dict[str, Any]]:
  """``"name(a, kw=b)"`` or ``{'op': name, 'args': [a], 'kw': b}`` -> ``(name, (a,), {kw: b})``.

  A string must be one call of a plain name (or a bare name) whose arguments are literals;
  nothing in it is evaluated. ConfigError otherwise.
  """
  if isinstance(spec, str):
    try:
      node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
      raise ConfigError(f"{where}={spec!r}: not an op spec 'name(args...)': {e.msg}") from None
    if isinstance(node, ast.Name):
      return node.id, (), {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
      raise ConfigError(f"{where}={spec!r}: an op spec is 'name' or 'name(args...)' with a "
                        f"plain op name")
    args = []
    for a in node.args:
      if isinstance(a, ast.Starred):
        raise ConfigError(f"{where}={spec!r}: *args are not allowed in an op spec")
      args.append(_literal(a, spec, where))
    kwargs = {}
    for kw in node.keywords:
      if kw.arg is None:
        raise ConfigError(f"{where}={spec!r}: **kwargs are not allowed in an op spec")
      kwargs[kw.arg] = _literal(kw.value, spec, where)
    return node.func.id, tuple(args), kwargs
  if isinstance(spec, Mapping) or hasattr(spec, "items"):  # dict or ConfigDict
    fields = dict(spec.items())
    name = fields.pop("op", None)
    if not isinstance(name, str):
      raise ConfigError(f"{where}={fields!r}: a dict op spec needs 'op': <name>")
    args = fields.pop("args", ())
    if isinstance(args, (str, Mapping)) or not isinstance(args, Sequence):
      raise ConfigError(f"{where}: 'args' of op {name!r} must be a list, got {args!r}")
    return name, tuple(args), fields
  raise ConfigError(f"{where}: an op spec is a string 'name(args...)' or a dict "
                    f"{{'op': name, ...}}, got {type(spec).__name__} {spec!r}")


def _public_signature(cls: type) -> str:
  sig = inspect.signature(cls)
  context = getattr(cls, "context", ())
  params = [p.replace(annotation=inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name not in context]
  return f"{cls.op_name}{sig.replace(parameters=params)}"


def build(specs: Sequence[Spec] | Spec | None, *, where: str = "transforms",
          **context: Any) -> Transform:
  """The :class:`Transform` of a list of op specs (see the module docstring).

  Args:
    specs: op specs in order (a single spec is a one-op pipeline; None or [] the identity).
    where: the config path for error messages (``'config.input.transforms'``).
    **context: objects ops may need that a config cannot write, e.g. ``tokenizer=``.
  Raises:
    ConfigError: an unknown op, a non-literal argument, arguments the op does not take or
      values it refuses, or a context object the op needs and the task did not give.
  """
  if specs is None:
    specs = []
  if isinstance(specs, (str, Mapping)) or hasattr(specs, "items"):
    specs = [specs]
  if not isinstance(specs, Sequence):
    raise ConfigError(f"{where} must be a list of op specs, got {type(specs).__name__}")
  ops = []
  for i, spec in enumerate(specs):
    here = f"{where}[{i}]"
    name, args, kwargs = parse(spec, here)
    cls = OPS.get(name)
    if cls is None:
      raise ConfigError(f"{here}={spec!r}: unknown transform op {name!r}; known: "
                        f"{', '.join(sorted(OPS))}")
    needs = getattr(cls, "context", ())
    clash = sorted(set(needs) & set(kwargs))
    if clash:
      raise ConfigError(f"{here}={spec!r}: {', '.join(clash)} of op {name!r} is set by the "
                        f"task, not the config")
    extra = {}
    for c in needs:
      if c == "build":
        extra[c] = _nested_builder(context)
      elif c == "where":
        extra[c] = here
      elif context.get(c) is None:
        raise ConfigError(f"{here}={spec!r}: op {name!r} needs a {c}, which this task does "
                          f"not provide")
      else:
        extra[c] = context[c]
    try:
      inspect.signature(cls).bind(*args, **kwargs, **extra)
    except TypeError as e:
      raise ConfigError(f"{here}={spec!r}: {e}; the op is {_public_signature(cls)}") from None
    try:
      ops.append(cls(*args, **kwargs, **extra))
    except ConfigError:
      raise
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{here}={spec!r}: {e}") from None
  return Transform(ops, specs)


def _nested_builder(context: dict[str, Any]) -> Callable[[Any, str], Transform]:
  def nested(specs: Any, where: str) -> Transform:
    return build(specs, where=where, **context)
  return nested


# ---------------------------------------------------------------------------------------------
# Argument helpers.
# ---------------------------------------------------------------------------------------------


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
  """A key or a sequence of keys -> tuple of str."""
  names = (value,) if isinstance(value, str) else tuple(value)
  if not all(isinstance(n, str) for n in names):
    raise ValueError(f"{what} must be a key or a list of keys (str), got {value!r}")
  return names


def _mapping(value: Mapping[str, str], what: str) -> dict[str, str]:
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
    raise ValueError(f"{what} must be a dict {{src_key: dst_key}}, got {value!r}")
  return dict(value)


class _Spatial:
  """Base of geometric ops: ``keys`` move together; ``masks`` (a subset) are label maps."""

  def __init__(self, keys: str | Sequence[str], masks: str | Sequence[str] | None):
    self.keys = _names(keys, "keys")
    if not self.keys:
      raise ValueError("keys must name at least one spatial key")
    if masks is None:
      self.masks = tuple(k for k in self.keys if k.endswith("mask"))
    else:
      self.masks = _names(masks, "masks")
      if set(self.masks) - set(self.keys):
        raise ValueError(f"masks {sorted(set(self.masks) - set(self.keys))} are not in keys "
                         f"{list(self.keys)}")
    self.images = tuple(k for k in self.keys if k not in self.masks)

  def _size(self, example: Example) -> tuple[int, int]:
    """The common ``(H, W)`` of the spatial keys (ValueError if they differ)."""
    sizes = {k: tuple(np.shape(example[k])[:2]) for k in self.keys}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"op {self.op_name}: spatial keys differ in size: {sizes}")
    return next(iter(sizes.values()))


# ---------------------------------------------------------------------------------------------
# Key bookkeeping.
# ---------------------------------------------------------------------------------------------


@register("keep")
class Keep:
  """Keeps ``keys`` (KeyError if one is missing) and those of ``optional`` that are present,
  in that order; drops the rest."""

  def __init__(self, keys: str | Sequence[str], optional: str | Sequence[str] = ()):
    self.keys, self.optional = _names(keys, "keys"), _names(optional, "optional")

  def __call__(self, example: Example, rng: Any) -> Example:
    out = {k: example[k] for k in self.keys}
    out.update((k, example[k]) for k in self.optional if k in example)
    return out


@register("drop")
class Drop:
  """Removes ``keys`` (those absent are ignored)."""

  def __init__(self, keys: str | Sequence[str]):
    self.keys = set(_names(keys, "keys"))

  def __call__(self, example: Example, rng: Any) -> Example:
    return {k: v for k, v in example.items() if k not in self.keys}


@register("rename")
class Rename:
  """``{src: dst}``: the value of ``src`` moves to ``dst`` (replacing any ``dst``)."""

  def __init__(self, mapping: Mapping[str, str]):
    self.mapping = _mapping(mapping, "rename")

  def __call__(self, example: Example, rng: Any) -> Example:
    moved = {dst: example[src] for src, dst in self.mapping.items()}
    out = {k: v for k, v in example.items() if k not in self.mapping}
    out.update(moved)
    return out


@register("copy")
class Copy:
  """``{src: dst}``: ``dst`` gets the value of ``src`` too (shared: ops never write in place)."""

  def __init__(self, mapping: Mapping[str, str]):
    self.mapping = _mapping(mapping, "copy")

  def __call__(self, example: Example, rng: Any) -> Example:
    return {**example, **{dst: example[src] for src, dst in self.mapping.items()}}


@register("cast")
class Cast:
  """``out`` (default ``key``) = ``example[key]`` as numpy ``dtype``: a scalar becomes a numpy
  scalar (``np.int32(v)``), an array ``np.asarray(v, dtype)``. A missing ``key`` takes
  ``default`` if one is given, is skipped if ``required=False``, else is a KeyError."""

  def __init__(self, key: str, dtype: str = "int32", out: str | None = None,
               default: Any = None, required: bool = True):
    self.key, self.out = key, out or key
    self.dtype = np.dtype(dtype)
    self.default, self.required = default, required

  def __call__(self, example: Example, rng: Any) -> Example:
    if self.key in example:
      value = example[self.key]
    elif self.default is not None:
      value = self.default
    elif not self.required:
      return example
    else:
      raise KeyError(self.key)
    value = self.dtype.type(value) if np.ndim(value) == 0 else np.asarray(value, self.dtype)
    return {**example, self.out: value}


@register("multi_hot")
class MultiHot:
  """``out`` (default ``key``) = float32 ``[num]``, 1 at every id in ``example[key]`` (a list
  or array of ints in ``0..num-1``), 0 elsewhere."""

  def __init__(self, key: str, num: int, out: str | None = None):
    if not isinstance(num, int) or num < 1:
      raise ValueError(f"multi_hot: num must be an int >= 1, got {num!r}")
    self.key, self.num, self.out = key, num, out or key

  def __call__(self, example: Example, rng: Any) -> Example:
    ids = np.asarray(example[self.key], np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num):
      raise ValueError(f"multi_hot: ids {ids.tolist()} outside 0..{self.num - 1}")
    out = np.zeros(self.num, np.float32)
    out[ids] = 1.0
    return {**example, self.out: out}


@register("classes_present")
class ClassesPresent:
  """``out`` = float32 ``[num_classes - 1]``, entry ``c - 1`` is 1 when object class ``c >= 1``
  occurs in the label map ``example[key]`` (background 0 and ``ignore_label`` are not
  classes): the image-level labels of a segmentation mask."""

  def __init__(self, num_classes: int, key: str = "mask", out: str = "weak",
               ignore_label: int = 255):
    if not isinstance(num_classes, int) or num_classes < 2:
      raise ValueError(f"classes_present: num_classes must be an int >= 2, got {num_classes!r}")
    self.num, self.key, self.out, self.ignore = num_classes, key, out, int(ignore_label)

  def __call__(self, example: Example, rng: Any) -> Example:
    ids = np.unique(np.asarray(example[self.key]))
    ids = ids[(ids > 0) & (ids != self.ignore) & (ids < self.num)].astype(np.int64)
    out = np.zeros(self.num - 1, np.float32)
    out[ids - 1] = 1.0
    return {**example, self.out: out}


# ---------------------------------------------------------------------------------------------
# Image values and geometry.
# ---------------------------------------------------------------------------------------------


@register("value_range")
class ValueRange:
  """uint8 ``[0, in_max]`` -> float32 ``[lo, hi]``: ``x * ((hi - lo) / in_max) + lo``
  (``[-1, 1]``: the two-tower input scaling)."""

  def __init__(self, lo: float = -1.0, hi: float = 1.0, key: str = "image",
               out: str | None = None, in_max: float = 255.0):
    if not hi > lo:
      raise ValueError(f"value_range needs hi > lo, got lo={lo}, hi={hi}")
    self.scale, self.lo = (float(hi) - float(lo)) / float(in_max), float(lo)
    self.key, self.out = key, out or key

  def __call__(self, example: Example, rng: Any) -> Example:
    x = np.asarray(example[self.key]).astype(np.float32)
    return {**example, self.out: x * self.scale + self.lo}


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (PIL, antialiased when shrinking); uint8 RGB(A)/gray in one PIL image, other
  channel counts and float images per channel (PIL mode ``L`` / ``F``)."""
  from PIL import Image

  bilinear = Image.Resampling.BILINEAR
  if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[-1] in (3, 4)):
    return np.asarray(Image.fromarray(image).resize((width, height), bilinear))
  planes = image[..., None] if image.ndim == 2 else image
  kind = np.uint8 if image.dtype == np.uint8 else np.float32
  out = np.stack([np.asarray(Image.fromarray(planes[..., c].astype(kind)).resize(
      (width, height), bilinear)) for c in range(planes.shape[-1])], axis=-1)
  out = out.astype(image.dtype)
  return out[..., 0] if image.ndim == 2 else out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel: ``floor((i + 0.5) n_in / n_out)`` (pixel centres)."""
  return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


@register("channels")
class Channels:
  """``key`` with ``num`` channels: RGB -> 1 by the ITU-R 601 luma weights, 1 -> 3 by
  repeating; images that have ``num`` already are unchanged (mixing gray and colour domains:
  MNIST -> USPS, digits -> SVHN)."""

  def __init__(self, num: int, key: str = "image"):
    if num not in (1, 3):
      raise ValueError(f"channels: num must be 1 or 3, got {num!r}")
    self.num, self.key = num, key

  def __call__(self, example: Example, rng: Any) -> Example:
    x = np.asarray(example[self.key])
    x = x[..., None] if x.ndim == 2 else x
    if x.shape[-1] == self.num:
      return {**example, self.key: x}
    if self.num == 3 and x.shape[-1] == 1:
      return {**example, self.key: np.repeat(x, 3, axis=-1)}
    if self.num == 1 and x.shape[-1] in (3, 4):
      gray = x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
      out = np.clip(np.rint(gray), 0, 255).astype(x.dtype) if x.dtype == np.uint8 else gray
      return {**example, self.key: out[..., None]}
    raise ValueError(f"channels({self.num}): cannot convert an image with {x.shape[-1]}")


@register("resize")
class Resize(_Spatial):
  """Resizes ``keys`` to ``size`` (int: ``size x size``; or ``(height, width)``): images
  bilinear (PIL, as the two-tower input always was), masks nearest-neighbour (each output
  pixel takes the label of the input pixel under its centre). Keys already that size are
  left as they are."""

  def __init__(self, size: int | Sequence[int], keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None):
    super().__init__(keys, masks)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
      raise ValueError(f"resize size must be a positive int or (height, width), got {size!r}")
    self.height, self.width = hw

  def __call__(self, example: Example, rng: Any) -> Example:
    out = dict(example)
    for k in self.keys:
      x = np.asarray(example[k])
      if x.shape[:2] == (self.height, self.width):
        continue
      if k in self.masks:
        rows, cols = _nearest_index(x.shape[0], self.height), _nearest_index(x.shape[1],
                                                                             self.width)
        out[k] = x[rows[:, None], cols[None, :]]
      else:
        out[k] = _resize_image(x, self.height, self.width)
    return out


@register("random_flip")
class RandomFlip(_Spatial):
  """With probability ``p`` (one draw ``rng.random() < p``) flips every key left-right."""

  def __init__(self, keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None, p: float = 0.5):
    super().__init__(keys, masks)
    self.p = float(p)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    if not rng.random() < self.p:
      return example
    return {**example, **{k: np.asarray(example[k])[:, ::-1].copy() for k in self.keys}}


@register("random_scale_crop")
class RandomScaleCrop(_Spatial):
  """The segmentation training crop of DeepLab / PSPNet / CCT: the longer side is resized to
  ``round(base_size * s)``, ``s ~ U(scale[0], scale[1])`` (aspect kept; images bilinear, masks
  nearest), then every key is padded at the bottom and right to at least ``crop x crop``
  (images with ``fill``, masks with ``mask_fill``: padding is not scored) and one random
  ``crop x crop`` window is cut from all keys. Draws: ``s``, then the window's ``y``, ``x``."""

  def __init__(self, crop: int, base_size: int, scale: Sequence[float] = (0.5, 2.0),
               keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None, fill: int = 0, mask_fill: int = 255):
    super().__init__(keys, masks)
    if not (isinstance(crop, int) and crop > 0 and isinstance(base_size, int)
            and base_size > 0):
      raise ValueError(f"random_scale_crop needs positive int crop and base_size, got "
                       f"{crop!r}, {base_size!r}")
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi:
      raise ValueError(f"random_scale_crop scale must be 0 < lo <= hi, got {scale!r}")
    self.crop, self.base_size, self.scale = crop, base_size, (lo, hi)
    self.fill, self.mask_fill = int(fill), int(mask_fill)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    h, w = self._size(example)
    long = round(self.base_size * rng.uniform(*self.scale))
    nh, nw = max(1, round(h * long / max(h, w))), max(1, round(w * long / max(h, w)))
    ph, pw = max(nh, self.crop), max(nw, self.crop)
    y0 = int(rng.integers(0, ph - self.crop + 1))
    x0 = int(rng.integers(0, pw - self.crop + 1))
    out = dict(example)
    for k in self.keys:
      x = np.asarray(example[k])
      if k in self.masks:
        x = x[_nearest_index(h, nh)[:, None], _nearest_index(w, nw)[None, :]]
      else:
        x = _resize_image(x, nh, nw)
      pad = [(0, ph - nh), (0, pw - nw)] + [(0, 0)] * (x.ndim - 2)
      x = np.pad(x, pad, constant_values=self.mask_fill if k in self.masks else self.fill)
      out[k] = x[y0:y0 + self.crop, x0:x0 + self.crop]
    return out


@register("random_translate")
class RandomTranslate(_Spatial):
  """Shifts every key by one random integer ``(dy, dx)``, uniform in ``[-p, p]`` per axis with
  ``p = round(max_fraction * size)`` (``augment.random_shift``: two draws), filling the edge by
  reflection (``augment.translate_reflect``; the pad-and-crop of CIFAR). A mask is reflected
  like the image, so every pixel, reflected ones included, keeps its own label."""

  def __init__(self, max_fraction: float = 0.125, keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None):
    super().__init__(keys, masks)
    if not 0.0 <= max_fraction <= 1.0:
      raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    self.max_fraction = float(max_fraction)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    dy, dx = augment.random_shift(*self._size(example), rng, self.max_fraction)
    if dy == 0 and dx == 0:
      return example
    return {**example, **{k: augment.translate_reflect(np.asarray(example[k]), dy, dx)
                          for k in self.keys}}


@register("weak")
class Weak(_Spatial):
  """FixMatch's weak augmentation (Sohn et al. 2020): ``random_flip`` (p = 0.5; ``flip=False``
  for digits) then ``random_translate(max_translate)``. On one image it equals
  ``augment.weak_augment(image, rng, flip=flip, max_translate=max_translate)`` bitwise, with
  the same draws."""

  def __init__(self, flip: bool = True, max_translate: float = 0.125,
               keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None):
    super().__init__(keys, masks)
    self.steps = ([RandomFlip(self.keys, self.masks)] if flip else []) + [
        RandomTranslate(max_translate, self.keys, self.masks)]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    for k in self.images:
      augment.check_image(np.asarray(example[k]))
    for step in self.steps:
      example = step(example, rng)
    return example


@register("strong")
class Strong(Weak):
  """FixMatch's strong augmentation (Sohn et al. 2020, Sec. 2.3): ``weak``, then RandAugment
  (``num_ops`` ops drawn from ``ops``, default all of ``augment.OPS``, each with a fresh
  magnitude), then Cutout of side ``U(0, cutout_max_fraction) * size`` filled with
  ``cutout_fill``. Exactly one image key; masks follow the geometric RandAugment ops
  (``augment.rand_augment_aligned``, ``mask_fill`` where the warp leaves the image) and are not
  cut out. On one image it equals ``augment.strong_augment`` bitwise, with the same draws."""

  def __init__(self, flip: bool = True, max_translate: float = 0.125, num_ops: int = 2,
               ops: Sequence[str] | None = None, cutout_max_fraction: float = 0.5,
               cutout_fill: int = augment.CUTOUT_GRAY, keys: str | Sequence[str] = ("image",),
               masks: str | Sequence[str] | None = None, mask_fill: int = 255):
    super().__init__(flip, max_translate, keys, masks)
    if len(self.images) != 1:
      raise ValueError(f"strong augments exactly one image (plus masks); keys {self.keys} "
                       f"hold images {list(self.images)}")
    self.ops = tuple(augment.OPS) if ops is None else _names(ops, "ops")
    bad = sorted(set(self.ops) - set(augment.OPS))
    if bad or not self.ops:
      raise ValueError(f"unknown RandAugment ops {bad}; known: {', '.join(augment.OPS)}")
    if not isinstance(num_ops, int) or num_ops < 0:
      raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
    self.num_ops, self.mask_fill = num_ops, int(mask_fill)
    self.cutout_max_fraction, self.cutout_fill = float(cutout_max_fraction), int(cutout_fill)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example = super().__call__(example, rng)
    (key,) = self.images
    image, masks = augment.rand_augment_aligned(
        np.asarray(example[key]), [np.asarray(example[m]) for m in self.masks], rng,
        num_ops=self.num_ops, ops=self.ops, mask_fill=self.mask_fill)
    image = augment.random_cutout(image, rng, self.cutout_max_fraction, fill=self.cutout_fill)
    return {**example, key: image, **dict(zip(self.masks, masks, strict=True))}


# ---------------------------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------------------------


def texts_of(value: Any) -> list[str]:
  """A caption field as a list of str: a str/bytes, a list of them, or ``{'text': [...]}``
  (e.g. coco_captions)."""
  if isinstance(value, Mapping):
    value = value["text"]
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


@register("sample_captions")
class SampleCaptions:
  """``out`` (default ``key``) = ``k`` captions of ``example[key]`` as a list of str: drawn at
  random (``rng.choice(n, k, replace=n < k)``: distinct unless the image has fewer than ``k``)
  or, with ``random=False``, the first ``k`` repeating from the start (eval)."""

  def __init__(self, k: int = 1, key: str = "captions", out: str | None = None,
               random: bool = True):
    if not isinstance(k, int) or k <= 0:
      raise ValueError(f"k must be a positive int, got {k!r}")
    self.k, self.key, self.out, self.random = k, key, out or key, random

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    texts = texts_of(example[self.key])
    if not texts:
      raise ValueError(f"sample_captions: example[{self.key!r}] holds no caption")
    if self.random:
      picks = rng.choice(len(texts), size=self.k, replace=len(texts) < self.k)
      chosen = [texts[i] for i in picks]
    else:
      chosen = (texts * self.k)[:self.k]
    return {**example, self.out: chosen}


@register("tokenize")
class Tokenize:
  """``out`` = the task's tokenizer's ids of ``example[key]``: int32 ``[max_len]`` for one text,
  ``[N, max_len]`` for a list (``bigvl.data.tokenizer.Tokenizer.encode``). ``bos`` / ``eos``
  (bool) add or omit those tokens, ``pad_id`` pads with another id; None keeps the
  tokenizer's choice. Truncation keeps BOS and EOS."""

  context = ("tokenizer",)

  def __init__(self, max_len: int, key: str = "captions", out: str = "tokens",
               bos: bool | None = None, eos: bool | None = None, pad_id: int | None = None,
               *, tokenizer: Any):
    if not isinstance(max_len, int) or max_len <= 0:
      raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    self.max_len, self.key, self.out = max_len, key, out
    self.bos, self.eos, self.pad_id, self.tokenizer = bos, eos, pad_id, tokenizer
    prefix, suffix = tokenizer.specials(bos=bos, eos=eos)  # refuses now, not inside grain
    if len(prefix) + len(suffix) >= max_len:
      raise ValueError(f"max_len={max_len} leaves no room for text after the special tokens")

  def __call__(self, example: Example, rng: Any) -> Example:
    value = example[self.key]
    single = isinstance(value, (str, bytes))
    ids = self.tokenizer.encode(texts_of(value), self.max_len, bos=self.bos, eos=self.eos,
                                pad_id=self.pad_id)
    return {**example, self.out: ids[0] if single else ids}


def _choices(value: str | Sequence[str] | None, what: str) -> tuple:
  if value is None or isinstance(value, str):
    return (value,)
  value = tuple(value)
  if not value or not all(v is None or isinstance(v, str) for v in value):
    raise ValueError(f"{what} must be a str or a non-empty list of str, got {value!r}")
  return value


@register("chat_encode")
class ChatEncode:
  """``out`` / ``mask_out`` (``tokens`` / ``loss_mask``, int32 ``[L]``, unpadded) = the task's
  chat template (context ``chat``, a ``bigvl.data.captioning.ChatEncoder``) around the answer
  ``example[answer_key]`` and the question ``question`` (a name of the templates file's
  ``questions`` or a text; None: the encoder's default), ``ChatEncoder.encode``: the loss
  mask is 1 on the answer and its EOS only. Several ``answer_key`` (with as many questions,
  or one for all) draw one per example (``rng.integers``); an answer that is a list of
  captions draws one of them (``rng.integers``), or, with ``random=False``, takes the first.
  A question ``'@<key>'`` is the example's own (``example[key]``: per-example questions, as
  VQA data has). Beyond ``max_len`` the answer is cut (and its EOS)."""

  context = ("chat",)

  def __init__(self, answer_key: str | Sequence[str] = "caption",
               question: str | Sequence[str] | None = None, max_len: int | None = None,
               out: str = "tokens", mask_out: str = "loss_mask", random: bool = True, *,
               chat: Any):
    self.keys = _choices(answer_key, "answer_key")
    questions = _choices(question, "question")
    if len(questions) == 1:
      questions = questions * len(self.keys)
    if len(questions) != len(self.keys) or None in self.keys:
      raise ValueError(f"chat_encode: {len(self.keys)} answer keys need 1 or as many "
                       f"questions, got {question!r}")
    if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
      raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    self.questions, self.max_len, self.chat = questions, max_len, chat
    self.out, self.mask_out, self.random = out, mask_out, random
    for q in set(questions):  # a prompt longer than max_len is refused now, not inside grain
      if isinstance(q, str) and q.startswith("@"):
        continue  # the example's own question: checked by ChatEncoder.encode
      if max_len is not None and len(chat.prompt_ids(q)) >= max_len:
        raise ValueError(f"max_len={max_len} leaves no room for an answer after the "
                         f"{len(chat.prompt_ids(q))}-token prompt of question {q!r}")

  def __call__(self, example: Example, rng: Any) -> Example:
    i = int(rng.integers(len(self.keys))) if len(self.keys) > 1 else 0
    answers = texts_of(example[self.keys[i]])
    if not answers:
      raise ValueError(f"chat_encode: example[{self.keys[i]!r}] holds no text")
    j = int(rng.integers(len(answers))) if len(answers) > 1 and self.random else 0
    question = self.questions[i]
    if isinstance(question, str) and question.startswith("@"):
      question = texts_of(example[question[1:]])[0]
    enc = self.chat.encode(answers[j], question, self.max_len)
    return {**example, self.out: enc["tokens"], self.mask_out: enc["loss_mask"]}


@register("chat_prompt")
class ChatPrompt:
  """``out`` / ``mask_out`` (``prompt`` / ``prompt_mask``, int32 ``[max_len]``) = the task's
  chat template's generation prompt for ``question`` (context ``chat``,
  ``ChatEncoder.prompt_row``), left-padded, mask 1 on its tokens. Deterministic."""

  context = ("chat",)

  def __init__(self, max_len: int, question: str | None = None, out: str = "prompt",
               mask_out: str = "prompt_mask", *, chat: Any):
    self.row = chat.prompt_row(question, max_len)  # the same for every example
    self.out, self.mask_out = out, mask_out

  def __call__(self, example: Example, rng: Any) -> Example:
    return {**example, self.out: self.row["prompt"].copy(),
            self.mask_out: self.row["prompt_mask"].copy()}


# ---------------------------------------------------------------------------------------------
# Several views of one example.
# ---------------------------------------------------------------------------------------------


@register("views")
class Views:
  """Runs each sub-pipeline (a list of op specs) on the same input example, one after the
  other with the same generator, and stacks their ``out`` keys: ``out[k] = stack([view_0[k],
  ..., view_{V-1}[k]])`` of shape ``[V, ...]``. Other keys are the input's; anything else the
  views made is dropped. E.g. FixMatch's unlabeled views
  ``views(['weak()'], ['strong()'], out='image')`` -> ``image: [2, H, W, C]``."""

  context = ("build", "where")

  def __init__(self, *pipelines: Any, out: str | Sequence[str] = ("image",),
               build: Callable[[Any, str], Transform], where: str):
    if not pipelines:
      raise ValueError("views needs at least one sub-pipeline (a list of op specs)")
    self.out = _names(out, "out")
    self.views = [build(p, f"{where}.views[{v}]") for v, p in enumerate(pipelines)]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    made = [view(example, rng) for view in self.views]
    return {**example, **{k: np.stack([m[k] for m in made]) for k in self.out}}
