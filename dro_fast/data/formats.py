"""The data formats by name, and reading a file in one of them.

  triplets       one {"prompt", "completion", "reward"} object per row
                 (records.read_triplets);
  ultrafeedback  OpenBMB UltraFeedback rows, one triplet per completion
                 (ultrafeedback.read_ultrafeedback);
  pairwise       one {"prompt", "chosen", "rejected"} object per row
                 (records.read_pairwise).
"""

from __future__ import annotations

import os
from typing import Any

from dro_fast.data.records import Pair
from dro_fast.data.records import read_pairwise
from dro_fast.data.records import read_triplets
from dro_fast.data.records import Triplet
from dro_fast.data.ultrafeedback import read_ultrafeedback

_READERS = {
    "triplets": read_triplets,
    "ultrafeedback": read_ultrafeedback,
    "pairwise": read_pairwise,
}
DATA_FORMATS = tuple(_READERS)


def read_dataset(path: str | os.PathLike, data_format: str,
                 **kwargs: Any) -> list[Triplet] | list[Pair]:
  """Reads a data file with the reader for `data_format`.

  Args:
    path: the data file.
    data_format: "triplets" (read_triplets), "ultrafeedback"
      (read_ultrafeedback) or "pairwise" (read_pairwise).
    **kwargs: passed to the reader.

  Returns:
    The reader's records.

  Raises:
    ValueError: `data_format` is unknown.
    DataError: as the reader.
  """
  reader = _READERS.get(data_format)
  if reader is None:
    raise ValueError(f"data_format={data_format!r} is unknown; choose one "
                     f"of {', '.join(DATA_FORMATS)}.")
  return reader(path, **kwargs)
