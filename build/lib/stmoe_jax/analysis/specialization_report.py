"""Files of the expert specialization report (`stmoe_jax.analysis.specialization`): JSON, markdown tables
and the expert x class heatmaps."""

from __future__ import annotations

import json
import os
import sys

import matplotlib

if 'ipykernel' not in sys.modules:  # Files only, no display needed; notebooks keep inline.
  matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from stmoe_jax.data import tokenizer

_SPECIAL = {tokenizer.BOS_ID: '⟨bos⟩', tokenizer.EOS_ID: '⟨eos⟩', tokenizer.PAD_ID: '⟨pad⟩'}
_VISIBLE = {ord(' '): '·', ord('\n'): '↵', ord('\t'): '⇥', ord('\r'): '␍'}


def ngram_text(ids: list[int]) -> str:
  """Token ids as visible text: spaces '·', line breaks '↵', tabs '⇥', specials '⟨bos⟩',
  other non-printable bytes '\\xNN'."""
  out = []
  for i in ids:
    if i in _SPECIAL or i in _VISIBLE:
      out.append(_SPECIAL.get(i) or _VISIBLE[i])
    else:
      out.append(chr(i) if 32 < i < 127 else f'\\x{i:02x}')
  return ''.join(out)


def _code(text: str) -> str:
  """`text` as a markdown code span that survives a table cell (pipes escaped, backticks
  fenced by a longer run)."""
  text = text.replace('|', '\\|')
  fence = '``' if '`' in text else '`'
  return f'{fence} {text} {fence}' if '`' in text else f'{fence}{text}{fence}'


def _pct(x: float) -> str:
  return f'{100 * x:.1f}'


def summary_table(report: dict) -> str:
  """Markdown: per MoE layer, kept choices, I(expert; class), H(class), the score against the
  random-router reference, and the byte-value score against its reference."""
  lines = ['| MoE layer | kept choices | I(expert; class) bits | H(class) bits | score | '
           'random router | byte score | random router (bytes) |',
           '|---|---|---|---|---|---|---|---|']
  for l in report['layers']:
    lines.append(f"| {l['layer']} | {l['num_choices']:,} | {l['mutual_information_bits']:.3f} | "
                 f"{l['class_entropy_bits']:.3f} | {l['score']:.3f} | "
                 f"{l['random_router_score']:.4f} | {l['byte_score']:.3f} | "
                 f"{l['random_router_byte_score']:.4f} |")
  return '\n'.join(lines)


def class_summary_table(report: dict) -> str:
  """Markdown: per class and MoE layer, its share of all choices, the expert whose choices hold
  the most of it (with that share), and the expert that gets the most of the class's choices
  (with that share: under top-k routing about 1/k at most, an expert being one of a token's k
  distinct choices; a little more where other choices were dropped)."""
  layers = report['layers']
  lines = ['| class | ' + ' | '.join(
      f"layer {l['layer']}: % of choices | most specialised expert: % of its choices | "
      "expert with most of the class: % of the class" for l in layers) + ' |',
           '|---|' + '---|---|---|' * len(layers)]
  for c, name in enumerate(report['classes']):
    cells = []
    for l in layers:
      by_expert, by_class = np.asarray(l['by_expert'])[:, c], np.asarray(l['by_class'])[:, c]
      e, f = int(np.argmax(by_expert)), int(np.argmax(by_class))
      cells += [_pct(l['class_mix'][c]), f'{e}: {_pct(by_expert[e])}', f'{f}: {_pct(by_class[f])}']
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def expert_table(report: dict, layer: dict, experts: list[int] | None = None) -> str:
  """Markdown: per expert (all, or `experts`), its load, each class's share of its choices (%),
  its most over-represented class with the lift, and its top n-grams with their lifts."""
  classes = report['classes']
  lines = ['| expert | load % | ' + ' | '.join(classes) + ' | top class (lift) | top 3-grams '
           '(lift) |', '|---|---|' + '---|' * len(classes) + '---|---|']
  for e in range(len(layer['experts'])) if experts is None else experts:
    info = layer['experts'][e]
    c = classes.index(info['top_class'])
    grams = ', '.join(f"{_code(ngram_text(g['ids']))} ({g['lift']:.1f})"
                      for g in info['top_ngrams'])
    lines.append(f"| {e} | {_pct(info['load'])} | " +
                 ' | '.join(_pct(x) for x in layer['by_expert'][e]) +
                 f" | {info['top_class']} ({info['class_lift'][c]:.1f}) | {grams} |")
  return '\n'.join(lines)


def class_table(report: dict, layer: dict) -> str:
  """Markdown: per class, the share of its choices (%) each expert got, experts as columns."""
  num_experts = len(layer['experts'])
  lines = ['| class | ' + ' | '.join(str(e) for e in range(num_experts)) + ' |',
           '|---|' + '---|' * num_experts]
  for c, name in enumerate(report['classes']):
    lines.append(f'| {name} | ' +
                 ' | '.join(_pct(layer['by_class'][e][c]) for e in range(num_experts)) + ' |')
  return '\n'.join(lines)


def markdown(report: dict) -> str:
  """The whole report as one markdown document."""
  batches = 'all' if report['num_batches'] is None else report['num_batches']
  parts = [f"# Expert specialization: {report['workdir']}, step {report['step']}",
           f"Split `{report['split']}`, batches: {batches}; bytes that `tokenize` could not "
           f"label (counted as other): {_pct(report['tokenize_fallback_share'])}%.",
           '## Scores', summary_table(report), '## Classes: the corpus mix and the most '
           'specialised experts', class_summary_table(report)]
  for layer in report['layers']:
    parts += [f"## MoE layer {layer['layer']}: share of each expert's choices per class (%)",
              expert_table(report, layer),
              f"## MoE layer {layer['layer']}: share of each class's choices per expert (%)",
              class_table(report, layer)]
  return '\n\n'.join(parts) + '\n'


def expert_order(layer: dict, classes: list[str]) -> list[int]:
  """Experts grouped by their most over-represented class (in `classes` order), within a group
  by decreasing lift: similar experts sit side by side in the heatmaps."""
  def key(e):
    info = layer['experts'][e]
    c = classes.index(info['top_class'])
    return c, -info['class_lift'][c]
  return sorted(range(len(layer['experts'])), key=key)


def plot_heatmaps(report: dict):
  """Per MoE layer two [class x expert] heatmaps: each expert's choices split over classes
  (columns sum to 1) and each class's choices split over experts (rows sum to 1)."""
  classes, layers = report['classes'], report['layers']
  num_experts = len(layers[0]['experts'])
  fig, axes = plt.subplots(2 * len(layers), 1, squeeze=False,
                           figsize=(max(7, 2.5 + 0.16 * num_experts), 2.6 * 2 * len(layers)))
  for m, layer in enumerate(layers):
    order = expert_order(layer, classes)
    panels = [(np.asarray(layer['by_expert']), "share of the expert's choices", 1.0),
              (np.asarray(layer['by_class']), "share of the class's choices", None)]
    for j, (share_EC, what, vmax) in enumerate(panels):
      ax = axes[2 * m + j, 0]
      image = ax.imshow(share_EC[order].T, cmap='viridis', vmin=0, vmax=vmax, aspect='auto',
                        interpolation='nearest')
      ax.set_yticks(range(len(classes)))
      ax.set_yticklabels(classes, fontsize=8)
      ax.set_xticks(range(num_experts))
      ax.set_xticklabels([str(e) for e in order], fontsize=6)
      ax.set_title(f"MoE layer {layer['layer']}: {what} (score {layer['score']:.3f}, random "
                   f"router {layer['random_router_score']:.4f})", fontsize=9)
      fig.colorbar(image, ax=ax, pad=0.01)
  axes[-1, 0].set_xlabel('expert (grouped by most over-represented class)')
  fig.tight_layout()
  return fig


def write(report: dict, out: str) -> list[str]:
  """Writes specialization.{json,md,png} into `out` (created); returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'specialization.{ext}') for ext in ('json', 'md', 'png')]
  with open(paths[0], 'w') as f:
    json.dump(report, f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(report))
  fig = plot_heatmaps(report)
  fig.savefig(paths[2], dpi=90)
  plt.close(fig)
  return paths
