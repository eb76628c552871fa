"""T5 v1.1 / FLAN-T5 encoder-decoder, decoder-only LLMs (Llama 3, Qwen 2.5 /
3, Gemma 3) and value networks in Haiku."""

from dro_fast.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from dro_fast.models.config import LoraConfig
from dro_fast.models.config import parameter_count
from dro_fast.models.config import preset
from dro_fast.models.config import PRESETS
from dro_fast.models.config import REMAT_POLICIES
from dro_fast.models.config import T5Config
from dro_fast.models.decoder import Decoder
from dro_fast.models.decoder import decoder
from dro_fast.models.decoder import DecoderApply
from dro_fast.models.decoder import DecoderCache
from dro_fast.models.decoder_config import DECODER_PRESETS
from dro_fast.models.decoder_config import decoder_preset
from dro_fast.models.decoder_config import DecoderConfig
from dro_fast.models.decoder_config import PAD
from dro_fast.models.network import DecodeStep
from dro_fast.models.network import DecoderStates
from dro_fast.models.network import LayerCache
from dro_fast.models.network import shift_right
from dro_fast.models.network import T5
from dro_fast.models.network import T5Apply
from dro_fast.models.network import t5

__all__ = ["ATTENTION_IMPLEMENTATIONS", "DECODER_PRESETS", "DecodeStep",
           "Decoder", "decoder_preset",
           "DecoderApply", "DecoderCache", "DecoderConfig", "DecoderStates",
           "LayerCache", "LoraConfig", "PAD", "PRESETS", "REMAT_POLICIES", "T5", "T5Apply",
           "T5Config", "decoder", "parameter_count", "preset", "shift_right",
           "t5"]
