"""Training checkpoints: verified, atomic saves and restores that fall back.

A thin wrapper over Orbax's CheckpointManager. Each checkpoint is one step
directory holding named pytree items and a JSON item, written together under
Orbax's commit protocol:

  <directory>/<step>/<item>  one pytree per item name given to Checkpointer
                             (Orbax's OCDBT/TensorStore array format); the
                             trainer saves "policy" (the policy parameters)
                             and "train_state" (everything else), so the
                             policy restores alone
  <directory>/<step>/extra   a small JSON dict (data-iterator state)

`restore` reads the items its templates name and nothing else.

Atomicity is Orbax's. A save is written into a temporary directory named
`<step>.orbax-checkpoint-tmp-<timestamp>` and renamed to `<step>` only once
every item is complete (on object stores, where there is no rename, a
`commit_success.txt` file marks the finished step instead). Orbax lists only
finalised steps, so a save killed half-way leaves a temporary directory that
`all_steps`, `latest_step` and `restore` never see. A Checkpointer does not
delete leftover temporary directories by itself: another process (an
evaluator, say) may be reading or writing the same directory. The trainer,
once it holds its workdir's lock, removes them (`remove_unfinished`); and a
save that hits a write fault (a full disk) removes its own unfinished step,
to give the space back, and raises fileio.WriteError.

PRNG keys. Typed key arrays (`jax.random.key`) are saved as their raw uint32
key data (`jax.random.key_data`) and rebuilt on restore with
`jax.random.wrap_key_data`, using the implementation of the matching leaf of
the restore template; raw uint32 keys (`jax.random.PRNGKey`) are ordinary
arrays. Typed keys in a template must therefore be concrete key arrays (any
value of the right shape and implementation), not `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dro_fast import fileio

PyTree = Any

_EXTRA = "extra"

# How much of an Orbax/TensorStore error message a log line or error keeps.
_MAX_REASON_CHARS = 300


class _WriteFaultRecords(std_logging.Filter):
  """Drops Orbax's ERROR records of a write fault (a full disk).

  Orbax logs one traceback per background thread, while the fault reaches
  the caller as one fileio.WriteError.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return fileio.as_write_error("", error or ValueError(
        record.getMessage())) is None


# What Orbax names a step's folder while it is being written.
_UNFINISHED = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")

# When an Orbax read fails, TensorStore's threads still complete the reads
# in flight: each prints a traceback ("Event loop is closed": their callbacks
# reach an asyncio loop Orbax has closed), and asyncio logs each task's
# error; hundreds of lines that say nothing the read's own error does not.
# A failed read waits until that output settles (up to the limit).
_SETTLE_S, _SETTLE_LIMIT_S = 0.1, 3.0


def remove_unfinished(directory: str) -> list[str]:
  """Deletes the unfinished step folders in `directory`; returns their names.

  A save cut short (a kill, a second Ctrl-C, a crash) leaves
  `<step>.orbax-checkpoint-tmp-*`, which no restore reads. Call it only
  where no other process can be saving into `directory` (the trainer holds
  its workdir's lock).
  """
  try:
    names = sorted(os.listdir(directory))
  except FileNotFoundError:
    return []
  removed = [name for name in names if _UNFINISHED.fullmatch(name)]
  for name in removed:
    logging.warning("removing %s: a checkpoint save that never finished",
                    os.path.join(directory, name))
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return removed


@contextlib.contextmanager
def _stderr_dropped_on_failure() -> Iterator[None]:
  """Holds back the process's stderr (file descriptor 2) meanwhile.

  What was held is written out when the body succeeds, and dropped, once it
  has settled, when the body raises.
  """
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:                 # no file descriptor 2: nothing to hold
    yield
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      if failed:
        size, waited = -1, 0.0
        while size != os.fstat(held.fileno()).st_size and (
            waited < _SETTLE_LIMIT_S):
          size = os.fstat(held.fileno()).st_size
          time.sleep(_SETTLE_S)
          waited += _SETTLE_S
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        text = held.read().decode("utf-8", errors="replace")
        if text:
          sys.stderr.write(text)
          sys.stderr.flush()


class CorruptCheckpointError(RuntimeError):
  """No checkpoint that was asked for could be read; the message says why."""


class TemplateMismatchError(ValueError):
  """A restore template unlike the saved state; the message lists how.

  Its leaves, shapes or dtypes differ from the checkpoint's.
  """


def _describe(error: Exception) -> str:
  """One short line for a read error, without TensorStore's spec dump."""
  text = str(error)
  for noise in (" [tensorstore_spec=", " See full TensorStore details"):
    text = text.split(noise)[0]
  lines = text.splitlines()
  text = lines[0] if lines else ""
  return f"{type(error).__name__}: {text[:_MAX_REASON_CHARS]}"


def _is_prng_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


def _keys_to_data(tree: PyTree) -> PyTree:
  """Replaces typed PRNG key leaves with their raw uint32 key data."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_prng_key(x) else x, tree)


def _non_finite_paths(state: PyTree) -> list[str]:
  """Paths of the floating (or complex) leaves holding a NaN or an inf."""
  paths, device_leaves, device_paths = [], [], []
  host_ok = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if _is_prng_key(leaf) or not jnp.issubdtype(jnp.result_type(leaf),
                                                jnp.inexact):
      continue
    name = jax.tree_util.keystr(path)
    paths.append(name)
    if isinstance(leaf, jax.Array):
      device_paths.append(name)
      device_leaves.append(leaf)
    else:
      host_ok[name] = bool(np.all(np.isfinite(leaf)))
  if device_leaves:
    # One program reduces every device array (a copy of only the flags to
    # the host): a computation per leaf would put hundreds of small
    # programs, each with its own collectives when sharded, in flight.
    flags = jax.device_get(_all_finite(device_leaves))
    host_ok.update(zip(device_paths, (bool(f) for f in flags)))
  return [p for p in paths if not host_ok[p]]


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def _shape_and_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  array = np.asarray(leaf)
  return array.shape, array.dtype


def newest_step_name(directory: str) -> int:
  """The highest step folder name in `directory`; 0 when none or absent.

  Read without creating anything; whether that step is readable is
  Checkpointer.restore's question.
  """
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return 0
  return max((int(n) for n in names if n.isdigit()), default=0)


class Checkpointer:
  """Saves and restores checkpoints of named pytree items by step.

  Usage:
    checkpointer = Checkpointer(workdir + "/checkpoints", ("state",), keep=3)
    if checkpointer.latest_step() is not None:
      items, extra, step = checkpointer.restore({"state": state})
    ...
    checkpointer.save(step, {"state": state}, {"data": iterator_state})
  """

  def __init__(self, directory: str, items: Sequence[str] = ("state",),
               keep: int = 3, async_save: bool = False):
    """Opens (creating it if needed) a checkpoint directory.

    Args:
      directory: where the step directories live.
      items: the names of the pytree items every checkpoint holds.
      keep: how many of the newest checkpoints to keep; older ones are
        deleted after each save.
      async_save: `save` returns once the arrays are copied to the host and
        writes them in the background (Orbax's asynchronous saving; a save
        waits for the one before it); call `wait` before relying on the
        newest checkpoint, and before exiting.
    """
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    if not items or _EXTRA in items:
      raise ValueError(f"items must be names other than {_EXTRA!r}, got "
                       f"{items!r}")
    # Until close(), Orbax's ERROR records of a write fault are dropped from
    # absl's logger (Orbax logs through it): one traceback per background
    # thread, where the caller gets one WriteError.
    self._fault_records = _WriteFaultRecords()
    std_logging.getLogger("absl").addFilter(self._fault_records)
    self._directory = os.path.abspath(os.fspath(directory))
    self._items = tuple(items)
    self._async = async_save
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    handlers[_EXTRA] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save),
        item_handlers=handlers)
    # Steps that `restore` found unreadable and skipped; `save` may replace
    # them (see there).
    self._unreadable_steps: set[int] = set()

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of the finalised checkpoints, ascending."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalised step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, items: Mapping[str, PyTree],
           extra: dict[str, Any]) -> None:
    """Writes one checkpoint; returns once it is committed.

    With async_save it returns once the arrays are on the host (see
    `wait`).

    Nothing is written when an item holds a NaN or an inf, or when `extra`
    is not JSON-serialisable.

    A step at or below an existing checkpoint's is refused, unless every such
    checkpoint is one `restore` skipped as unreadable: after falling back to
    an older checkpoint, training reaches those steps again and their
    damaged checkpoints are deleted (with a warning) to make way.

    Args:
      step: the training step; must be newer than every readable checkpoint.
      items: a pytree of arrays (jax, numpy, typed or raw PRNG keys) for
        every item name of this Checkpointer.
      extra: a JSON-serialisable dict saved in the same checkpoint.

    Raises:
      TypeError: `extra` is not a dict.
      ValueError: other item names than the Checkpointer's, non-finite
        values, an `extra` that is not strict JSON (NaN and inf included),
        or a step that is not newer than the readable checkpoints.
      fileio.WriteError: a write fault (a full disk); the unfinished step
        is removed and the previous checkpoints are intact.
    """
    if set(items) != set(self._items):
      raise ValueError(f"save takes the items {sorted(self._items)}, got "
                       f"{sorted(items)}")
    if not isinstance(extra, dict):
      raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"extra for step {step} is not JSON-serialisable: {e}") from e
    bad = [f"{name}{path}" for name, tree in items.items()
           for path in _non_finite_paths(tree)]
    if bad:
      raise ValueError(f"refusing to checkpoint non-finite values at step "
                       f"{step}: {', '.join(bad)}. Training diverged: lower "
                       "the learning rate or clip the gradients.")

    existing = [s for s in self.all_steps() if s >= step]
    if any(s not in self._unreadable_steps for s in existing):
      raise ValueError(
          f"cannot save step {step} in {self._directory}: it already holds "
          f"checkpoints at steps {existing}. Resume from the latest one, or "
          "delete the newer checkpoints to branch from an older step.")
    for s in existing:
      logging.warning("deleting unreadable checkpoint %d in %s to save step "
                      "%d", s, self._directory, step)
      self._manager.delete(s)
      self._unreadable_steps.discard(s)

    args = {name: ocp.args.StandardSave(_keys_to_data(tree))
            for name, tree in items.items()}
    # With async_save, the previous save's write fault surfaces here: the
    # message then names the folder, not this step.
    with self._write_faults(self._directory if self._async else
                            os.path.join(self._directory, str(step))):
      saved = self._manager.save(
          step, force=True, args=ocp.args.Composite(
              **args, **{_EXTRA: ocp.args.JsonSave(extra)}))
      if not self._async:
        self._manager.wait_until_finished()
    if not saved:
      raise RuntimeError(f"orbax skipped saving step {step} in "
                         f"{self._directory}")

  def restore(
      self, templates: Mapping[str, PyTree], step: int | None = None
  ) -> tuple[dict[str, PyTree], dict[str, Any], int]:
    """Reads the named items of a checkpoint into their templates' form.

    Only the items named in `templates` are read: a policy restores without
    the optimizer states beside it. Without `step`, reads the newest
    checkpoint; one that cannot be read (files missing or truncated,
    metadata garbled) is logged as a warning and the next older one is
    tried. Orbax does not checksum array data, so a flipped bit inside an
    array chunk is not detected.

    Args:
      templates: item name -> a pytree like the saved one (e.g. freshly
        initialised, or jax.eval_shape's); its values are not used, except
        to give the key implementation of typed PRNG key leaves.
      step: the step to read; None for the newest readable one.

    Returns:
      (items, extra, step): the restored items (the saved arrays, bitwise,
      in the templates' structure), the saved extra dict, and its step.

    Raises:
      FileNotFoundError: no checkpoint (or none at `step`) in the directory.
      TemplateMismatchError: a template's leaves, shapes or dtypes differ
        from the checkpoint's.
      CorruptCheckpointError: no candidate checkpoint could be read.
    """
    unknown = set(templates) - set(self._items)
    if unknown:
      raise ValueError(f"no items {sorted(unknown)} in these checkpoints; "
                       f"they hold {sorted(self._items)}")
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {self._directory}")
    if step is None:
      candidates = steps[::-1]
    elif step in steps:
      candidates = [step]
    else:
      raise FileNotFoundError(f"no checkpoint for step {step} in "
                              f"{self._directory}; it has steps {steps}")

    failures = []
    for candidate in candidates:
      try:
        # The reason is logged below, without the reads' noise.
        with _stderr_dropped_on_failure():
          result = self._read(candidate, templates)
      except TemplateMismatchError:
        raise  # The caller's error, the same for every checkpoint.
      # A damaged checkpoint fails in many ways: FileNotFoundError, JSON
      # errors, TensorStore's ValueErrors (OUT_OF_RANGE, DATA_LOSS), and the
      # bare Exception Orbax raises when an array read fails.
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append((candidate, e))
        logging.warning("checkpoint %s is unreadable (%s)%s",
                        os.path.join(self._directory, str(candidate)),
                        _describe(e), "; falling back to the previous one"
                        if candidate != candidates[-1] else "")
      else:
        self._unreadable_steps.update(s for s, _ in failures)
        return result

    reasons = "; ".join(f"step {s}: {_describe(e)}" for s, e in failures)
    raise CorruptCheckpointError(
        f"no readable checkpoint in {self._directory} (tried steps "
        f"{candidates}): {reasons}") from failures[0][1]

  def _read(self, step: int, templates: Mapping[str, PyTree]
            ) -> tuple[dict[str, PyTree], dict[str, Any], int]:
    """Reads the items the templates name, checked against the metadata.

    The templates are checked against checkpoint `step`'s metadata first.
    """
    storable = {name: _keys_to_data(t) for name, t in templates.items()}
    metadata = self._manager.item_metadata(step)
    for name, template in storable.items():
      if metadata[name] is None:
        raise FileNotFoundError(f"no {name} metadata in "
                                f"{os.path.join(self._directory, str(step))}")
      self._check_template(template, ocp.tree.to_flat_dict(
          metadata[name].tree, sep="."), step, name)
    args = {name: ocp.args.StandardRestore(t) for name, t in storable.items()}
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            **args, **{_EXTRA: ocp.args.JsonRestore()}))
    items = {name: jax.tree.map(
        lambda t, x: (jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
                      if _is_prng_key(t) else x), template, restored[name])
             for name, template in templates.items()}
    return items, restored[_EXTRA], step

  def _check_template(self, template: PyTree, saved: dict[str, Any],
                      step: int, name: str) -> None:
    """Raises TemplateMismatchError unless `template` has the saved arrays.

    Orbax would silently cast a leaf to the template's dtype; this makes a
    mismatch an error instead, so that a restore is always bitwise.
    """
    wanted = ocp.tree.to_flat_dict(template, sep=".")
    problems = [f"{path}: missing from the checkpoint"
                for path in sorted(wanted.keys() - saved.keys())]
    problems += [f"{path}: in the checkpoint but not in the template"
                 for path in sorted(saved.keys() - wanted.keys())]
    for path in sorted(wanted.keys() & saved.keys()):
      shape, dtype = _shape_and_dtype(wanted[path])
      saved_shape, saved_dtype = tuple(saved[path].shape), np.dtype(
          saved[path].dtype)
      if (shape, dtype) != (saved_shape, saved_dtype):
        problems.append(f"{path}: template {dtype}{list(shape)}, checkpoint "
                        f"{saved_dtype}{list(saved_shape)}")
    if problems:
      raise TemplateMismatchError(
          f"restore template does not match the {name} of checkpoint {step} "
          f"in {self._directory}: " + "; ".join(problems))

  def wait(self) -> None:
    """Returns once every save has been committed (no-op without async).

    Raises:
      fileio.WriteError: a background save hit a write fault.
    """
    with self._write_faults(self._directory):
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _write_faults(self, path: str) -> Iterator[None]:
    """Turns a write fault of Orbax into a fileio.WriteError naming `path`.

    The unfinished steps (never read) are removed first, to give back the
    space.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      fault = fileio.as_write_error(path, e)
      if fault is None:
        raise
      committed = max(self.all_steps(), default=-1)
      for name in os.listdir(self._directory):
        step, tmp, _ = name.partition(".orbax-checkpoint-tmp")
        if tmp and step.isdigit() and int(step) > committed:
          shutil.rmtree(os.path.join(self._directory, name),
                        ignore_errors=True)
      raise fault from e

  def close(self) -> None:
    """Waits for a background save, then releases Orbax's resources.

    The object is unusable afterwards.
    """
    try:
      self._manager.close()
    finally:
      std_logging.getLogger("absl").removeFilter(self._fault_records)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
