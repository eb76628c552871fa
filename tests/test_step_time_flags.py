"""benchmarks.step_time refuses flag values it cannot run, naming the flag.

It does so before any JAX or PyTorch work.
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import app
from absl import flags
from absl.testing import flagsaver
import pytest

from benchmarks import step_time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


@pytest.mark.parametrize("changes, message", [
    ({"torch_host_memory": ["same", "bogus"]},
     "--torch_host_memory: got ['same', 'bogus']; give each of same, keep, "
     "system at most once."),
    ({"torch_host_memory": ["keep", "keep"]}, "--torch_host_memory: got"),
    ({"attention": ["flash"]}, "--attention: unknown ['flash']"),
    ({"remat": ["some"]}, "--remat: unknown ['some']"),
    ({"target_length": ["4", "x"]}, "--target_length takes positive"),
    ({"attention": ["xla", "cudnn"]},
     "--attention=cudnn runs cuDNN's fused attention: it needs a CUDA GPU "
     "(JAX's platform here is 'cpu'); without one, --memory_only "
     "--platform=gpu plans its memory."),
    ({"attention": ["cudnn"], "memory_only": True},
     "--attention=cudnn plans the GPU's program: pass --platform=gpu"),
    ({"attention": ["cudnn"], "memory_only": True, "platform": "gpu",
      "input_length": 9, "target_length": ["4", "7"]},
     "refuses odd lengths; got [9, 7]."),
    ({"attention": ["cudnn"], "memory_only": True, "platform": "gpu",
      "dtype": "float32"}, "--attention=cudnn: T5Config"),
    ({"compare_torch": True, "memory_only": True},
     "--compare_torch times the PyTorch DRO-V step"),
    ({"decoder": "gpt-2"}, "--decoder: unknown 'gpt-2'; choose from"),
    ({"decoder_fields": ["num_layers=4"]},
     "--decoder_fields needs --decoder."),
    ({"decoder": "tiny_decoder", "decoder_fields": ["layers=4"]},
     "--decoder_fields: 'layers=4' is not FIELD=VALUE of a DecoderConfig "
     "field; fields: ['family', 'vocab_size',"),
    ({"decoder": "tiny_decoder", "decoder_fields": ["num_layers"]},
     "--decoder_fields: 'num_layers' is not FIELD=VALUE"),
    ({"decoder": "tiny_decoder", "decoder_fields": ["num_layers=four"]},
     "--decoder_fields: 'num_layers=four': invalid literal for int()"),
    ({"decoder": "tiny_decoder", "decoder_fields": ["qk_norm=yes"]},
     "--decoder_fields: 'qk_norm=yes': expected true or false."),
    ({"decoder": "tiny_decoder", "decoder_fields": ["remat=full"]},
     "--decoder_fields: remat is set by its own flag"),
    ({"decoder": "tiny_decoder", "decoder_fields": ["num_kv_heads=3"]},
     "--decoder_fields: DecoderConfig.num_heads=4 must be a multiple of "
     "num_kv_heads=3."),
    ({"decoder": "tiny_decoder", "attention": ["cudnn"], "memory_only": True,
      "platform": "gpu"}, "--decoder: --attention=cudnn is planned only on"),
])
def test_check_flags_names_what_it_cannot_run(changes, message):
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**{"size": ["tiny"], "input_length": 8,
                              "target_length": ["4"], "dtype": "bfloat16",
                              "decoder": None, "decoder_fields": [],
                              **changes}):
    with pytest.raises(app.UsageError) as error:
      step_time.check_flags()
  assert message in str(error.value)


def test_the_cli_exits_1_on_a_usage_error():
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", "--remat=some"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert "--remat: unknown ['some']" in result.stderr, result.stderr[-3000:]


def test_decoder_fields_are_typed_as_the_presets_fields():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(
      decoder="tiny_decoder", size=["tiny"], remat=["none"], dtype="float32",
      scan_layers=False, platform="auto",
      decoder_fields=["num_layers=3", "rms_norm_eps=1e-5", "qk_norm=false",
                      "sliding_window=none", "family=llama"]):
    step_time.check_flags()
    assert step_time.model_names() == ["tiny_decoder"]
    config = step_time.config_for("tiny", "none", "xla")
  assert (config.num_layers, config.rms_norm_eps, config.qk_norm,
          config.sliding_window, config.family) == (3, 1e-5, False, None,
                                                     "llama")
  assert (config.hidden_size, config.dtype, config.scan_layers) == (
      64, "float32", False)
