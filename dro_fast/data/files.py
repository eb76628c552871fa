"""Which files a data argument names: one file, a directory, a glob, a list.

`data_files` turns the trainer's --train_data into the list of files to
read, in sorted order of their paths whatever order they were named in, so
that every process and every rerun reads the same rows in the same order
(the reward statistics, the tokenised-data fingerprint and the reference
log-prob cache all follow that order). Forms, which may be mixed in a
comma-separated list:
  a file         read as it is (its extension picks JSON Lines or Parquet);
  a directory    its .jsonl, .json and .parquet files, not its
                 subdirectories, nor names starting with "." or "_"
                 (_SUCCESS, .crc files);
  a glob         the files it matches (`**` crosses directories), e.g.
                 data/train-*.parquet.
A path that exists as named is never split at its commas.
"""

from __future__ import annotations

import glob
import os

from dro_fast.data.records import DataError
from dro_fast.data.records import JSONL_EXTENSIONS
from dro_fast.data.records import PARQUET_EXTENSIONS
from dro_fast.fileio import url_scheme

DATA_EXTENSIONS = JSONL_EXTENSIONS + PARQUET_EXTENSIONS
_GLOB_CHARACTERS = frozenset("*?[")
# What datasets.Dataset.save_to_disk writes: Arrow files, not data shards.
_SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json")


def _data_file(name: str) -> bool:
  return (not name.startswith((".", "_"))
          and os.path.splitext(name)[1].lower() in DATA_EXTENSIONS)


def _directory_files(directory: str, data: str) -> list[str]:
  """The data files directly in `directory`."""
  names = sorted(os.listdir(directory))
  if any(name.endswith(".arrow") for name in names) or all(
      name in names for name in _SAVE_TO_DISK_FILES):
    raise DataError(
        f"{directory} (in {data!r}) looks like a datasets.save_to_disk "
        "folder (Arrow files), which is not read here. Export the dataset "
        "to Parquet shards (ds.shard(n, i).to_parquet(...); docs/DATA.md) "
        "and name their folder.")
  files = [os.path.join(directory, name) for name in names
           if _data_file(name) and os.path.isfile(os.path.join(directory,
                                                               name))]
  if not files:
    held = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise DataError(
        f"the folder {directory} (in {data!r}) holds no data files (.jsonl, "
        f".json or .parquet; it holds {held or 'nothing'}). Name the files "
        "themselves or a glob, or put the shards in that folder.")
  return files


def data_files(data: str | os.PathLike) -> list[str]:
  """The files that `data` names, in sorted order (see module docstring).

  Args:
    data: a file, a directory, a glob, or a comma-separated list of them
      (the trainer's --train_data).

  Returns:
    One or more file paths, sorted, each named once; a URL (gs://...) is
    returned as given, its readers check that it exists.

  Raises:
    DataError: an empty entry, a local file that does not exist (reported
      before its format is guessed), a glob that matches no file, a directory
      without data files (or one that datasets.save_to_disk wrote), or a
      file named twice.
  """
  data = os.fspath(data)
  entries = [data] if os.path.exists(data) else [
      entry.strip() for entry in data.split(",")]
  paths = []
  for entry in entries:
    if not entry:
      raise DataError(
          f"the data files {data!r} (the trainer's `train_data`) have an "
          "empty entry. Separate files, folders and globs with single "
          "commas.")
    if os.path.isdir(entry):
      paths.extend(_directory_files(entry, data))
    elif _GLOB_CHARACTERS & set(entry):
      matches = [path for path in glob.glob(entry, recursive=True)
                 if os.path.isfile(path)]
      if not matches:
        raise DataError(
            f"the glob {entry!r} (in {data!r}) matches no files. Check the "
            "pattern (relative paths start from the working directory, "
            f"{os.getcwd()}).")
      paths.extend(matches)
    elif url_scheme(entry) is None and not os.path.lexists(entry):
      raise DataError(
          f"the data file {entry} (in {data!r}) does not exist. Check the "
          "path (relative paths start from the working directory, "
          f"{os.getcwd()}).")
    else:
      paths.append(entry)
  paths.sort()
  seen = {}
  for path in paths:
    real = os.path.realpath(path)
    if real in seen:
      also = "" if seen[real] == path else f" (also as {seen[real]})"
      raise DataError(
          f"{path} is named twice in {data!r}{also}; each file is read "
          "once. Remove the repeated entry or narrow the glob.")
    seen[real] = path
  return paths
