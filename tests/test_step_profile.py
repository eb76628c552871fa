"""benchmarks/step_profile.py: the HLO parse, the trace join, the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step_profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tanh(x @ w) @ v plus a batched einsum: three matmuls with known FLOPs.
M, K, N, P = 8, 16, 32, 4
B, Q, C, R = 3, 5, 7, 6
EXPECTED_FLOPS = 2 * M * K * N + 2 * M * N * P + 2 * B * Q * C * R


def _function(x, w, v, a, b):
  return (jnp.tanh(x @ w) @ v).sum() + jnp.einsum("bqc,bcr->bqr", a, b).sum()


@pytest.fixture(name="compiled", scope="module")
def _compiled():
  rng = np.random.default_rng(0)
  args = [rng.normal(size=s).astype(np.float32)
          for s in ((M, K), (K, N), (N, P), (B, Q, C), (B, C, R))]
  compiled = jax.jit(_function).lower(*args).compile()
  return compiled, args


def _entry_name(text):
  return re.search(r"^ENTRY %?([^\s(]+)", text, re.M).group(1)


def test_matmul_flops_of_a_compiled_function(compiled):
  text = compiled[0].as_text()
  instructions = step_profile.parse_hlo(text)
  entry = [i for i in instructions.values()
           if i.computation == _entry_name(text)]
  # Each dot counted once, at the instruction the executable runs (a
  # fusion counts the dots inside it); batch dimensions are not contracted.
  assert sum(i.flops for i in entry) == EXPECTED_FLOPS
  assert sum(i.matmul for i in entry) == 3
  assert step_profile.module_name(text).startswith("jit__function")


def test_a_traced_function_is_attributed_op_by_op(compiled):
  executable, args = compiled
  args = [jax.device_put(a) for a in args]
  jax.block_until_ready(executable(*args))
  calls = 3
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(calls):
      jax.block_until_ready(executable(*args))
    jax.profiler.stop_trace()
    trace = step_profile.load_trace(directory)
  text = executable.as_text()
  events, counts = step_profile.op_events(
      trace, step_profile.parse_hlo(text), step_profile.module_name(text))
  assert counts["unmatched"] == 0 and not counts["device"]
  assert sum(e.instruction.flops for e in events) == calls * EXPECTED_FLOPS
  summary = step_profile.summarize(events, calls, top=5)
  assert summary["matmul_gflop_per_step"] == pytest.approx(
      EXPECTED_FLOPS / 1e9)
  assert 0 < summary["matmul_ms"] <= summary["op_sum_ms"]
  assert summary["busy_ms"] <= summary["span_ms"] + 1e-9
  # Every instant of the span is in exactly one concurrency bucket.
  assert sum(summary["concurrency_ms"].values()) == pytest.approx(
      summary["span_ms"])
  assert summary["top_kinds"][0]["ms_per_step"] >= summary["top_kinds"][-1][
      "ms_per_step"]


GPU_STYLE_HLO = """\
HloModule jit_update, entry_computation_layout={(bf16[64,32]{1,0})->f32[]}

%triton_gemm_dot.1 (parameter_0: bf16[64,32], parameter_1: bf16[32,16]) -> bf16[64,16] {
  %parameter_0 = bf16[64,32]{1,0} parameter(0)
  %parameter_1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(bf16[64,32]{1,0} %parameter_0, bf16[32,16]{1,0} %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(update)/jvp(layers_3/mlp)/wi_0/dot_general"}
}

%body.2 (p.1: (s32[], f32[128,8])) -> (s32[], f32[128,8]) {
  %p.1 = (s32[], f32[128,8]{1,0}) parameter(0)
  ROOT %t.1 = (s32[], f32[128,8]{1,0}) tuple(%p.1)
}

%cond.3 (p.2: (s32[], f32[128,8])) -> pred[] {
  %p.2 = (s32[], f32[128,8]{1,0}) parameter(0)
  ROOT %c.1 = pred[] constant(false)
}

ENTRY %main.9 (Arg_0.1: bf16[64,32], Arg_1.2: bf16[32,16], Arg_2.3: f32[128,256], Arg_3.4: f32[256,8]) -> f32[] {
  %Arg_0.1 = bf16[64,32]{1,0} parameter(0)
  %Arg_1.2 = bf16[32,16]{1,0} parameter(1)
  %Arg_2.3 = f32[128,256]{1,0} parameter(2)
  %Arg_3.4 = f32[256,8]{1,0} parameter(3)
  %gemm_fusion_dot.1 = bf16[64,16]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%triton_gemm_dot.1, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.1 = (f32[128,8]{1,0}, s8[4194304]{0}) custom-call(%Arg_2.3, %Arg_3.4), custom_call_target="__cublas$gemm", metadata={op_name="jit(update)/transpose(jvp(mlp))/wo/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %get-tuple-element.1 = f32[128,8]{1,0} get-tuple-element(%custom-call.1), index=0
  %z.1 = s32[] constant(0)
  %init.1 = (s32[], f32[128,8]{1,0}) tuple(%z.1, %get-tuple-element.1)
  %while.1 = (s32[], f32[128,8]{1,0}) while(%init.1), condition=%cond.3, body=%body.2
  %loop_add_fusion.4 = f32[128,8]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%body.2
  ROOT %r.1 = f32[] constant(0)
}
"""


def test_gpu_style_gemms_and_control_flow():
  instructions = step_profile.parse_hlo(GPU_STYLE_HLO)
  triton = instructions["gemm_fusion_dot.1"]
  assert triton.matmul and triton.flops == 2 * 64 * 16 * 32
  # The fusion has no metadata of its own: it takes its root's.
  assert step_profile.scope(triton) == "jvp(layers_*/mlp)/wi_0/dot_general"
  cublas = instructions["custom-call.1"]
  assert cublas.matmul and cublas.flops == 2 * 128 * 8 * 256
  assert instructions["while.1"].opcode == "while"
  assert not instructions["loop_add_fusion.4"].matmul
  assert step_profile.module_name(GPU_STYLE_HLO) == "jit_update"


def _event(pid, name, ts, dur, op=None, module="jit_update"):
  args = {"hlo_op": op, "hlo_module": module} if op else {}
  return {"ph": "X", "pid": pid, "tid": 1, "name": name, "ts": ts,
          "dur": dur, "args": args}


def test_device_kernels_are_used_over_host_launches():
  instructions = step_profile.parse_hlo(GPU_STYLE_HLO)
  trace = {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name",
       "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name",
       "args": {"name": "/device:GPU:0"}},
      _event(1, "launch", 0.0, 2.0, "custom-call.1"),
      _event(1, "launch", 3.0, 2.0, "gemm_fusion_dot.1"),
      _event(2, "sm90_xmma_gemm", 10.0, 40.0, "custom-call.1"),
      _event(2, "triton_gemm", 50.0, 30.0, "gemm_fusion_dot.1"),
      _event(2, "loop_add", 80.0, 10.0, "loop_add_fusion.4"),
      _event(2, "while", 0.0, 100.0, "while.1"),
      _event(2, "other module", 0.0, 5.0, "dot.1", module="jit_other"),
  ]}
  events, counts = step_profile.op_events(trace, instructions, "jit_update")
  assert counts == {"device": 1, "unmatched": 0, "control": 1}
  assert [(e.instruction.name, e.start, e.end) for e in events] == [
      ("custom-call.1", 10.0, 50.0), ("gemm_fusion_dot.1", 50.0, 80.0),
      ("loop_add_fusion.4", 80.0, 90.0)]
  summary = step_profile.summarize(events, steps=1, top=5)
  assert summary["matmul_ms"] == pytest.approx(0.070)
  assert summary["op_sum_ms"] == pytest.approx(0.080)
  assert summary["concurrency_ms"]["matmuls=1 others=0"] == pytest.approx(
      0.070)
  flops = 2 * 128 * 8 * 256 + 2 * 64 * 16 * 32
  assert summary["matmul_gflop_per_s"] == pytest.approx(flops / 70e-6 / 1e9)


def test_device_kernels_without_hlo_op_are_matched_by_name():
  instructions = step_profile.parse_hlo(GPU_STYLE_HLO)
  trace = {"traceEvents": [
      {"ph": "M", "pid": 2, "name": "process_name",
       "args": {"name": "/device:GPU:0"}},
      _event(2, "gemm_fusion_dot_1", 0.0, 30.0),
      _event(2, "loop_add_fusion.4", 30.0, 10.0),
      _event(2, "sm90_xmma_gemm_f32", 40.0, 5.0),
  ]}
  events, counts = step_profile.op_events(trace, instructions, "jit_update")
  assert counts == {"device": 1, "unmatched": 1, "control": 0}
  assert [e.instruction.name for e in events] == ["gemm_fusion_dot.1",
                                                  "loop_add_fusion.4"]


def test_an_asynchronous_host_op_ends_at_its_end_event():
  instructions = step_profile.parse_hlo(GPU_STYLE_HLO)
  trace = {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name",
       "args": {"name": "/host:CPU"}},
      _event(1, "custom-call.1", 0.0, 5.0, "custom-call.1"),
      _event(1, "loop_add_fusion.4", 6.0, 4.0, "loop_add_fusion.4"),
      _event(1, "end: custom-call.1", 29.0, 1.0),
      _event(1, "custom-call.1", 100.0, 5.0, "custom-call.1"),
      _event(1, "end: custom-call.1", 119.0, 1.0),
  ]}
  events, _ = step_profile.op_events(trace, instructions, "jit_update")
  spans = [(e.instruction.name, e.start, e.end) for e in events]
  assert spans == [("custom-call.1", 0.0, 30.0),
                   ("loop_add_fusion.4", 6.0, 10.0),
                   ("custom-call.1", 100.0, 120.0)]
  summary = step_profile.summarize(events, steps=2, top=5)
  assert summary["concurrency_ms"]["matmuls=1 others=1"] == pytest.approx(
      0.002)


def test_cli_profiles_the_tiny_step(tmp_path):
  out = tmp_path / "profile.jsonl"
  result = subprocess.run(
      [sys.executable, "benchmarks/step_profile.py", "--size=tiny",
       "--batch_size=2", "--input_length=16", "--target_length=8",
       "--dtype=float32", "--remat=none", "--noscan_layers",
       "--implementation=xla", "--profile_steps=1", "--top=5",
       f"--json_out={out}"], cwd=REPO, capture_output=True, text=True,
      timeout=600, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["unmatched_events"] == 0
  assert record["size"] == "tiny" and len(record["top_scopes"]) == 5
  assert "op kind" in result.stdout and "scope (op_name)" in result.stdout
  # The matmul FLOPs read off the HLO against step_time's formula, counted
  # from the config (the formula leaves out only the value head's D x 1).
  assert record["matmul_gflop_per_step"] * 1e9 / record[
      "formula_flops_per_step"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("flag", ["--profile_steps=0", "--top=0"])
def test_cli_refuses_non_positive_counts(flag):
  result = subprocess.run(
      [sys.executable, "benchmarks/step_profile.py", "--size=tiny", flag],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert ("--profile_steps and --top take positive integers"
          in result.stderr), result.stderr[-3000:]


def test_a_folder_without_a_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=f"no \\*.trace.json.gz under {tmp_path}"):
    step_profile.load_trace(str(tmp_path))
