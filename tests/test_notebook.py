"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a real Jupyter kernel) on CPU."""

import json
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, stdlib_data_dir, monkeypatch):
  monkeypatch.setenv('STMOE_DATA_DIR', stdlib_data_dir)  # The kernel inherits the environment.
  monkeypatch.setenv('STMOE_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': ROOT}}).execute()  # Raises on a cell error.
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # Routing before and after training, and the loss curves.
  printed = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  records = [json.loads(line) for line in printed.splitlines() if line.startswith('{')]
  evaluation = next(r for r in records if 'bits_per_byte' in r)
  # A uniform guess over the 259 tokens costs log2(259) = 8.02 bits per token (and more per
  # byte); 40 steps of the tiny model must do clearly better.
  assert evaluation['step'] == 40 and evaluation['bits_per_byte'] < 6.5
  sample = next(r for r in records if 'sample' in r)['sample']
  assert sample.startswith('def ') and len(sample) > 4
  assert os.path.exists(tmp_path / 'run' / 'metrics.jsonl')
