"""Which kind of Python source each byte is: labels from Python's own `tokenize` module.

`classify_source(text)` labels every byte of one source file with one of `CLASSES`:

  indentation  leading spaces/tabs/form feeds of a line that holds a token (INDENT tokens and
               the unchanged indentation tokenize leaves uncovered); whitespace of a blank line
               is 'other';
  identifier   NAME tokens that are not hard keywords (soft keywords `match`, `case`, `_`,
               `type` are identifiers: they mostly are in practice);
  keyword      NAME tokens with `keyword.iskeyword` (True, False and None included);
  number       NUMBER tokens;
  string       STRING tokens, prefix and quotes included, docstrings too (Python 3.11
               tokenizes an f-string as one STRING, replacement fields included; 3.12 labels
               the fields' names and operators as such);
  comment      COMMENT tokens (without their line break);
  operator     OP tokens: operators, brackets, `:`, `,`, `.`, `->`, `@`, ...;
  newline      NEWLINE and NL tokens, and line breaks between tokens (after a backslash);
  other        everything else: spaces between tokens, backslashes, ERRORTOKENs (a stray `$`
               or an unterminated quote), and the bytes after a tokenize error.

The whole file is tokenized, not the windows the model sees, so a window that starts inside a
string still labels it as string. A file `tokenize` rejects (TokenError: an unterminated
triple-quoted string or bracket at EOF; IndentationError: an inconsistent dedent) keeps the
labels of the tokens produced before the error, and every byte after the last of them is
'other' (`fallback_bytes` counts them): resuming after an error would need guessing the
tokenizer's state (inside a string? at which indentation?), and the stdlib corpus has few such
files (python -m stmoe_jax.analysis.specialization reports the share). Positions from `tokenize` are in
characters; the file is decoded as utf-8 with 'surrogateescape', so every byte, even invalid
utf-8, maps to exactly one character and a multi-byte character's bytes share its label.
"""

from __future__ import annotations

import keyword
import re
import tokenize

import numpy as np

CLASSES = ('indentation', 'identifier', 'keyword', 'number', 'string', 'comment', 'operator',
           'newline', 'other')
INDENTATION, IDENTIFIER, KEYWORD, NUMBER, STRING, COMMENT, OPERATOR, NEWLINE, OTHER = range(
    len(CLASSES))
_UNSET = 255

_TOKEN_CLASSES = {tokenize.INDENT: INDENTATION, tokenize.NUMBER: NUMBER,
                  tokenize.STRING: STRING, tokenize.COMMENT: COMMENT, tokenize.OP: OPERATOR,
                  tokenize.NEWLINE: NEWLINE, tokenize.NL: NEWLINE, tokenize.ERRORTOKEN: OTHER}
# Python >= 3.12 splits f-strings into these around the replacement fields' own tokens.
_TOKEN_CLASSES.update({getattr(tokenize, name): STRING for name in
                       ('FSTRING_START', 'FSTRING_MIDDLE', 'FSTRING_END')
                       if hasattr(tokenize, name)})
_LEADING_SPACE = re.compile(r'[ \t\f]*')


def _lines(text: str) -> list[str]:
  """`text` split after each '\\n' only, as `tokenize` counts rows (str.splitlines would also
  split at '\\x0c', '\\x1c', ... and shift the rows)."""
  lines = [line + '\n' for line in text.split('\n')]
  lines[-1] = lines[-1][:-1]
  return lines if lines[-1] else lines[:-1]


def _char_classes(text: str) -> tuple[np.ndarray, int]:
  """uint8 [num_chars] class of each character of `text`, and the index from which a tokenize
  error left the characters unlabelled (len(text) when there was none)."""
  lines = _lines(text)
  starts = np.cumsum([0] + [len(line) for line in lines])
  labels = np.full(len(text), _UNSET, np.uint8)
  offset = lambda row_col: int(starts[row_col[0] - 1]) + row_col[1]
  labelled_to, failed = 0, False
  try:
    for tok in tokenize.generate_tokens(iter(lines).__next__):
      if tok.type == tokenize.NAME:
        kind = KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
      else:
        kind = _TOKEN_CLASSES.get(tok.type)
      if kind is None or tok.start[0] > len(lines):  # DEDENT, ENDMARKER: no characters.
        continue
      begin, end = offset(tok.start), offset(tok.end)
      labels[begin:end] = kind
      labelled_to = max(labelled_to, end)
  except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError.
    failed = True
  # The gaps tokenize leaves: a line's leading whitespace before a token is indentation...
  for line, start in zip(lines, starts):
    lead = _LEADING_SPACE.match(line).end()
    if lead and line[lead:] not in ('', '\n', '\r\n'):
      gap = labels[start:start + lead]
      gap[gap == _UNSET] = INDENTATION
  # ...a line break between tokens a newline, the rest (spaces, backslashes) other.
  chars = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)
  unset = labels == _UNSET
  labels[unset & ((chars == ord('\n')) | (chars == ord('\r')))] = NEWLINE
  labels[labels == _UNSET] = OTHER
  if failed:
    labels[labelled_to:] = OTHER
    return labels, labelled_to
  return labels, len(text)


def classify_source(data: bytes | str) -> tuple[np.ndarray, int]:
  """Labels every byte of one Python source file (see the module docstring).

  Args:
    data: the file's bytes (or str, encoded as utf-8), as the byte tokenizer sees them.
  Returns:
    (labels_N, fallback_bytes): uint8 [N] indices into `CLASSES` for the N bytes of `data`,
    and how many of them are 'other' only because `tokenize` stopped with an error.
  """
  data = data.encode('utf-8') if isinstance(data, str) else bytes(data)
  text = data.decode('utf-8', 'surrogateescape')
  char_labels, labelled_to = _char_classes(text)
  if text.isascii():
    return char_labels, len(data) - labelled_to
  # One byte per character, except multi-byte utf-8 characters (surrogateescape'd invalid
  # bytes are one byte each).
  width = np.array([len(c.encode('utf-8', 'surrogateescape')) for c in text], np.int64)
  return np.repeat(char_labels, width), int(width[labelled_to:].sum())
