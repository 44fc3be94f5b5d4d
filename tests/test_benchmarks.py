"""The benchmarks still run (tiny sizes) and their numbers are self-consistent. Not timed.

Each runs in-process through its `main(argv)` (printing what its command line prints), except
where the point is the process: simulated devices (the flag must precede JAX start-up) and the
ratio guard (timed at XLA's own optimisation level, not the tests')."""

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_process(capsys, script, *flags):
  """benchmarks/<script>'s main(flags): its JSON lines, as `run_benchmark` returns them."""
  module = importlib.import_module(f'benchmarks.{script.removesuffix(".py")}')
  capsys.readouterr()
  module.main(list(flags))
  stdout = capsys.readouterr().out
  return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


def run_benchmark(script, *flags):
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


def test_moe_layer_benchmark_quick(capsys):
  records = run_in_process(capsys, 'moe_layer.py', '--quick')
  peak = [r for r in records if r['kind'] == 'matmul_peak']
  layers = [r for r in records if r['kind'] == 'layer']
  assert len(peak) == 1 and peak[0]['flops_per_sec'] > 0
  # A dense FFN plus (2 expert counts x 3 dispatch strategies).
  assert [(r['layer'], r['num_experts']) for r in layers] == [('dense_ffn', None)] + [
      (d, e) for e in (4, 8) for d in ('scatter', 'einsum', 'dropless')]
  for r in layers:
    assert abs(r['tokens_per_sec'] * r['seconds'] - r['tokens']) < 1e-6 * r['tokens']
    # Active FLOPs: fwd+bwd (3) x k experts x 3 GEGLU matmuls x 2 FLOPs per multiply-add.
    flops = 3 * r['top_k'] * 3 * 2 * r['tokens'] * r['d_model'] * r['expert_d_ff']
    assert abs(r['active_flops_per_sec'] * r['seconds'] / flops - 1) < 1e-6
    assert r['temp_bytes'] > 0


def test_device_check_quick(tmp_path, capsys):
  """benchmarks/device_check.py at tiny sizes on CPU: every backend and dispatch path agrees with
  its loop reference, the timings and the train step are recorded, and the JSON file is the
  record printed."""
  (record,) = run_in_process(capsys, 'device_check.py', '--quick', f'--out_dir={tmp_path}')
  (path,) = tmp_path.iterdir()
  assert json.loads(path.read_text()) == record
  assert path.name == f"cpu_cpu_{record['date'][:10]}.json"
  assert record['auto_grouped_matmul'] == 'blocked' and record['tokamax_available']
  # Each backend in float32 and bfloat16, with errors against the float64 loop.
  assert set(record['grouped_matmul']) == {f'{n}:{d}' for n in ('ragged_dot', 'blocked', 'megablox',
                                                                'tokamax')
                                           for d in ('float32', 'bfloat16')}
  for name, check in record['grouped_matmul'].items():
    assert check['ok'] and max(check['y'], check['dx'], check['dw']) < check['tolerance'], name
  assert record['tokamax_kernels']['xla'] == 'ok'  # On CPU only its XLA fallback runs.
  assert set(record['dispatch']) == {'scatter', 'einsum', 'dropless:auto', 'dropless:tokamax'}
  assert all(c['ok'] and c['max_error'] < 1e-4 for c in record['dispatch'].values())
  assert record['all_checks_ok']
  layers = record['moe_layer']
  assert set(layers) == {'dense_ffn', 'scatter', 'dropless:auto'}
  for r in layers.values():
    assert r['over_dense_tokens_per_sec'] == pytest.approx(
        layers['dense_ffn']['seconds'] / r['seconds'], rel=1e-9)
  step = record['train_step']['dropless']
  assert step['tokens_per_sec'] == pytest.approx(4 * 32 / step['seconds_per_step'], rel=1e-9)
  assert step['mfu_vs_datasheet'] is None  # A CPU has no datasheet peak.


def test_moe_dense_ratios_have_not_dropped_a_third_below_the_baseline():
  """benchmarks/ratio_guard.py: MoE/dense tokens/s ratios (interleaved medians, small sizes)
  against docs/results/moe_ratio_baseline.json; exits 1 naming the layer on a drop > 1/3."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'ratio_guard.py')],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert result.returncode == 0, result.stderr[-3000:]
  assert record['failures'] == [] and set(record['ratios']) == set(record['baseline'])
  assert all(0 < r < 10 for r in record['ratios'].values())


def test_ratio_guard_fails_on_a_drop_of_more_than_a_third():
  flags = os.environ.get('XLA_FLAGS')
  from benchmarks.ratio_guard import compare  # pylint: disable=g-import-not-at-top
  # Only its script drops the tests' optimisation level: this worker's later subprocesses keep it.
  assert os.environ.get('XLA_FLAGS') == flags
  baseline = {'scatter': 0.6, 'dropless:auto': 0.3}
  assert compare({'scatter': 0.41, 'dropless:auto': 0.3}, baseline, 1 / 3) == []
  assert compare({'scatter': 0.39, 'dropless:auto': 0.1}, baseline, 1 / 3) == [
      'scatter: MoE/dense tokens/s ratio 0.390 is more than 33% below the baseline 0.600',
      'dropless:auto: MoE/dense tokens/s ratio 0.100 is more than 33% below the baseline 0.300']


def test_train_step_benchmark_quick(capsys):
  records = run_in_process(capsys, 'train_step.py', '--quick')
  moe, dense, ratio = records
  assert (moe['config'], dense['config']) == ('tiny', 'tiny_dense')
  for r in (moe, dense):
    assert r['tokens_per_sec'] == pytest.approx(4 * 32 / r['seconds_per_step'], rel=1e-9)
    assert r['model_flops_per_sec'] == pytest.approx(
        r['model_flops_per_token'] * r['tokens_per_sec'], rel=1e-9)
  # Equal active FLOPs per token by construction (dense width = k x expert width), except the
  # router of tiny's one MoE layer: 3 (fwd+bwd) x 2 x d_model 32 x 4 experts.
  assert moe['model_flops_per_token'] - dense['model_flops_per_token'] == 3 * 2 * 32 * 4
  assert ratio['moe_over_dense_tokens_per_sec'] == pytest.approx(
      moe['tokens_per_sec'] / dense['tokens_per_sec'], rel=1e-9)


def test_expert_parallel_benchmark_quick():
  records = run_benchmark('expert_parallel.py', '--quick')
  assert [r['dispatch'] for r in records] == ['scatter', 'einsum', 'dropless']
  for r in records:
    assert r['mesh'] == {'data': 1, 'fsdp': 1, 'expert': 4, 'model': 1} and r['devices'] == 4
  # Capacity dispatch exchanges by all-to-all; the dropless fallback by all-gather and
  # reduce-scatter instead.
  assert all(r['all_to_all_ops'] > 0 for r in records[:2])
  assert records[2]['all_to_all_ops'] == 0 and records[2]['reduce_scatter_ops'] > 0


def test_profile_step_quick(capsys):
  records = run_in_process(capsys, 'profile_step.py', '--quick', '--steps=2', '--top=50')
  step, *kinds, share = records
  assert step['kind'] == 'step' and share['kind'] == 'matmul_share'
  assert step['xla_flops_per_step'] > 0 and step['model_flops_per_step'] > 0
  # The kinds printed (all of them here) add up to the traced op time, largest first.
  times = [k['ms_per_step'] for k in kinds]
  assert times == sorted(times, reverse=True)
  assert sum(times) == pytest.approx(step['traced_op_ms_per_step'], rel=1e-2, abs=0.01)
  matmul = sum(k['ms_per_step'] for k in kinds if k['op'] in ('ynn_fusion', 'dot', 'custom-call'))
  assert share['matmul_ms_per_step'] == pytest.approx(matmul, abs=0.01)
  assert 0 < share['share_of_op_time'] < 1


def test_scale_compiles_abstract_step_and_counts_per_device_bytes():
  """configs/stmoe.py:size=tiny on fsdp=2 x expert=2 (4 simulated devices), counted by hand."""
  records = run_benchmark('scale.py', '--config=configs/stmoe.py:size=tiny',
                          '--mesh=fsdp=2,expert=2', '--devices=4', '--batch=8')
  (r,) = records
  assert r['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'model': 1} and r['devices'] == 4
  assert (r['num_layers'], r['scan_layers'], r['remat']) == (2, False, 'none')
  # tiny: V 259, D 32, 2 layers (2 heads of 16), dense GEGLU FFN 64 wide in layer 0, layer 1
  # MoE with 4 GEGLU experts of width 32, top-2.
  V, D, HK, F, E, FE, k = 259, 32, 32, 64, 4, 32, 2
  experts = E * 3 * D * FE
  others = 2 * V * D + 2 * (4 * D * HK + 2 * D) + 3 * D * F + D * E + D  # + final norm
  assert r['total_params'] == others + experts
  assert r['active_params'] == others + experts * k // E
  # Per device: every parameter's model dim split over fsdp=2, experts also over expert=2;
  # float32 params + Adam mu and nu. The rest (batch shard, router bias, counters) is small.
  state_bytes = 3 * 4 * (others // 2 + experts // 4)
  assert 0 < r['argument_bytes'] - state_bytes < 2048, (r['argument_bytes'], state_bytes)
  assert r['temp_bytes'] > 0 and r['compile_seconds'] > 0
  # Experts exchanged all-to-all over 'expert'; FSDP weights gathered over 'fsdp'.
  assert r['collectives']['all-to-all'] > 0 and r['collectives']['all-gather'] > 0


def test_override_reads_the_field_type_and_refuses_a_misspelt_bool():
  from benchmarks.train_step import apply_override  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  for text in ('model.scan_layers=True', 'model.num_layers=4', 'moe.threshold_train=(0.3, 0.2)'):
    apply_override(config, text)
  assert config.model.scan_layers is True and config.model.num_layers == 4
  assert tuple(config.moe.threshold_train) == (0.3, 0.2)
  with pytest.raises(ValueError, match="^--override model.scan_layers='true' is invalid"):
    apply_override(config, 'model.scan_layers=true')
