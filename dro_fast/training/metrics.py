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

import dataclasses
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


# Metrics plot_curves leaves out by name: the step, and the counters of
# skipped updates (0 in a healthy run; metrics.jsonl keeps them).
_COUNTERS = frozenset({"step", "skipped_update", "consecutive_bad_steps"})
_COLUMNS = 3


@dataclasses.dataclass(frozen=True)
class _Panel:
  """One subplot of plot_curves: metrics that share a y-axis.

  Attributes:
    title: what the panel shows, with its unit where it has one.
    members: (metric, legend label) pairs.
    log_scale: a logarithmic y-axis where the values are positive and span
      a decade or more (the first throughput window includes compilation;
      the two gradient norms differ in scale).
  """
  title: str
  members: tuple[tuple[str, str], ...]
  log_scale: bool = False


# The metrics the trainer logs, grouped in reading order; a metric not named
# here gets a panel of its own, titled by its name.
_PANELS = (
    _Panel("loss", (("loss", "loss"),)),
    _Panel(r"reward $r$ and residual $\delta$",
           (("reward_mean", r"mean $r$"), ("residual_mean", r"mean $\delta$"),
            ("residual_std", r"std $\delta$"))),
    _Panel(r"$\log\pi - \log\pi_{\mathrm{ref}}$ (nats)",
           (("log_ratio_mean", "mean"), ("log_ratio_std", "std"))),
    _Panel(r"value $V(x)$", (("value_mean", "mean"),)),
    _Panel(r"gradient norm $\|g\|_2$",
           (("policy_grad_norm", "policy"), ("value_grad_norm", "value")),
           log_scale=True),
    _Panel("learning rate", (("policy_lr", "policy"), ("value_lr", "value"))),
    _Panel("examples/s", (("examples_per_s", "examples/s"),), log_scale=True),
    _Panel("tokens/s", (("tokens_per_s", "tokens/s"),), log_scale=True),
)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _series(records: Sequence[Mapping[str, Any]],
            key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, its non-finite values left out."""
  points = [(r["step"], r[key]) for r in records
            if _is_number(r.get(key)) and math.isfinite(r[key])]
  return [s for s, _ in points], [float(v) for _, v in points]


def _panels(keys: Sequence[str]) -> list[_Panel]:
  """The panels of `keys`: the _PANELS groups first, then one per other key."""
  chosen = set(keys)
  panels = []
  for panel in _PANELS:
    members = tuple(m for m in panel.members if m[0] in chosen)
    if members:
      panels.append(dataclasses.replace(panel, members=members))
  grouped = {key for panel in panels for key, _ in panel.members}
  return panels + [_Panel(key, ((key, key),))
                   for key in keys if key not in grouped]


def plot_curves(metrics_path: str, png_path: str,
                keys: Sequence[str] | None = None) -> list[str]:
  """Plots the metrics that move against step, in a grid of panels, to a PNG.

  Related metrics share a panel (the policy's and the value's gradient
  norms, say), at most three panels a row. By default the counters of
  skipped updates and every metric whose value never changes (a constant
  learning rate) are left out; when no metric changes (a run that logged
  once), every metric but the counters is drawn.

  Uses matplotlib's Agg canvas directly (no pyplot), so the caller's
  matplotlib backend is left alone. The PNG is written atomically.

  Args:
    metrics_path: a metrics.jsonl file.
    png_path: where to write the PNG.
    keys: the metrics to plot, moving or not; by default those described
      above. Non-finite values are left out (a metric with no finite value
      is not plotted by default).

  Returns:
    The metrics plotted, in the order of the panels.

  Raises:
    ValueError: no metric to plot, or a requested key never logged.
  """
  records = read_metrics(metrics_path)
  if keys is None:
    logged = [k for k in dict.fromkeys(
        k for r in records for k, v in r.items()
        if k not in _COUNTERS and _is_number(v)) if _series(records, k)[1]]
    keys = [k for k in logged if len(set(_series(records, k)[1])) > 1]
    keys = keys or logged
  else:
    logged = {k for r in records for k in r}
    missing = [k for k in keys if k not in logged]
    if missing:
      raise ValueError(f"metrics {missing} are not in {metrics_path}")
  if not keys:
    raise ValueError(f"no numeric metrics to plot in {metrics_path}")
  panels = _panels(keys)

  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  columns = min(_COLUMNS, len(panels))
  rows = -(-len(panels) // columns)
  fig = figure.Figure(figsize=(4.2 * columns, 2.6 * rows),
                      layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  grid = fig.subplots(rows, columns, sharex=True, squeeze=False)
  for ax in grid.flat[len(panels):]:
    ax.remove()
  for ax, panel in zip(grid.flat, panels):
    drawn = []
    for (key, label), style in zip(panel.members, ("-", "--", ":")):
      steps, values = _series(records, key)
      ax.plot(steps, values, style, linewidth=1.2, label=label,
              marker="o" if len(steps) == 1 else None)
      drawn += values
    if panel.log_scale and drawn and min(drawn) > 0 and (
        max(drawn) >= 10 * min(drawn)):
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(ticker.LogFormatter())   # 100, not 10²
      ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    if len(panel.members) > 1:
      ax.legend(fontsize=8)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for column in range(columns):
    # The lowest panel of each column shows the steps (sharex hides them on
    # the panels above, and a short last row leaves some columns higher).
    bottom = grid[(len(panels) - 1 - column) // columns, column]
    bottom.xaxis.set_tick_params(labelbottom=True)
    bottom.set_xlabel("step")
  fileio.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
  return [key for panel in panels for key, _ in panel.members]


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
