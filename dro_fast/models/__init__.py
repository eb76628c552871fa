"""T5 v1.1 / FLAN-T5 encoder-decoder and value networks in Haiku."""

from dro_fast.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from dro_fast.models.config import parameter_count
from dro_fast.models.config import preset
from dro_fast.models.config import PRESETS
from dro_fast.models.config import REMAT_POLICIES
from dro_fast.models.config import T5Config
from dro_fast.models.network import DecodeStep
from dro_fast.models.network import DecoderStates
from dro_fast.models.network import LayerCache
from dro_fast.models.network import shift_right
from dro_fast.models.network import T5
from dro_fast.models.network import T5Apply
from dro_fast.models.network import t5

__all__ = ["ATTENTION_IMPLEMENTATIONS", "DecodeStep", "DecoderStates",
           "LayerCache", "PRESETS", "REMAT_POLICIES", "T5", "T5Apply",
           "T5Config", "parameter_count", "preset", "shift_right", "t5"]
