r"""PNG plots of train.py runs from their `metrics.jsonl`, and routing plots for notebooks.

  python -m stmoe_jax.analysis.plot --workdir=runs/a [--workdir=runs/b ...] --out=plots/

writes to --out:
  loss.png                 train and validation cross-entropy of every run, by step and by
                           wall time (minutes since the run's first log line);
  expert_load_<run>.png    per MoE layer, a heatmap of each expert's share of token-choices
                           over steps (train metrics' `expert_load` [M, E]);
  dropped_fraction.png     share of token-choices dropped for lack of capacity, per MoE layer
                           (or the mean over layers for runs logged without per-layer values).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

if 'ipykernel' not in sys.modules:  # Files only, no display needed; notebooks keep inline.
  matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from stmoe_jax import errors
from stmoe_jax.train import records


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (FileNotFoundError naming the path if absent,
  ValueError if it holds none: nothing to plot). A torn line is skipped with a warning."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a train.py workdir?')
  found = records.read_jsonl(path, keys=('step', 'kind'))
  if not found:
    raise ValueError(f'{path} holds no metrics records: nothing to plot')
  return found


def run_labels(workdirs: list[str]) -> list[str]:
  """Short legend labels: each workdir's last path component, or its full path if that repeats."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def _series(records, kind, key):
  rows = [r for r in records if r['kind'] == kind and key in r]
  t0 = min((r['wall_time'] for r in records if 'wall_time' in r), default=0.0)
  steps = np.array([r['step'] for r in rows])
  minutes = np.array([(r.get('wall_time', t0) - t0) / 60 for r in rows])
  return steps, minutes, np.array([r[key] for r in rows], dtype=np.float64)


def plot_losses(runs: dict[str, list[dict]]):
  """Train (solid) and validation (dashed, dots) cross-entropy per run, by step and wall time."""
  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for i, (label, records) in enumerate(runs.items()):
    color = f'C{i % 10}'
    train_key = 'cross_entropy' if any('cross_entropy' in r for r in records) else 'loss'
    for kind, key, style, name in [('train', train_key, '-', 'train'),
                                   ('eval', 'loss', '--o', 'validation')]:
      steps, minutes, values = _series(records, kind, key)
      if len(values):
        by_step.plot(steps, values, style, color=color, markersize=4, label=f'{label} {name}')
        by_time.plot(minutes, values, style, color=color, markersize=4, label=f'{label} {name}')
  by_step.set_xlabel('train step')
  by_time.set_xlabel('wall time (minutes)')
  by_step.set_ylabel('cross-entropy (nats/token)')
  for ax in (by_step, by_time):
    ax.grid(alpha=0.3)
  by_time.legend(fontsize=8, loc='best')
  fig.suptitle('Train and validation loss')
  fig.tight_layout()
  return fig


def plot_expert_load(label: str, records: list[dict]):
  """Heatmaps [experts x steps] of train `expert_load`, one panel per MoE layer."""
  rows = [r for r in records if r['kind'] == 'train' and 'expert_load' in r]
  if not rows:
    raise ValueError(f'run {label!r} logged no expert_load (a dense model, or an older run)')
  steps = np.array([r['step'] for r in rows])
  load_TME = np.array([r['expert_load'] for r in rows], dtype=np.float64)
  num_layers, num_experts = load_TME.shape[1:]
  fig, axes = plt.subplots(num_layers, 1, figsize=(9, 1.2 + 0.35 * num_experts * num_layers),
                           squeeze=False)
  # Step edges halfway between logged steps, so each column covers its logging interval.
  mids = (steps[1:] + steps[:-1]) / 2
  first = steps[0] - (mids[0] - steps[0] if len(mids) else 0.5)
  last = steps[-1] + (steps[-1] - mids[-1] if len(mids) else 0.5)
  edges = np.concatenate([[first], mids, [last]])
  vmax = max(float(load_TME.max()), 2.0 / num_experts)
  for m, ax in enumerate(axes[:, 0]):
    mesh = ax.pcolormesh(edges, np.arange(num_experts + 1) - 0.5, load_TME[:, m].T,
                         cmap='viridis', vmin=0.0, vmax=vmax)
    ax.set_ylabel('expert')
    ax.set_yticks(range(num_experts))
    ax.set_title(f'{label}: MoE layer {m} (uniform = {1 / num_experts:.3f})', fontsize=10)
    fig.colorbar(mesh, ax=ax, label='share of choices', pad=0.01)
  axes[-1, 0].set_xlabel('train step')
  fig.tight_layout()
  return fig


def plot_dropped(runs: dict[str, list[dict]]):
  """Dropped share of token-choices (train capacity) over steps, per run and MoE layer."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (label, records) in enumerate(runs.items()):
    rows = [r for r in records if r['kind'] == 'train' and 'dropped_fraction' in r]
    steps = np.array([r['step'] for r in rows])
    if rows and 'layer_dropped_fraction' in rows[0]:
      per_layer = np.array([r['layer_dropped_fraction'] for r in rows], dtype=np.float64)
      for m in range(per_layer.shape[1]):
        ax.plot(steps, 100 * per_layer[:, m], ['-', '--', ':', '-.'][m % 4],
                color=f'C{i % 10}', label=f'{label} MoE layer {m}')
    elif rows:
      ax.plot(steps, 100 * np.array([r['dropped_fraction'] for r in rows]), color=f'C{i % 10}',
              label=f'{label} (mean over layers)')
  ax.set_xlabel('train step')
  ax.set_ylabel('dropped token-choices (%)')
  ax.set_title('Tokens dropped at the train capacity factor')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def write_plots(workdirs: list[str], out: str) -> list[str]:
  """Writes the module docstring's PNGs for `workdirs` into `out`; returns their paths."""
  runs = {label: read_metrics(w) for label, w in zip(run_labels(workdirs), workdirs)}
  os.makedirs(out, exist_ok=True)
  figures = {'loss.png': plot_losses(runs), 'dropped_fraction.png': plot_dropped(runs)}
  for label, records in runs.items():
    if any('expert_load' in r for r in records):
      safe = ''.join(c if c.isalnum() or c in '-_.=' else '_' for c in label)
      figures[f'expert_load_{safe}.png'] = plot_expert_load(label, records)
  paths = []
  for name, fig in figures.items():
    paths.append(os.path.join(out, name))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
  return paths


def expert_choices(model, tokens_BL) -> list[np.ndarray]:
  """Which experts each token chose, per MoE layer: gate weights [B, L, E] (0 = not chosen).

  Runs `model` (a `Transformer`) at eval capacity, records each MoE layer's input and routes
  it again with the layer's own `route` (its registered router, selection bias and
  second-expert policy), each sequence one group with capacity L: the choices of the forward
  pass before capacity drops.
  """
  inputs = []

  class Recorder:  # Stands in for a block's MoE layer: notes its input, then runs it.
    def __init__(self, layer):
      self.layer = layer

    def __call__(self, x_BLD, **kwargs):
      inputs.append((self.layer, x_BLD))
      return self.layer(x_BLD, **kwargs)

  model = model.unscanned()  # One Block per layer, so that each MoE layer can be wrapped.
  moe_blocks = [block for block in model.blocks if block.is_moe]
  for block in moe_blocks:
    block.ffn = Recorder(block.ffn)
  try:
    model(tokens_BL, train=False)
  finally:
    for block in moe_blocks:
      block.ffn = block.ffn.layer
  gates = []
  for layer, x_BLD in inputs:
    route = layer.route(x_BLD, train=False, rng=None, mask_GS=None, capacity=x_BLD.shape[1],
                        token_ids_GS=tokens_BL)  # Each sequence one group (hash routing).
    one_hot_BLKE = np.eye(layer.moe.num_experts)[np.asarray(route.expert_index)]
    gates.append((one_hot_BLKE * np.asarray(route.gate)[..., None]).sum(axis=2))
  return gates


def plot_expert_choices(text: str, gates: list[np.ndarray]):
  """Per MoE layer, a [experts x characters] map of the gate each byte of `text` gave each
  expert (`expert_choices` of one sequence, gates [1, L, E])."""
  fig, axes = plt.subplots(len(gates), 1, figsize=(max(6, 0.28 * len(text)), 1.6 * len(gates)),
                           squeeze=False)
  for m, (ax, gate_BLE) in enumerate(zip(axes[:, 0], gates)):
    image = ax.imshow(gate_BLE[0].T, cmap='Blues', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(len(text)))
    ax.set_xticklabels([repr(c)[1:-1] for c in text], fontsize=8, family='monospace')
    ax.set_yticks(range(gate_BLE.shape[-1]))
    ax.set_ylabel('expert')
    ax.set_title(f'MoE layer {m}: gate weight of each chosen expert', fontsize=10)
    fig.colorbar(image, ax=ax, pad=0.01)
  axes[-1, 0].set_xlabel('input byte')
  fig.tight_layout()
  return fig


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', action='append', required=True, help='train.py workdir; repeat')
  parser.add_argument('--out', required=True, help='directory for the PNGs')
  args = parser.parse_args(argv)
  with errors.one_line_errors(OSError, ValueError):  # OSError: e.g. a full disk.
    paths = write_plots(args.workdir, args.out)
  for path in paths:
    print(path)


if __name__ == '__main__':
  main(sys.argv[1:])
