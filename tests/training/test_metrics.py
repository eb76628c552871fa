"""MetricsWriter's JSONL and TensorBoard output, plots and params digests."""

from __future__ import annotations

import json
import pathlib
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast.training import metrics
from tensorboardX.proto import event_pb2

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tensorboard_events(workdir: pathlib.Path) -> list[event_pb2.Event]:
  """Every event in workdir/tensorboard, files in name (= time) order.

  Event files are TFRecords: u64 length, u32 CRC, payload, u32 CRC.
  """
  events = []
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _scalar_steps(events, tag: str) -> list[int]:
  return [e.step for e in events for v in e.summary.value if v.tag == tag]


def _write_steps(workdir, steps):
  with metrics.MetricsWriter(str(workdir)) as writer:
    for step in steps:
      writer.write(step, {"loss": np.float32(1.0 / (step + 1)),
                          "accuracy": jnp.asarray(0.5 + step / 100),
                          "tokens": step * 8})


def test_writer_appends_parseable_jsonl_and_tensorboard_events(tmp_path):
  _write_steps(tmp_path, [0, 1, 2])
  _write_steps(tmp_path, [3])  # A second writer appends.

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["step"] for r in records] == [0, 1, 2, 3]
  assert records[2] == {"step": 2, "loss": float(np.float32(1 / 3)),
                        "accuracy": float(jnp.asarray(0.52)),
                        "tokens": 16.0}
  assert metrics.read_metrics(str(tmp_path / "metrics.jsonl")) == records
  events = _tensorboard_events(tmp_path)
  # Both writers' events survive, though opened within the same second.
  assert _scalar_steps(events, "loss") == [0, 1, 2, 3]
  assert _scalar_steps(events, "tokens") == [0, 1, 2, 3]


def test_writer_rejects_non_scalars_and_the_step_key(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'loss' at step 3 is not a scalar"):
      writer.write(3, {"loss": np.ones(2)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(3, {"step": 1.0})
  assert metrics.read_metrics(str(tmp_path / "metrics.jsonl")) == []


def test_truncate_after_keeps_steps_up_to_the_checkpoint(tmp_path):
  _write_steps(tmp_path, [0, 10, 20, 30])
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.truncate_after(20)
    writer.write(30, {"loss": 7.0})
  records = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [0, 10, 20, 30]
  assert records[-1] == {"step": 30, "loss": 7.0}
  # No temporary file is left beside it.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl",
                                                        "tensorboard"]
  # TensorBoard is told to hide the old events from step 21 on: a
  # SessionLog.START at the purge step, before the rewritten step 30.
  events = _tensorboard_events(tmp_path)
  starts = [i for i, e in enumerate(events)
            if e.session_log.status == event_pb2.SessionLog.START]
  assert [events[i].step for i in starts] == [21]
  assert _scalar_steps(events[starts[0]:], "loss") == [30]


def test_torn_last_line_is_dropped(tmp_path):
  _write_steps(tmp_path, [0, 1])
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo')  # A write killed mid-way.
  assert [r["step"] for r in metrics.read_metrics(
      str(tmp_path / "metrics.jsonl"))] == [0, 1]
  _write_steps(tmp_path, [2])
  assert [r["step"] for r in metrics.read_metrics(
      str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]


def _write_run(workdir, steps):
  """A DRO-V-like log: moving metrics, a constant one and the counters."""
  with metrics.MetricsWriter(str(workdir)) as writer:
    for step in steps:
      writer.write(step, {"loss": 1.0 / step, "policy_grad_norm": 10.0 + step,
                          "value_grad_norm": 1.0, "policy_lr": 1e-4,
                          "value_lr": 1e-4 * step, "examples_per_s": 7.0 * step,
                          "accuracy": float("nan") if step == 2 else 0.5 * step,
                          "skipped_update": float(step == 3),
                          "consecutive_bad_steps": float(step == 3)})


def test_plot_curves_draws_the_moving_metrics_in_a_grid(tmp_path):
  _write_run(tmp_path, [1, 2, 3, 4])
  png = tmp_path / "curves.png"
  plotted = metrics.plot_curves(str(tmp_path / "metrics.jsonl"), str(png))
  # Grouped panels in their order, then the others; constants (value's grad
  # norm, policy's lr) and the counters (moving here) are left out.
  assert plotted == ["loss", "policy_grad_norm", "value_lr",
                     "examples_per_s", "accuracy"]
  data = png.read_bytes()
  assert data.startswith(_PNG_SIGNATURE) and len(data) > 1000
  width, height = struct.unpack(">II", data[16:24])  # The IHDR chunk.
  assert (width, height) == (3 * 420, 2 * 260)  # 5 panels: 3 columns, 2 rows.


def test_plot_curves_given_keys_and_a_single_record(tmp_path):
  _write_run(tmp_path, [1, 2])
  path = str(tmp_path / "metrics.jsonl")
  png = str(tmp_path / "curves.png")
  assert metrics.plot_curves(path, png, ["value_lr", "policy_lr",
                                         "skipped_update"]) == [
                                             "policy_lr", "value_lr",
                                             "skipped_update"]
  with pytest.raises(ValueError, match="'perplexity'"):
    metrics.plot_curves(path, png, ["perplexity"])
  # One logged step: nothing changes, so every metric but the counters.
  _write_run(tmp_path / "once", [2])
  assert metrics.plot_curves(str(tmp_path / "once" / "metrics.jsonl"),
                             png) == ["loss", "policy_grad_norm",
                                      "value_grad_norm", "policy_lr",
                                      "value_lr", "examples_per_s"]


def _params(values):
  return {"encoder": {"kernel": np.asarray(values, np.float32).reshape(2, 2),
                      "bias": jnp.zeros(3, jnp.bfloat16)},
          "step": np.int32(4)}


def test_params_digest():
  values = [0.1, -2.0, 3.5, 1e-3]
  digest = metrics.params_digest(_params(values))
  assert re.fullmatch("[0-9a-f]{64}", digest), digest
  assert metrics.params_digest(_params(list(values))) == digest

  one_ulp = np.asarray(values, np.float32)
  one_ulp[2] = np.nextafter(one_ulp[2], np.float32(np.inf))
  assert metrics.params_digest(_params(one_ulp)) != digest

  reordered = {"step": np.int32(4),
               "encoder": {"bias": jnp.zeros(3, jnp.bfloat16),
                           "kernel": np.asarray(values, np.float32).reshape(
                               2, 2)}}
  assert metrics.params_digest(reordered) == digest

  # Dtype and shape are part of the digest, not only the bytes.
  recast = _params(values)
  recast["step"] = np.uint32(4)
  assert metrics.params_digest(recast) != digest
  reshaped = _params(values)
  reshaped["encoder"]["kernel"] = reshaped["encoder"]["kernel"].reshape(4)
  assert metrics.params_digest(reshaped) != digest
