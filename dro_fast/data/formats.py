"""The data formats by name, and reading the files of a dataset in one.

  triplets       one {"prompt", "completion", "reward"} object per row
                 (records.read_triplets);
  unpaired       one {"prompt", "completion", "label"} object per row, the
                 label a boolean (TRL's unpaired preference format): reward
                 1.0 for true, 0.0 for false (records.read_unpaired);
  ultrafeedback  OpenBMB UltraFeedback rows, one triplet per completion
                 (ultrafeedback.read_ultrafeedback);
  pairwise       one {"prompt", "chosen", "rejected"} object per row
                 (records.read_pairwise).
triplets, unpaired and pairwise also take TRL's conversational rows (lists
of {"role", "content"} messages; see dro_fast.data.fields).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from dro_fast.data.config import DATA_FORMATS
from dro_fast.data.files import data_files
from dro_fast.data.records import Pair
from dro_fast.data.records import read_pairwise
from dro_fast.data.records import read_triplets
from dro_fast.data.records import read_unpaired
from dro_fast.data.records import Triplet
from dro_fast.data.rows import DataError
from dro_fast.data.rows import NoRowsError
from dro_fast.data.ultrafeedback import read_ultrafeedback

# One reader per format, in DATA_FORMATS' order.
_READERS = dict(zip(DATA_FORMATS, (read_triplets, read_unpaired,
                                   read_ultrafeedback, read_pairwise)))


def read_dataset(data: str | os.PathLike, data_format: str,
                 **kwargs: Any) -> list[Triplet] | list[Pair]:
  """Reads a dataset's files with the reader for `data_format`.

  Args:
    data: a file, a directory of shards, a glob or a comma-separated list
      of them (files.data_files); the files are read in sorted order and
      their records concatenated. A shard without usable rows is skipped
      with a warning as long as another has some.
    data_format: one of DATA_FORMATS.
    **kwargs: passed to the reader.

  Returns:
    The records, file after file, each file's in its order; a record's
    `source` names its file.

  Raises:
    ValueError: `data_format` is unknown.
    DataError: as the reader, naming the file; as files.data_files; or no
      file has a usable row.
  """
  reader = _READERS.get(data_format)
  if reader is None:
    raise ValueError(f"data_format={data_format!r} is unknown; choose one "
                     f"of {', '.join(DATA_FORMATS)}.")
  paths = data_files(data)
  if len(paths) == 1:
    return reader(paths[0], **kwargs)
  records, empty = [], []
  for path in paths:
    try:
      records.extend(reader(path, **kwargs))
    except NoRowsError as e:
      empty.append(e)
  if not records:
    raise DataError(f"none of the {len(paths)} files of {os.fspath(data)!r} "
                    f"has a usable row; the first: {empty[0]}")
  if empty:
    logging.warning("skipped %d of the %d files of %r, which have no usable "
                    "rows (first: %s)", len(empty), len(paths),
                    os.fspath(data), empty[0])
  return records
