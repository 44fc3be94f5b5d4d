r"""Writes the results tables of README.md and docs/*.md from the records in docs/results/.

  python docs/generate.py           # rewrite every generated block in place
  python docs/generate.py --check   # exit 1, naming each file whose blocks are stale

A generated block is everything between `<!-- generated:NAME -->` and
`<!-- /generated:NAME -->`; GENERATORS[NAME](link) returns its text, where link(path) turns a
repository path into a link relative to the file being written. Each table ends with the
record it came from and that record's command, machine and date (docs/results/records.json).

GENERATORS is a plain module-level dict: other code may add entries before calling main()
(e.g. the option reference, docs/options.md, from the config registries).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import sys
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'docs' / 'results'
Link = Callable[[str], str]
GENERATORS: dict[str, Callable[[Link], str]] = {}
sys.path.insert(0, str(ROOT))  # So that a generator may import stmoe_jax (e.g. the option registry).

_BLOCK = re.compile(r'(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)',
                    re.DOTALL)


def generator(name: str):
  """Registers fn as the generator of block `name`."""
  def register(fn):
    GENERATORS[name] = fn
    return fn
  return register


# Helpers ----------------------------------------------------------------------------------------

def _json(name: str):
  return json.loads((RESULTS / name).read_text())


def _jsonl(name: str) -> list[dict]:
  return [json.loads(l) for l in (RESULTS / name).read_text().splitlines() if l.strip()]


def _csv(name: str) -> list[dict]:
  with open(RESULTS / name, newline='') as f:
    return list(csv.DictReader(f))


def table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def source(link: Link, *names: str) -> str:
  """One line naming the records a table came from, with their command, machine and date."""
  records = _json('records.json')
  groups: dict[tuple, list[str]] = {}
  for name in names:
    r = records[name]
    groups.setdefault((r['command'], r['machine'], r['date']), []).append(
        f"[`{name}`]({link('docs/results/' + name)})")
  parts = [f"{', '.join(files)}: `{command}`; {machine}; {date}"
           for (command, machine, date), files in groups.items()]
  return '\n\nRecord: ' + '. '.join(parts) + '.'


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def _study() -> tuple[list[dict], dict]:
  summary = _json('summary.json')
  return summary, next(e for e in summary if e['arm'] == 'dense')


def _speedup(e: dict, key: str = 'step_speedup') -> str:
  return ('>= ' if e.get('step_speedup_is_lower_bound') else '') + f'{e[key]:.2f}x'


def _final_losses() -> dict[tuple[str, int], float]:
  """(arm, seed) -> final validation loss of the study's full-length main runs."""
  out = {}
  for r in _csv('results.csv'):
    if r['stage'] == 'main' and r['step'] == r['complete_steps']:
      out[(r['arm'], int(r['seed']))] = float(r['val_loss'])
  return out


# The MoE-vs-dense study ----------------------------------------------------------------------------

def _spread(e: dict, key: str) -> str:
  return _speedup(e, key) + (f" ± {e[key + '_spread'] / 2:.2f}" if key + '_spread' in e else '')


@generator('study')
def study(link: Link) -> str:
  """The README's table: one row per arm, speedups seed for seed against dense."""
  summary, dense = _study()
  rows = []
  for e in summary:
    rows.append([
        e['arm'], f"{e['active_params']:,} / {e['params']:,}", ','.join(map(str, e['seeds'])),
        f"{e['final_val_loss_mean']:.4f} ± {e['final_val_loss_spread'] / 2:.4f}",
        _spread(e, 'step_speedup'), _spread(e, 'time_speedup'),
        f"{e['tokens_per_sec'] / dense['tokens_per_sec']:.2f}x",
        f"{e['dropped_fraction']:.3f}"])
  return table(['arm', 'active / total params', 'seeds', 'final val loss (nats/byte)',
                'step speedup', 'time speedup', 'tokens/s vs dense', 'dropped'], rows) + source(
                    link, 'summary.json')


@generator('study_full')
def study_full(link: Link) -> str:
  """Every column of summary.json: speedups per seed, throughput from the runs' own logs."""
  summary, _ = _study()
  rows = []
  for e in summary:
    rows.append([
        e['arm'], ','.join(map(str, e['seeds'])), f"{e['lr']:g}", f"{e['params']:,}",
        f"{e['active_params']:,}",
        f"{e['final_val_loss_mean']:.4f} ± {e['final_val_loss_spread'] / 2:.4f}",
        f"{e['final_bits_per_byte_mean']:.3f}", _speedup(e),
        ', '.join(f'{s:.2f}' for s in e['per_seed_step_speedup']),
        _speedup(e, 'time_speedup'),
        ', '.join(f'{s:.2f}' for s in e.get('per_seed_time_speedup', [])),
        f"{e['tokens_per_sec']:,.0f}", f"{e['dropped_fraction']:.3f}"])
  return table(['arm', 'seeds', 'lr', 'params', 'active params',
                'final val loss (mean ± half spread)', 'bits/byte', 'step speedup', 'per seed',
                'time speedup', 'per seed', 'tokens/s (runs)', 'dropped'], rows) + source(
                    link, 'summary.json')


@generator('study_complete_runs')
def study_complete_runs(link: Link) -> str:
  summary, _ = _study()
  steps = summary[0]['complete_run_steps']
  rows = [[e['arm']] + [f'{v:.4f}' for v in e['complete_run_val_loss_mean']] for e in summary]
  return table(['arm'] + [f'{s} steps' for s in steps], rows) + source(link, 'summary.json')


@generator('study_per_seed')
def study_per_seed(link: Link) -> str:
  """Final loss per seed and its gap to dense's run on the same seed (same data order)."""
  final = _final_losses()
  summary, _ = _study()
  seeds = sorted({s for _, s in final})
  rows = []
  for e in summary:
    cells = []
    for s in seeds:
      if (e['arm'], s) not in final:
        cells.append('-')
        continue
      gap = final[('dense', s)] - final[(e['arm'], s)]
      cells.append(f"{final[(e['arm'], s)]:.4f}" + ('' if e['arm'] == 'dense' else f' ({gap:+.3f})'))
    rows.append([e['arm']] + cells)
  return table(['arm'] + [f'seed {s} (below dense)' for s in seeds], rows) + source(
      link, 'results.csv')


def _complete_finals(stage: str) -> list[dict]:
  return [r for r in _csv('results.csv') if r['stage'] == stage and r['step'] == r['complete_steps']]


@generator('study_lr_sweep')
def study_lr_sweep(link: Link) -> str:
  finals = _complete_finals('sweep')
  tuned = _json('tuned.json')['lr']
  lrs = sorted({float(r['lr']) for r in finals})
  arms = sorted({r['arm'] for r in finals}, key=[r['arm'] for r in finals].index)
  rows = []
  for arm in arms:
    loss = {float(r['lr']): float(r['val_loss']) for r in finals if r['arm'] == arm}
    family = next(f for f in tuned if arm.startswith(f))
    rows.append([arm] + [f'{loss[lr]:.4f}' if lr in loss else '-' for lr in lrs]
                + [f'{tuned[family]:g}'])
  return table(['arm'] + [f'lr {lr:g}' for lr in lrs] + ['chosen'], rows) + source(
      link, 'results.csv', 'tuned.json')


@generator('study_routing')
def study_routing(link: Link) -> str:
  rows = []
  for r in _complete_finals('routing'):
    option = r['run'].split('/')[-1].removeprefix(r['arm'] + '_')
    rows.append([option, f"{float(r['val_loss']):.4f}"])
  chosen = _json('tuned.json')['routing']
  return (table(['option (stmoe64, seed 0, 400 steps)', 'final val loss'], rows)
          + f'\n\nChosen for every MoE arm: `{chosen}`.' + source(link, 'results.csv', 'tuned.json'))


@generator('tokenizer_bpb')
def tokenizer_bpb(link: Link) -> str:
  """experiments/tokenizer_bpb.py: bytes vs BPE vocabularies at equal training time."""
  name = 'tokenizer_bpb.json'
  record = _json(name)
  rows = [[r['tokenizer'], f"{r['vocab_size']:,}", r['steps'], f"{r['train_seconds']:.0f}",
           f"{r['validation_bits_per_byte']:.3f}", f"{r['validation_loss_nats_per_token']:.3f}"]
          for r in record['runs']]
  return table(['vocabulary', 'model.vocab_size', 'steps', 'train seconds',
                'validation bits/byte', 'nats/token'], rows) + source(link, name)


@generator('routers_study')
def routers_study(link: Link) -> str:
  """experiments/routers.py: every router on fine64, seed for seed against its own gating."""
  name = 'routers.json'
  record = _json(name)
  rows = []
  for e in record['routers']:
    shown = lambda v: (f"({', '.join(f'{x:.3g}' for x in v)})" if isinstance(v, list) else
                       f'{v:g}' if isinstance(v, float) else str(v))
    overrides = ', '.join(f'{k}={shown(v)}' for k, v in e['overrides'].items()) or "fine64's own"
    delta = e['delta_vs_baseline']
    metric = lambda k, fmt: format(e[k], fmt) if k in e else '-'
    rows.append([
        f"`{e['router']}`", overrides,
        ', '.join(f'{x:.4f}' for x in e['final_val_loss']),
        '-' if e['router'] == record['routers'][0]['router'] else
        f"{sum(delta) / len(delta):+.4f} ({', '.join(f'{x:+.3f}' for x in delta)})",
        metric('dropped_fraction', '.3f'), metric('tokens_left_behind', '.3f'),
        metric('router_entropy', '.2f'), metric('router_confidence', '.3f'),
        metric('experts_per_token', '.2f'), f"{e['tokens_per_sec_in_runs']:,.0f}"])
  return table(['router', 'moe overrides', 'final val loss (per seed)',
                'vs own gating (mean; per seed)', 'dropped', 'left behind', 'entropy (nats)',
                'top-1 confidence', 'experts / token', 'tokens/s (runs)'], rows) + source(
                    link, name)


# The longer horizon (experiments/moe_vs_dense.py --horizon) -------------------------------------

@generator('horizon')
def horizon(link: Link) -> str:
  """Step and time speedups over dense at each complete-run length, N/4 to 4N."""
  name = 'horizon.json'
  record = _json(name)
  dense = record['arms']['dense']
  head = ['arm'] + [f"{s:,} steps ({t / 1e6:.1f}M tokens)"
                    for s, t in zip(record['steps'], record['tokens'])]
  rows = [['dense: val loss (nats/byte)'] + [f'{x:.4f}' for x in dense['val_loss_mean']]]
  marks = {'lower': '>=', 'upper': '<=', '': ''}
  for arm, e in record['arms'].items():
    if arm == 'dense':
      continue
    bounds = [{row[j] for row in e['per_seed_bound']} for j in range(len(record['steps']))]
    rows.append([f'{arm}: val loss'] + [f'{x:.4f}' for x in e['val_loss_mean']])
    spread = lambda lo, hi: f' ({lo:.2f}-{hi:.2f})' if len(record['seeds']) > 1 else ''
    mark = lambda b: marks[next(iter(b))] if len(b) == 1 else ''
    rows.append([f'{arm}: step speedup'] + [
        f'{mark(b)}{x:.2f}x{spread(lo, hi)}' for x, lo, hi, b in zip(
            e['step_speedup'], e['step_speedup_min'], e['step_speedup_max'], bounds)])
    rows.append([f'{arm}: time speedup'] + [
        f'{mark(b)}{x:.2f}x{spread(lo, hi)}' for x, lo, hi, b in zip(
            e['time_speedup'], e['time_speedup_min'], e['time_speedup_max'], bounds)])
  growth = []
  for arm, e in record['arms'].items():
    if arm == 'dense' or e.get('step_speedup_per_doubling') is None:
      continue
    seeds = ', '.join(f'{x:+.3f}' for x in e['step_speedup_per_doubling_per_seed'])
    to_2x = (f", so 2x would take {e['doublings_to_2x']:.1f} more doublings of the "
             f"{record['tokens'][-1] / 1e6:.0f}M tokens" if e['doublings_to_2x'] else '')
    growth.append(f"{arm} {e['step_speedup_per_doubling']:+.3f} (seeds: {seeds}){to_2x}")
  note = ('\n\nStep speedup gained per doubling of training tokens (a least-squares line through '
          'each seed\'s interpolated horizons, then the mean): ' + '; '.join(growth) + '.'
          if growth else '')
  return table(head, rows) + note + source(link, name)


@generator('horizon_summary')
def horizon_summary(link: Link) -> str:
  """One sentence for the README: the best arm's step speedup from the first interpolated
  horizon to the longest, and its growth per doubling of tokens."""
  name = 'horizon.json'
  record = _json(name)
  moe = {arm: e for arm, e in record['arms'].items() if arm != 'dense'}
  arm, e = max(moe.items(), key=lambda item: item[1]['step_speedup'][-1])
  first = next(j for j in range(len(record['steps']))
               if not any(row[j] for row in e['per_seed_bound']))
  seeds = record['seeds']
  growth = (f", {e['step_speedup_per_doubling']:+.2f} per doubling of tokens"
            if e.get('step_speedup_per_doubling') is not None else '')
  spread = (f" (seeds {e['step_speedup_min'][-1]:.2f}-{e['step_speedup_max'][-1]:.2f})"
            if len(seeds) > 1 else '')
  # steps are N/4, N/2, N, 2N, 4N, N the study's length.
  return (f"Trained up to {record['steps'][-1] // record['steps'][2]}x longer "
          f"({record['tokens'][-1] / 1e6:.0f}M tokens, seed{'s' if len(seeds) > 1 else ''} "
          f"{', '.join(map(str, seeds))}), the best arm's step speedup ({arm}) goes from "
          f"{e['step_speedup'][first]:.2f}x at {record['steps'][first]:,} steps to "
          f"{e['step_speedup'][-1]:.2f}x{spread} at {record['steps'][-1]:,}{growth} "
          f"([docs/results.md]({link('docs/results.md')}#a-longer-horizon)).")


# The default run (experiments/default_run.py) --------------------------------------------------------

@generator('default_run')
def default_run(link: Link) -> str:
  """configs/default.py and its dense twin (at equal steps and at equal train.py time), each
  train.py from an empty workdir, then eval.py on the whole validation split."""
  name = 'default_run.json'
  record = _json(name)
  labels = {'moe': 'the default (MoE)', 'dense': 'dense twin, same steps',
            'dense_equal_time': "dense twin, the MoE's time"}
  rows = [[labels[key], f"`{r['config']}`", f"{r['steps']:,}", f"{r['train_py_seconds']:.0f}",
           f"{r['tokens_per_sec_median']:,.0f}", f"{r['validation_bits_per_byte']:.3f}"]
          for key, r in record['runs'].items()]
  return table(['run', 'config', 'steps', 'train.py seconds (all in)', 'tokens/s (run)',
                'validation bits/byte (whole split)'], rows) + source(link, name)


# Published findings reproduced (experiments/findings) ---------------------------------------------

FINDINGS = ('capacity_factor', 'z_loss', 'granularity', 'load_balance', 'upcycling')


def _finding(name: str) -> dict:
  return _json(f'findings/{name}.json')


@generator('findings_summary')
def findings_summary(link: Link) -> str:
  """One row per finding: the paper, its claim and our verdict."""
  rows = []
  for name in FINDINGS:
    r = _finding(name)
    rows.append([f"[{r['title']}](#{name.replace('_', '-')})", r['paper'], r['claim'],
                 f"**{r['verdict']}**"])
  return table(['finding', 'paper', "the paper's claim", 'here'], rows) + source(
      link, *(f'findings/{n}.json' for n in FINDINGS))


def _finding_table(name: str, link: Link) -> str:
  r = _finding(name)
  fmt = lambda v, f: '-' if v is None else format(v, f)
  rows = []
  for v in r['rows']:
    extra = (f"{v['stable_runs']}/{v['runs_total']}" if 'stable_runs' in v else
             ', '.join(f'{x:.2f}' for x in v['max_loss_spike']))
    rows.append([v['variant'], r['paper_rows'].get(v['variant'], ''),
                 ', '.join(f'{x:.4f}' for x in v['final_val_loss']),
                 fmt(v['final_val_loss_mean'], '.4f'), fmt(v['tokens_per_sec'], ',.0f'),
                 fmt(v['train_dropped_fraction'], '.3f'), fmt(v['usage_entropy'], '.3f'),
                 extra])
  last = 'stable runs' if 'stable_runs' in r['rows'][0] else 'largest loss spike (nats)'
  return (table(['variant', 'paper', 'final val loss (per seed)', 'mean', 'tokens/s (runs)',
                 'dropped (train)', 'usage entropy', last], rows) +
          f"\n\n**Verdict: {r['verdict']}.** {r['why'][0].upper() + r['why'][1:]}." +
          source(link, f'findings/{name}.json'))


for _name_ in FINDINGS:
  generator(f'finding_{_name_}')(lambda link, n=_name_: _finding_table(n, link))


# Expert specialization -----------------------------------------------------------------------------

@generator('specialization')
def specialization(link: Link) -> str:
  name = 'specialization/specialization.json'
  rec = _json(name)
  rows = [[l['layer'], f"{l['num_choices']:,}", f"{l['mutual_information_bits']:.3f}",
           f"{l['class_entropy_bits']:.3f}", f"{l['score']:.3f}",
           f"{l['random_router_score']:.4f}", f"{l['byte_score']:.3f}",
           f"{l['random_router_byte_score']:.4f}"] for l in rec['layers']]
  return table(['MoE layer', 'kept choices', 'I(expert; class) bits', 'H(class) bits', 'score',
                'random router', 'byte score', 'random router (bytes)'], rows) + source(link, name)


# Scaling -------------------------------------------------------------------------------------------

@generator('scan_compile')
def scan_compile(link: Link) -> str:
  rec = _json('scan_compile_base.json')
  by = {(r['num_layers'], r['scan_layers']): r for r in rec['runs']}
  def cell(r):
    return (f"{r['lower_seconds']:.1f} + {r['compile_seconds']:.1f} = "
            f"{r['lower_seconds'] + r['compile_seconds']:.1f} s, temp {_gib(r['temp_bytes'])} GiB")
  rows = [[d, cell(by[(d, True)]), cell(by[(d, False)])] for d in rec['depths']]
  ratio = rec['deepest_over_shallowest']
  rows.append([f"{rec['depths'][-1]} / {rec['depths'][0]} (time)", f"{ratio['scanned']:.2f}x",
               f"{ratio['unscanned']:.2f}x"])
  return table(['layers', 'scanned: lower + compile', 'unscanned: lower + compile'], rows) + source(
      link, 'scan_compile_base.json')


def _scan_table(name: str, layers: Callable[[dict], str]) -> str:
  by: dict[tuple, dict] = {}
  for r in _jsonl(name):
    by[(layers(r), r['remat'], r['scan_layers'])] = r
  keys = list(dict.fromkeys((k[0], k[1]) for k in by))
  def cell(r):
    if r is None:
      return '-'
    return f"{r['lower_seconds'] + r['compile_seconds']:.1f} s / {_gib(r['temp_bytes'])} GiB"
  rows = [[f'{l}, `{remat}`', cell(by.get((l, remat, True))), cell(by.get((l, remat, False)))]
          for l, remat in keys]
  return table(['layers, remat', 'scanned: lower + compile / temp', 'unscanned'], rows)


@generator('scale_base_scan')
def scale_base_scan(link: Link) -> str:
  return _scan_table('scale_base_scan.jsonl', lambda r: str(r['num_layers'])) + source(
      link, 'scale_base_scan.jsonl')


@generator('scale_t5_base_scan')
def scale_t5_base_scan(link: Link) -> str:
  # The record holds num_layers; the runs set num_encoder_layers to the same value.
  return _scan_table('scale_t5_base_scan.jsonl',
                     lambda r: f"{r['num_layers']} + {r['num_layers']}") + source(
                         link, 'scale_t5_base_scan.jsonl')


@generator('scale_1b')
def scale_1b(link: Link) -> str:
  rows = []
  for r in _jsonl('scale_1b.jsonl'):
    c = r['collectives']
    total = (r['argument_bytes'] + r['temp_bytes']) / 2**30
    rows.append(['scanned' if r['scan_layers'] else 'unrolled', r['batch'], f"`{r['remat']}`",
                 _gib(r['argument_bytes']), _gib(r['temp_bytes']), f'{total:.2f}',
                 'yes' if total <= 16 else 'no', f"{r['lower_seconds'] + r['compile_seconds']:.0f}",
                 f"{c['all-gather']} / {c['all-to-all']} / {c['all-reduce']}"])
  return table(['layers', 'global batch', 'remat', 'argument GiB', 'temp GiB',
                'argument + temp GiB', 'fits 16 GiB', 'lower + compile s',
                'all-gather / all-to-all / all-reduce'], rows) + source(link, 'scale_1b.jsonl')


# Performance ---------------------------------------------------------------------------------------

@generator('train_step_grid')
def train_step_grid(link: Link) -> str:
  name = 'train_step_grid.json'
  rows = []
  ratio = {r['config']: r['moe_over_dense_tokens_per_sec'] for r in _json(name)
           if 'moe_over_dense_tokens_per_sec' in r}
  for r in _json(name):
    if 'seconds_per_step' not in r:
      continue
    rows.append([r['config'], f"{r['seconds_per_step'] * 1e3:.0f}", f"{r['tokens_per_sec']:,.0f}",
                 f"{r['model_flops_per_sec'] / 1e9:.1f}", f"{r['mfu_vs_measured_matmul']:.0%}",
                 f"{ratio.get(r['config'], 1.0):.2f}"])
  return table(['config', 'ms/step', 'tokens/s', 'model GFLOP/s',
                'of in-process matmul peak', 'MoE/dense tokens/s'], rows) + source(link, name)


# More generators register the same way, e.g. the option reference in docs/options.md:
#   @generator('options')
#   def options(link): ...  # Imports the option declarations and returns their table.


# Filling the files ---------------------------------------------------------------------------------

def doc_files() -> list[pathlib.Path]:
  return [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


@generator('moe_layer')
def moe_layer(link: Link) -> str:
  """MoE layer vs the FLOP-matched dense FFN (tokens/s ratio) and the matmul-only bound, per
  capacity factor, from the interleaved benchmarks/moe_layer.py runs."""
  names = ['moe_layer_cf125_2026-12-07.json', 'moe_layer_cf100_2026-12-07.json',
           'moe_layer_top8of64_cf100_2026-12-07.json']
  rows = {}
  for name in names:
    for r in _json(name):
      if r.get('kind') != 'layer' or r['layer'] == 'dense_ffn':
        continue
      key = (r['num_experts'], r['top_k'], r['expert_d_ff'])
      column = f"{r['layer']} CF {r['capacity_factor']}"
      rows.setdefault(key, {})[column] = f"{r['over_dense_tokens_per_sec']:.2f}"
  columns = sorted({c for cells in rows.values() for c in cells})
  body = [[f'{k} of {e} (width {f})'] + [cells.get(c, '') for c in columns]
          for (e, k, f), cells in sorted(rows.items())]
  return table(['experts (top-k of E)'] + columns, body) + source(link, *names)


@generator('train_step_default')
def train_step_default(link: Link) -> str:
  """configs/default.py beside its dense twin, stepped in turn (benchmarks/train_step.py)."""
  name = 'train_step_default.json'
  records = _json(name)
  rows = [[f"`{r['config']}`", f"{r['seconds_per_step']:.3f}", f"{r['tokens_per_sec']:,.0f}"]
          for r in records if 'config' in r]
  ratio = records[-1]['moe_over_dense_tokens_per_sec']
  rows.append(['MoE / dense', '', f'{ratio:.2f}x'])
  return table(['config', 's / step', 'tokens/s'], rows) + source(link, name)


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fill(path: pathlib.Path) -> str:
  """The text of `path` with every generated block rewritten."""
  text = path.read_text()
  def link(target: str) -> str:
    return os.path.relpath(ROOT / target, path.parent)
  def replace(m: re.Match) -> str:
    name = m.group('name')
    if name not in GENERATORS:
      raise KeyError(f'{_name(path)}: no generator for block {name!r}')
    return m.group(1) + GENERATORS[name](link).rstrip('\n') + '\n' + m.group(4)
  return _BLOCK.sub(replace, text)


def stale(paths: list[pathlib.Path]) -> list[pathlib.Path]:
  """The files whose generated blocks differ from what the records give."""
  return [p for p in paths if fill(p) != p.read_text()]


def main(argv: list[str]) -> int:
  paths = doc_files()
  if '--check' in argv[1:]:
    bad = stale(paths)
    for p in bad:
      print(f'{_name(p)} is stale: run python docs/generate.py', file=sys.stderr)
    return 1 if bad else 0
  for p in paths:
    text = fill(p)
    if text != p.read_text():
      p.write_text(text)
      print(f'wrote {_name(p)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
