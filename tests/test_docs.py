"""The docs: generated tables match their records, the README stays short, links resolve."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PENDING = set()  # Pages a link may name before they exist (none now).


def _generate():
  spec = importlib.util.spec_from_file_location('docs_generate', ROOT / 'docs' / 'generate.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _doc_files():
  return [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


def test_generated_blocks_are_current():
  result = subprocess.run([sys.executable, 'docs/generate.py', '--check'], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_check_names_a_stale_file_and_fill_repairs_it(tmp_path, monkeypatch):
  generate = _generate()
  summary = json.loads((ROOT / 'docs' / 'results' / 'summary.json').read_text())
  dense = next(e for e in summary if e['arm'] == 'dense')
  page = tmp_path / 'page.md'
  page.write_text('intro\n<!-- generated:study -->\n| old | table |\n<!-- /generated:study -->\nend\n')
  monkeypatch.setattr(generate, 'doc_files', lambda: [page])

  assert generate.main(['generate.py', '--check']) == 1
  assert generate.stale([page]) == [page]
  assert generate.main(['generate.py']) == 0
  assert generate.main(['generate.py', '--check']) == 0
  text = page.read_text()
  assert text.startswith('intro\n') and text.endswith('<!-- /generated:study -->\nend\n')
  assert '| old | table |' not in text
  # The dense row, formatted here from the record itself.
  loss = f"{dense['final_val_loss_mean']:.4f} ± {dense['final_val_loss_spread'] / 2:.4f}"
  seeds = ','.join(map(str, dense['seeds']))
  assert f"| dense | {dense['active_params']:,} / {dense['params']:,} | {seeds} | {loss} |" in text
  # Links in a generated block are relative to the page that holds it.
  link = os.path.relpath(ROOT / 'docs' / 'results' / 'summary.json', tmp_path)
  assert f'[`summary.json`]({link})' in text


def test_tokens_per_sec_ratio_is_the_runs_own():
  """The README's throughput column: each arm's in-run tokens/s over dense's, from the record."""
  generate = _generate()
  summary = json.loads((ROOT / 'docs' / 'results' / 'summary.json').read_text())
  dense = next(e for e in summary if e['arm'] == 'dense')
  table = generate.GENERATORS['study'](lambda p: p)
  for e in summary:
    ratio = e['tokens_per_sec_in_runs'] / dense['tokens_per_sec_in_runs']
    row = next(l for l in table.splitlines() if l.startswith(f"| {e['arm']} |"))
    assert f'| {ratio:.2f}x |' in row


def test_a_block_without_a_generator_is_an_error(tmp_path):
  generate = _generate()
  page = tmp_path / 'page.md'
  page.write_text('<!-- generated:no_such_table -->\n<!-- /generated:no_such_table -->\n')
  with pytest.raises(KeyError, match='no_such_table'):
    generate.fill(page)


def test_every_record_names_its_command_machine_and_date():
  results = ROOT / 'docs' / 'results'
  records = json.loads((results / 'records.json').read_text())
  files = {str(p.relative_to(results)) for p in results.rglob('*')
           if p.suffix in ('.json', '.jsonl', '.csv', '.md') and p.name != 'records.json'}
  assert files == set(records)
  for name, r in records.items():
    assert r['command'] and r['machine'], name
    # A record whose runs took more than one day names each day.
    assert re.fullmatch(r'\d{4}-\d{2}-\d{2}(, \d{4}-\d{2}-\d{2})*', r['date']), name


def test_readme_is_short():
  assert len((ROOT / 'README.md').read_text().splitlines()) <= 200


def _links(text: str) -> list[str]:
  text = re.sub(r'```.*?```', '', text, flags=re.DOTALL)  # Code blocks hold no links.
  return re.findall(r'\]\(([^)\s]+)\)', text)


def test_relative_links_point_to_existing_files():
  broken = []
  for page in _doc_files():
    for target in _links(page.read_text()):
      if re.match(r'[a-z]+:', target) or target.startswith('#'):
        continue
      path = (page.parent / target.split('#')[0]).resolve()
      if not path.exists() and path not in PENDING:
        broken.append(f'{page.relative_to(ROOT)}: {target}')
  assert not broken, broken


def test_link_finder_sees_links_and_skips_code():
  text = 'see [a](docs/a.md) and ![p](x.png)\n```\n[b](not/a/link.md)\n```\n'
  assert _links(text) == ['docs/a.md', 'x.png']


def test_the_option_reference_is_current():
  """docs/options.md is what the declarations write; a changed option makes this fail until
  `python -m stmoe_jax.config.reference` is rerun."""
  from stmoe_jax.config import options  # pylint: disable=g-import-not-at-top
  assert (ROOT / 'docs' / 'options.md').read_text() == options.reference_markdown() + '\n', (
      'docs/options.md is stale: run python -m stmoe_jax.config.reference')


def test_the_option_reference_lists_every_option_once():
  from stmoe_jax.config import options  # pylint: disable=g-import-not-at-top
  text = (ROOT / 'docs' / 'options.md').read_text()
  for name, option in options.all_options().items():
    assert text.count(f'| `{name}` | {option.type.__name__} |') == 1, name
