"""Checkpointer: bitwise round trips, retention, fallback past damaged steps."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_fast.training import checkpointing

# When a read of a damaged checkpoint fails, Orbax's other in-flight reads
# may later complete on a closed event loop; Python reports that whenever
# they are garbage-collected, i.e. in whichever test runs then.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int) -> dict:
  """A realistic train state: params, Adafactor state, step and a typed key.

  The [24, 40] kernel is big enough (3.8 KB) that OCDBT stores it in a data
  file of its own rather than inline in a b-tree node.
  """
  rng = np.random.default_rng(seed)
  params = {
      "encoder": {"kernel": jnp.asarray(rng.normal(size=(24, 40)),
                                        jnp.float32),
                  "scale": jnp.asarray(rng.normal(size=(40,)), jnp.bfloat16)},
      "head": {"bias": rng.normal(size=(3,)).astype(np.float32)},
  }
  opt_state = optax.adafactor(1e-3).init(params)
  # Non-zero optimizer statistics, so that a round trip that zeroed them
  # would fail.
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * (seed + 1), params)
  _, opt_state = optax.adafactor(1e-3).update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state,
          "step": jnp.asarray(seed, jnp.int32),
          "rng": jax.random.key(seed)}


def _assert_bitwise_equal(actual, expected) -> None:
  assert (jax.tree_util.tree_structure(actual)
          == jax.tree_util.tree_structure(expected))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    assert type(a) is type(b), path  # numpy stays numpy, jax stays jax.
    assert a.dtype == b.dtype, path  # A typed key stays a typed key.
    if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    # Compare bytes, so that NaN payloads and -0.0 count too.
    np.testing.assert_array_equal(
        np.atleast_1d(np.asarray(a)).view(np.uint8),
        np.atleast_1d(np.asarray(b)).view(np.uint8),
        err_msg=jax.tree_util.keystr(path))


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Orbax's array data for a step: OCDBT's content-addressed files.

  The state item is an OCDBT database: b-tree nodes and array chunks live
  in files named by their hash under state/d/ (the merged root) and
  state/ocdbt.process_0/d/ (what process 0 wrote).
  """
  files = sorted(p for p in (step_dir / "state").rglob("*")
                 if p.is_file() and p.parent.name == "d")
  assert files, f"no OCDBT data files under {step_dir}"
  return files


def _restore(checkpointer, template, step=None):
  """restore of the one item "state": (state, extra, step)."""
  items, extra, step = checkpointer.restore({"state": template}, step)
  return items["state"], extra, step


def test_round_trip_is_bitwise_and_keeps_structure(tmp_path):
  state = _state(seed=1)
  extra = {"data": {"epoch": 2, "position": 17}, "config": {"lr": 1e-3}}
  with checkpointing.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(5, {"state": state}, extra)
  # A fresh object, as in a restarted process.
  with checkpointing.Checkpointer(str(tmp_path)) as checkpointer:
    restored, restored_extra, step = _restore(checkpointer, _state(seed=9))
  assert step == 5
  assert restored_extra == extra
  _assert_bitwise_equal(restored, state)
  # The restored key is usable and draws what the saved one draws.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(state["rng"], (3,)))


def test_raw_uint32_keys_round_trip(tmp_path):
  state = {"rng": jax.random.PRNGKey(3), "w": jnp.arange(4.0)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, {"state": state}, {})
  restored, _, _ = _restore(
      checkpointer, {"rng": jax.random.PRNGKey(0), "w": jnp.zeros(4)})
  _assert_bitwise_equal(restored, state)


def test_keep_latest_and_explicit_older_step(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
  assert checkpointer.latest_step() is None
  assert checkpointer.all_steps() == []
  for step in (10, 20, 30):
    checkpointer.save(step, {"state": _state(seed=step)}, {"step": step})
  assert checkpointer.all_steps() == [20, 30]
  assert checkpointer.latest_step() == 30
  assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "30"]

  restored, extra, step = _restore(checkpointer, _state(seed=0), step=20)
  assert (step, extra) == (20, {"step": 20})
  _assert_bitwise_equal(restored, _state(seed=20))
  with pytest.raises(FileNotFoundError, match="step 10"):
    _restore(checkpointer, _state(seed=0), step=10)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog, damage):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  for step in (1, 2):
    checkpointer.save(step, {"state": _state(seed=step)}, {"step": step})
  # Damage every OCDBT data file of step 2 (see _data_files): truncated to
  # half its size, or deleted.
  for path in _data_files(tmp_path / "2"):
    if damage == "truncate":
      os.truncate(path, path.stat().st_size // 2)
    else:
      path.unlink()

  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    restored, extra, step = _restore(checkpointer, _state(seed=0))
  assert (step, extra) == (1, {"step": 1})
  _assert_bitwise_equal(restored, _state(seed=1))
  assert any(str(tmp_path / "2") in r.getMessage() and r.levelno
             == logging.WARNING for r in caplog.records), caplog.text

  # Training resumes from step 1 and reaches step 2 again: the damaged
  # checkpoint is replaced.
  checkpointer.save(2, {"state": _state(seed=22)}, {"step": 2})
  restored, _, step = _restore(checkpointer, _state(seed=0))
  assert step == 2
  _assert_bitwise_equal(restored, _state(seed=22))


def test_no_readable_checkpoint_names_the_directory(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, {"state": _state(seed=1)}, {})
  for path in _data_files(tmp_path / "1"):
    path.unlink()
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=str(tmp_path)):
    _restore(checkpointer, _state(seed=0))
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpointing.Checkpointer(str(tmp_path / "empty")).restore(
        {"state": {}})


def test_save_refuses_steps_not_newer_than_readable_ones(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(5, {"state": _state(seed=1)}, {})
  for step in (5, 3):
    with pytest.raises(ValueError, match=r"steps \[5\]"):
      checkpointer.save(step, {"state": _state(seed=2)}, {})
  assert checkpointer.all_steps() == [5]


def test_template_mismatch_is_an_error_not_a_fallback(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, {"state": {"w": jnp.ones(3, jnp.float32)}}, {})
  with pytest.raises(checkpointing.TemplateMismatchError,
                     match=r"w: template bfloat16\[3\], checkpoint float32"):
    _restore(checkpointer, {"w": jnp.ones(3, jnp.bfloat16)})
  with pytest.raises(checkpointing.TemplateMismatchError,
                     match="v: missing from the checkpoint"):
    _restore(checkpointer, {"w": jnp.ones(3), "v": jnp.ones(3)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused_and_nothing_written(tmp_path, bad):
  state = _state(seed=1)
  kernel = np.array(state["params"]["encoder"]["kernel"])
  kernel[3, 7] = bad
  state["params"]["encoder"]["kernel"] = jnp.asarray(kernel)
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(
      ValueError,
      match=r"refusing to checkpoint non-finite values at step 7: "
            r"state\['params'\]\['encoder'\]\['kernel'\]\. Training diverged"):
    checkpointer.save(7, {"state": state}, {})
  assert list((tmp_path / "ckpt").iterdir()) == []
  assert checkpointer.all_steps() == []


def test_interrupted_save_is_ignored(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, {"state": _state(seed=1)}, {"step": 1})
  checkpointer.save(2, {"state": _state(seed=2)}, {"step": 2})
  # What a save killed before its commit leaves: Orbax writes into
  # "<step>.orbax-checkpoint-tmp-<timestamp>" and renames it to "<step>"
  # only once complete. Fake one with complete contents, so that only its
  # name marks it as uncommitted.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234")

  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [1, 2]
  assert checkpointer.latest_step() == 2
  _, extra, step = _restore(checkpointer, _state(seed=0))
  assert (step, extra) == (2, {"step": 2})
  # And the step can still be saved for real.
  checkpointer.save(3, {"state": _state(seed=3)}, {"step": 3})
  assert checkpointer.latest_step() == 3


def test_items_restore_alone(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path),
                                            ("policy", "train_state"))
  policy, rest = {"w": jnp.arange(3.0)}, {"opt": jnp.ones(5)}
  checkpointer.save(1, {"policy": policy, "train_state": rest}, {"k": 1})
  # The policy reads back even with the other item's files gone.
  shutil.rmtree(tmp_path / "1" / "train_state")
  items, extra, step = checkpointer.restore({"policy": {"w": jnp.zeros(3)}})
  assert (list(items), extra, step) == (["policy"], {"k": 1}, 1)
  _assert_bitwise_equal(items["policy"], policy)
  with pytest.raises(ValueError, match="takes the items"):
    checkpointer.save(2, {"policy": policy}, {})
  with pytest.raises(ValueError, match=r"no items \['state'\]"):
    checkpointer.restore({"state": policy})
