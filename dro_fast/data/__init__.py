"""Alignment data: reading records, normalising rewards, batching.

records   read_triplets / read_unpaired / read_ultrafeedback /
          read_pairwise (JSON Lines or Parquet, TRL's conversational rows
          too) -> Triplet / Pair, with DataError naming bad rows;
formats   read_dataset: a format by name over one file or many shards
          (files.data_files: a folder, a glob, a comma list);
rewards   RewardStats: mean 0, variance 1 normalisation, saved with a run;
pipeline  tokenize_triplets / tokenize_pairs -> arrays, long_texts (what
          they would truncate), BatchIterator (shuffled, resumable),
          fingerprint (cache keys).
"""

from dro_fast.data.pipeline import BatchIterator
from dro_fast.data.pipeline import fingerprint
from dro_fast.data.pipeline import long_texts
from dro_fast.data.pipeline import tokenize_pairs
from dro_fast.data.pipeline import tokenize_triplets
from dro_fast.data.config import DATA_FORMATS
from dro_fast.data.config import ULTRAFEEDBACK_ASPECTS
from dro_fast.data.config import ULTRAFEEDBACK_REWARDS
from dro_fast.data.files import data_files
from dro_fast.data.formats import read_dataset
from dro_fast.data.records import DataError
from dro_fast.data.records import Pair
from dro_fast.data.records import read_pairwise
from dro_fast.data.records import read_triplets
from dro_fast.data.records import read_unpaired
from dro_fast.data.records import Triplet
from dro_fast.data.rewards import RewardStats
from dro_fast.data.ultrafeedback import read_ultrafeedback

__all__ = ["BatchIterator", "DATA_FORMATS", "data_files", "DataError",
           "fingerprint", "long_texts", "Pair", "read_dataset",
           "read_pairwise", "read_triplets", "read_ultrafeedback",
           "read_unpaired", "RewardStats", "tokenize_pairs",
           "tokenize_triplets", "Triplet",
           "ULTRAFEEDBACK_ASPECTS", "ULTRAFEEDBACK_REWARDS"]
