"""Training metrics: a JSONL log, TensorBoard scalars, plots and digests.

`MetricsWriter` appends one JSON object per logged step to
`<workdir>/metrics.jsonl` (`{"step": 100, "loss": 0.69, ...}`; NaN and inf
are written as Python's json module writes them, NaN and Infinity, so that a
diverging run stays visible) and mirrors each value to TensorBoard under
`<workdir>/tensorboard`. Each line is flushed and fsynced, so after a crash
the log ends at most at a torn last line, which the writer and `read_metrics`
drop.

A resumed run calls `MetricsWriter.truncate_after(restored_step)` to forget
what was logged after its checkpoint; TensorBoard is told the same through
tensorboardX's `purge_step`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
from typing import Any, Mapping, Sequence, TYPE_CHECKING

from absl import logging
import jax
import numpy as np

from dro_fast import fileio

if TYPE_CHECKING:
  import tensorboardX  # pylint: disable=g-bad-import-order

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file.

  A torn last line (one without its newline: a write killed mid-way) is
  dropped with a warning.

  Args:
    path: the file MetricsWriter writes.

  Returns:
    One dict per logged step, in file order.

  Raises:
    ValueError: a line other than a torn last one is not JSON.
  """
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  # After the last newline: b"" for a complete file, else a torn write.
  if lines[-1]:
    logging.warning("ignoring a torn last line in %s: %r", path,
                    lines[-1][:80])
  records = []
  for number, line in enumerate(lines[:-1], start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number} is not a JSON object: {e}") from e
  return records


class MetricsWriter:
  """Appends per-step scalar metrics to metrics.jsonl and TensorBoard.

  Usage:
    with MetricsWriter(workdir) as writer:
      writer.truncate_after(restored_step)  # when resuming
      writer.write(step, {"loss": loss, "accuracy": acc})
  """

  def __init__(self, workdir: str):
    """Opens `<workdir>/metrics.jsonl` for appending (creating workdir).

    Args:
      workdir: the run's directory.
    """
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    self._logdir = os.path.join(workdir, TENSORBOARD_DIR)
    if os.path.exists(self._path):
      self._drop_torn_tail()
    self._file = open(self._path, "ab", buffering=0)
    # Created on the first write, so that truncate_after can pass purge_step.
    self._tensorboard: tensorboardX.SummaryWriter | None = None
    self._purge_step: int | None = None

  @property
  def path(self) -> str:
    return self._path

  def _drop_torn_tail(self) -> None:
    """Cuts a partial last line (a write killed mid-way) off the file."""
    with open(self._path, "rb") as f:
      data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
      logging.warning("dropping a torn last line from %s: %r", self._path,
                      data[keep:keep + 80])
      os.truncate(self._path, keep)

  def write(self, step: int,
            metrics: Mapping[str, float | np.ndarray | jax.Array]) -> None:
    """Logs one step's scalars, durably, to JSONL and TensorBoard.

    Args:
      step: the training step.
      metrics: name -> scalar (Python number, or one-element array).

    Raises:
      ValueError: a name is "step", or a value is not a scalar.
      fileio.WriteError: a write fault; the file ends with the last
        complete line.
    """
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step argument; rename "
                       "that metric")
    values = {}
    for name, value in metrics.items():
      try:
        values[name] = float(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"metric {name!r} at step {step} is not a scalar: "
                         f"{e}") from e
    line = (json.dumps({"step": int(step), **values}) + "\n").encode()
    size = os.fstat(self._file.fileno()).st_size   # (appends ignore tell())
    try:
      view = memoryview(line)   # unbuffered: a short write goes on
      while view:
        view = view[self._file.write(view):]
      os.fsync(self._file.fileno())
    except OSError as e:
      # A full disk: cut the part written off (truncating needs no space),
      # so the file ends with the last complete line.
      os.truncate(self._path, size)
      fault = fileio.as_write_error(self._path, e)
      if fault is None:
        raise
      raise fault from e

    if self._tensorboard is None:
      # Imported here: tensorboardX imports torch (seconds), a cost a run
      # stopped by a bad input should not pay.
      import tensorboardX  # pylint: disable=g-import-not-at-top,redefined-outer-name
      # tensorboardX names event files by the second and opens them with
      # "wb": the suffix keeps a writer opened in the same second (a quick
      # restart, truncate_after) from clobbering the previous file.
      self._tensorboard = tensorboardX.SummaryWriter(
          logdir=self._logdir, purge_step=self._purge_step,
          filename_suffix=f".{time.time_ns()}")
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, global_step=int(step))

  def truncate_after(self, step: int) -> None:
    """Forgets everything logged after `step` (for resuming from it).

    Rewrites metrics.jsonl atomically with only the records whose step is
    <= `step`, and makes TensorBoard discard its later events.

    Args:
      step: the step of the checkpoint the run resumes from.
    """
    self._file.close()
    try:
      records = read_metrics(self._path)
      kept = [r for r in records if r["step"] <= step]
      fileio.atomic_write(self._path, lambda f: f.write(
          b"".join(json.dumps(r).encode() + b"\n" for r in kept)))
    finally:
      self._file = open(self._path, "ab", buffering=0)
    if len(kept) < len(records):
      logging.info("dropped %d metric records after step %d from %s",
                   len(records) - len(kept), step, self._path)
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    self._purge_step = step + 1

  def close(self) -> None:
    """Flushes and closes the JSONL file and the TensorBoard writer.

    TensorBoard events that cannot be written (a full disk) are dropped with
    a warning: metrics.jsonl holds every logged step.
    """
    self._file.close()
    writer, self._tensorboard = self._tensorboard, None
    if writer is None:
      return
    try:
      writer.close()
    except OSError as e:
      # tensorboardX's exit hook would retry the failed flush and its worker
      # thread would fail on a closed queue: mark its writer closed and stop
      # the thread, leaving the unwritten events behind.
      events = writer.file_writer.event_writer
      events._closed = True  # pylint: disable=protected-access
      events._worker.stop()  # pylint: disable=protected-access
      logging.warning("TensorBoard events not all written to %s: %s",
                      self._logdir, e)

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plot_curves(metrics_path: str, png_path: str,
                keys: Sequence[str] | None = None) -> None:
  """Plots metrics against step, one subplot per metric, to a PNG.

  Uses matplotlib's Agg canvas directly (no pyplot), so the caller's
  matplotlib backend is left alone. The PNG is written atomically.

  Args:
    metrics_path: a metrics.jsonl file.
    png_path: where to write the PNG.
    keys: the metrics to plot; by default every numeric key except "step",
      in order of first appearance. Non-finite values are left out.

  Raises:
    ValueError: no metric to plot, or a requested key never logged.
  """
  records = read_metrics(metrics_path)
  if keys is None:
    keys = list(dict.fromkeys(
        k for r in records for k, v in r.items()
        if k != "step" and _is_number(v)))
  else:
    logged = {k for r in records for k in r}
    missing = [k for k in keys if k not in logged]
    if missing:
      raise ValueError(f"metrics {missing} are not in {metrics_path}")
  if not keys:
    raise ValueError(f"no numeric metrics to plot in {metrics_path}")

  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(6.0, 2.2 * len(keys)), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
  for ax, key in zip(axes, keys):
    points = [(r["step"], r[key]) for r in records
              if _is_number(r.get(key)) and math.isfinite(r[key])]
    ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.0)
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
  axes[-1].set_xlabel("step")
  fileio.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))


def params_digest(params: Any) -> str:
  """SHA-256 of a pytree of arrays: paths, dtypes, shapes and values.

  Deterministic across runs, processes and dict insertion orders: leaves
  are visited in the order of their key-path strings, and each field (path,
  dtype, shape, C-order bytes) is length-prefixed so that field boundaries
  are unambiguous.

  Args:
    params: a pytree of arrays (jax or numpy) or numbers.

  Returns:
    The hex digest.
  """
  digest = hashlib.sha256()

  def update(data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)

  leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf
            in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, leaf in sorted(leaves, key=lambda item: item[0]):
    array = np.ascontiguousarray(np.asarray(leaf))
    update(path.encode())
    update(str(array.dtype).encode())
    update(repr(array.shape).encode())
    update(array.tobytes())
  return digest.hexdigest()
