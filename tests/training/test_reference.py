"""The reference log-prob cache: reused only when its checksums agree.

Each way of damaging a cache (a truncated, altered or removed chunk, another
shape or dtype in the metadata, a missing, garbled or foreign manifest.json)
is reported in one warning line naming the file and what was wrong, and the
cache is computed again and replaced; an intact cache is read without
calling the compute function.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Callable

import numpy as np
import pytest

from dro_fast.training import reference

_KEY = reference.cache_key("data", "tokenizer", "params")
_VALUES = {"ref_logprobs": np.array([-1.5, -2.25, -0.125, -7.0, -3.5, -0.5,
                                     -9.75], np.float32),
           "mismatched_ref_logprobs": np.linspace(-4, -1, 7, dtype=np.float32)}


class _Counting:
  """A compute function that counts its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self) -> dict[str, np.ndarray]:
    self.calls += 1
    return {name: values.copy() for name, values in _VALUES.items()}


def _load(cache_dir: pathlib.Path, compute: _Counting) -> dict:
  return reference.load_or_compute(str(cache_dir), _KEY, compute)


def _assert_values(results: dict) -> None:
  assert sorted(results) == sorted(_VALUES)
  for name, values in _VALUES.items():
    assert results[name].dtype == np.float32
    np.testing.assert_array_equal(results[name], values)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING]


def test_an_intact_cache_is_reused_without_computing(tmp_path):
  compute = _Counting()
  _assert_values(_load(tmp_path, compute))
  assert compute.calls == 1
  # Only the cache itself is left: no temporary directory.
  assert os.listdir(tmp_path) == [_KEY]
  recorded = json.loads((tmp_path / _KEY / reference.MANIFEST).read_text())
  assert recorded["key"] == _KEY
  assert recorded["arrays"]["ref_logprobs"]["shape"] == [7]
  for _ in range(2):
    _assert_values(_load(tmp_path, compute))
  assert compute.calls == 1


def _chunk(directory: pathlib.Path) -> pathlib.Path:
  return directory / "ref_logprobs" / "0"


def _truncate(directory: pathlib.Path) -> None:
  with open(_chunk(directory), "r+b") as f:
    f.truncate(10)


def _flip_last_byte(directory: pathlib.Path) -> None:
  data = bytearray(_chunk(directory).read_bytes())
  data[-1] ^= 0x40
  _chunk(directory).write_bytes(bytes(data))


def _remove_chunk(directory: pathlib.Path) -> None:
  _chunk(directory).unlink()


def _edit_metadata(field: str, value) -> Callable[[pathlib.Path], None]:
  def edit(directory: pathlib.Path) -> None:
    path = directory / "ref_logprobs" / ".zarray"
    metadata = json.loads(path.read_text())
    metadata[field] = value
    path.write_text(json.dumps(metadata))
  return edit


def _delete_manifest(directory: pathlib.Path) -> None:
  (directory / reference.MANIFEST).unlink()


def _garble_manifest(directory: pathlib.Path) -> None:
  path = directory / reference.MANIFEST
  path.write_text(path.read_text()[:40])


def _old_manifest(directory: pathlib.Path) -> None:
  (directory / reference.MANIFEST).write_text(
      json.dumps({"arrays": sorted(_VALUES)}))


def _other_key(directory: pathlib.Path) -> None:
  path = directory / reference.MANIFEST
  recorded = json.loads(path.read_text())
  recorded["key"] = "0" * 32
  path.write_text(json.dumps(recorded))


# damage -> (the file the warning names, relative to the cache; its text).
_DAMAGES = {
    "truncated_chunk": (_truncate, "ref_logprobs", "cannot be read"),
    "flipped_byte": (_flip_last_byte, "ref_logprobs", "have SHA-256"),
    "removed_chunk": (_remove_chunk, "ref_logprobs", "have SHA-256"),
    "other_shape": (_edit_metadata("shape", [6]), "ref_logprobs",
                    "holds float32[6], manifest.json records float32[7]"),
    "other_dtype": (_edit_metadata("dtype", "<f8"), "ref_logprobs",
                    "holds float64[7], manifest.json records float32[7]"),
    "deleted_manifest": (_delete_manifest, "manifest.json", "is missing"),
    "garbled_manifest": (_garble_manifest, "manifest.json",
                          "is not readable JSON"),
    "old_manifest": (_old_manifest, "manifest.json",
                      "lacks the key and each array's shape, dtype and "
                      "sha256"),
    "other_key": (_other_key, "manifest.json", f"not key '{_KEY}'"),
}


@pytest.mark.parametrize("name", sorted(_DAMAGES))
def test_a_damaged_cache_is_reported_and_computed_again(tmp_path, caplog,
                                                        name):
  damage, file, text = _DAMAGES[name]
  compute = _Counting()
  _load(tmp_path, compute)
  directory = tmp_path / _KEY
  damage(directory)

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    results = _load(tmp_path, compute)
  assert compute.calls == 2
  _assert_values(results)
  (warning,) = _warnings(caplog)
  assert "\n" not in warning
  assert f"the cache {directory} is damaged" in warning, warning
  assert f"{directory / file}" in warning, warning
  assert text in warning, warning
  assert warning.endswith("computing it again.")

  # The damaged cache was replaced by an intact one, with nothing left over.
  assert os.listdir(tmp_path) == [_KEY]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _assert_values(_load(tmp_path, compute))
  assert compute.calls == 2
  assert not _warnings(caplog)


def test_a_cache_of_another_key_is_not_read(tmp_path):
  compute = _Counting()
  _load(tmp_path, compute)
  other = reference.load_or_compute(
      str(tmp_path), reference.cache_key("other data"),
      lambda: {"ref_logprobs": np.zeros(3, np.float32)})
  np.testing.assert_array_equal(other["ref_logprobs"], np.zeros(3))
  assert sorted(os.listdir(tmp_path)) == sorted(
      [_KEY, reference.cache_key("other data")])


def test_stale_caches_are_removed_only_from_a_runs_own_folder(tmp_path,
                                                              caplog):
  compute = _Counting()
  _load(tmp_path, compute)
  other = reference.cache_key("other data")
  new = lambda: {"ref_logprobs": np.zeros(3, np.float32)}
  (tmp_path / "notes").mkdir()            # not a cache: never touched
  with caplog.at_level(logging.INFO):
    reference.load_or_compute(str(tmp_path), other, new)
  assert sorted(os.listdir(tmp_path)) == sorted([_KEY, other, "notes"])
  assert any(_KEY in r.getMessage() for r in caplog.records)   # listed
  reference.load_or_compute(str(tmp_path), other, new, remove_stale=True)
  assert sorted(os.listdir(tmp_path)) == sorted([other, "notes"])
