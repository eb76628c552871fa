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
])
def test_check_flags_names_what_it_cannot_run(changes, message):
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**{"size": ["tiny"], "input_length": 8,
                              "target_length": ["4"], "dtype": "bfloat16",
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
