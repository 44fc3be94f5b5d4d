"""Writes docs/options.md, the option reference, from the declarations.

  python -m stmoe_jax.config.reference            # rewrite docs/options.md
  python -m stmoe_jax.config.reference --check    # exit 1 if it is stale
"""

import os
import sys

from stmoe_jax.config import options

PATH = os.path.join('docs', 'options.md')


def main(argv: list[str]) -> int:
  text = options.reference_markdown() + '\n'
  if '--check' in argv:
    with open(PATH) as f:
      if f.read() != text:
        print(f'{PATH} is stale: run python -m stmoe_jax.config.reference', file=sys.stderr)
        return 1
    return 0
  with open(PATH, 'w') as f:
    f.write(text)
  print(f'wrote {PATH}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
