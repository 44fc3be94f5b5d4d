"""The expert specialization report: the tokenize byte classifier against hand labelling, the
aggregation against plain loops, and the routing capture against the layer's own stats. (The
report of a trained workdir end to end is in test_entry_points.py, which trains one.)"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmoe_jax.analysis import byte_classes
from stmoe_jax.analysis import specialization
from stmoe_jax.analysis import specialization_report
from stmoe_jax.data import tokenizer
from stmoe_jax.models.transformer import Transformer

# One letter per class, in byte_classes.CLASSES order.
CODES = {'I': 'indentation', 'N': 'identifier', 'K': 'keyword', 'D': 'number', 'S': 'string',
         'C': 'comment', 'O': 'operator', 'L': 'newline', 'W': 'other'}


def labels(letters: str) -> list[int]:
  return [byte_classes.CLASSES.index(CODES[c]) for c in letters]


def test_classifier_matches_a_hand_labelled_snippet():
  source = ("def f(x):\n"
            "    # hi\n"
            "    return x + 12  # c\n"
            "\n"
            "s = 'é' \\\n"
            "  .upper()\n"
            "class A:\n"
            '\t"""Doc\n'
            '\tstring."""\n'
            "\tx = 0x1F if True else None\n")
  expected = ("KKKWNONOOL"
              "IIIICCCCL"
              "IIIIKKKKKKWNWOWDDWWCCCL"
              "L"
              "NWOWSSSSWWL"  # 'é' is two bytes; the continuation backslash is other.
              "IIONNNNNOOL"
              "KKKKKWNOL"
              "ISSSSSSS"  # The docstring's line break and tab are string.
              "SSSSSSSSSSSL"
              "INWOWDDDDWKKWKKKKWKKKKWKKKKL")
  got, fallback = byte_classes.classify_source(source.encode('utf-8'))
  assert len(got) == len(source.encode('utf-8')) == len(expected)
  assert ''.join('INKDSCOLW'[c] for c in got) == expected
  assert fallback == 0


def test_classifier_falls_back_to_other_after_a_tokenize_error():
  # tokenize stops at the inconsistent dedent of line 3: its bytes are other.
  got, fallback = byte_classes.classify_source(b'if x:\n        a\n    b = 1\n')
  assert got.tolist() == labels('KKWNOL' 'IIIIIIIINL' + 'W' * 10) and fallback == 10
  # An unterminated triple-quoted string: everything after the last token before it.
  got, fallback = byte_classes.classify_source(b'x = 1\ns = """ab\n')
  assert got.tolist() == labels('NWOWDL' 'NWO' + 'W' * 7) and fallback == 7


def loop_reference(expert_N, class_N, E, C):
  counts = np.zeros((E, C))
  for e, c in zip(expert_N, class_N):
    counts[e, c] += 1
  by_expert = np.zeros((E, C))
  by_class = np.zeros((E, C))
  for e in range(E):
    for c in range(C):
      if counts[e].sum():
        by_expert[e, c] = counts[e, c] / counts[e].sum()
      if counts[:, c].sum():
        by_class[e, c] = counts[e, c] / counts[:, c].sum()
  n = counts.sum()
  mi = 0.0
  for e in range(E):
    for c in range(C):
      if counts[e, c]:
        p = counts[e, c] / n
        mi += p * math.log2(p / (counts[e].sum() / n * counts[:, c].sum() / n))
  h_class = -sum(counts[:, c].sum() / n * math.log2(counts[:, c].sum() / n)
                 for c in range(C) if counts[:, c].sum())
  return counts, by_expert, by_class, mi, h_class


def test_shares_and_mutual_information_match_loops():
  rng = np.random.default_rng(0)
  E, C, N = 5, 4, 400
  expert_N = rng.integers(0, E - 1, N)  # Expert E-1 gets nothing: a zero row.
  class_N = (expert_N + rng.integers(0, 2, N)) % C  # Correlated with the expert.
  counts, by_expert, by_class, mi, h_class = loop_reference(expert_N, class_N, E, C)
  got = specialization.class_counts(expert_N, class_N, E, C)
  np.testing.assert_array_equal(got, counts)
  got_by_expert, got_by_class = specialization.shares(got)
  np.testing.assert_allclose(got_by_expert, by_expert)
  np.testing.assert_allclose(got_by_class, by_class)
  np.testing.assert_allclose(got_by_expert.sum(1), [1, 1, 1, 1, 0])
  np.testing.assert_allclose(got_by_class.sum(0), 1)
  assert specialization.mutual_information_bits(got) == pytest.approx(mi, abs=1e-12)
  assert specialization.specialization_score(got) == pytest.approx(mi / h_class, abs=1e-12)
  assert 0.1 < mi / h_class < 1
  # Analytic ends: class a function of the expert, and expert independent of class.
  assert specialization.specialization_score(np.diag([3, 5, 7])) == pytest.approx(1.0)
  independent = np.outer([1, 2, 3], [4, 5])
  assert specialization.specialization_score(independent) == pytest.approx(0.0, abs=1e-12)


def test_shuffled_labels_keep_each_token_whole():
  rng = np.random.default_rng(1)
  labels_T = rng.integers(0, 9, 50)
  position_N = np.repeat(np.arange(3, 43), 2)  # Tokens 3..42, two choices each.
  shuffled = specialization.shuffled_labels(position_N, labels_T, np.random.default_rng(2))
  assert np.all(shuffled[0::2] == shuffled[1::2])  # Both choices of a token: one label.
  assert sorted(shuffled[0::2]) == sorted(labels_T[3:43])  # The routed tokens' labels, permuted.
  assert not np.array_equal(shuffled, labels_T[position_N])


def test_experts_per_token_by_class_matches_a_loop():
  rng = np.random.default_rng(4)
  classes_T = rng.integers(0, 3, 60)  # Classes 0..2 of 4: class 3 never occurs.
  routed_R = np.arange(5, 55)  # Positions 0..4 and 55..59 are not routed (padding).
  # Each routed token keeps 0, 1 or 2 choices, more often for class 0 (fewer skip).
  kept_R = np.minimum(rng.integers(0, 3, 50) + (classes_T[routed_R] == 0), 2)
  position_N = np.repeat(routed_R, kept_R)
  got = specialization.experts_per_token_by_class(position_N, routed_R, classes_T, 4)
  for c in range(3):
    tokens = [t for t in routed_R if classes_T[t] == c]
    assert got[c] == pytest.approx(sum(kept_R[t - 5] for t in tokens) / len(tokens))
  assert got[3] == 0 and got[0] > got[1]
  report = specialization.layer_report(rng.integers(0, 4, position_N.size), position_N,
                                       rng.integers(0, 259, 60), classes_T, 4, routed_R=routed_R)
  assert report['experts_per_token'] == pytest.approx(kept_R.mean())
  assert report['experts_per_token_by_class'] == pytest.approx(got.tolist() + [0] * 5)


def test_top_ngrams_match_a_counter():
  rng = np.random.default_rng(3)
  tokens_T = rng.integers(97, 101, 300)  # 'a' to 'd': 64 3-grams, most seen several times.
  position_N = np.concatenate([np.arange(300), np.arange(0, 300, 2)])
  expert_N = np.concatenate([rng.integers(0, 2, 300), np.full(150, 2)])
  got = specialization.top_ngrams(expert_N, position_N, tokens_T, 4, n=3, top=4, pool=10)
  gram = lambda t: tuple(int(tokens_T[i]) if i >= 0 else tokenizer.PAD_ID
                         for i in range(t - 2, t + 1))
  corpus = collections.Counter(gram(t) for t in position_N)
  for e in range(3):
    mine = collections.Counter(gram(t) for t, x in zip(position_N, expert_N) if x == e)
    total = sum(mine.values())
    frequent = sorted(mine, key=lambda g: (-mine[g], g))[:10]
    lift = {g: mine[g] / total / (corpus[g] / len(position_N)) for g in frequent}
    best = sorted(frequent, key=lambda g: -lift[g])[:4]
    assert [(r['ids'], r['count']) for r in got[e]] == [(list(g), mine[g]) for g in best]
    np.testing.assert_allclose([r['lift'] for r in got[e]], [lift[g] for g in best])
    np.testing.assert_allclose([r['share'] for r in got[e]], [mine[g] / total for g in best])
  assert got[3] == []  # An expert without choices.
  assert specialization_report.ngram_text([tokenizer.BOS_ID, 32, 10, 124]) == '⟨bos⟩·↵|'


@pytest.mark.parametrize('capacity_factor', [4.0, 0.5])
def test_captured_routing_is_the_forward_pass_routing(tiny_model_cfg, capacity_factor):
  cfg = tiny_model_cfg(moe=dict(every=1, group_size=16, eval_capacity_factor=capacity_factor))
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

  @jax.jit  # One compile instead of one per eager op.
  def capture_and_stats(state, tokens, mask):
    model = nnx.merge(graphdef, state)
    captured = specialization.capture_routing(model, tokens, mask)
    assert model.blocks[0].ffn.route.__func__.__name__ == 'route'  # Unwrapped again.
    return captured, model(tokens, train=False, mask_BL=mask)[1]

  tokens = (jnp.arange(32).reshape(2, 16) * 7) % 256
  mask = jnp.ones((2, 16), bool).at[1, 12:].set(False)  # Padding is never kept.
  (index_MBLK, kept_MBLK), stats = capture_and_stats(state, tokens, mask)
  assert index_MBLK.shape == kept_MBLK.shape == (2, 2, 16, 2)
  assert not np.any(kept_MBLK[:, 1, 12:])
  for m in range(2):
    index, kept = np.asarray(index_MBLK[m]), np.asarray(kept_MBLK[m])
    real_choices = 2 * int(mask.sum())
    np.testing.assert_allclose(1 - kept.sum() / real_choices, stats['dropped_fraction'][m],
                               atol=1e-6)
    if capacity_factor > 1:  # Nothing dropped: kept choices are the assigned ones.
      np.testing.assert_allclose(np.bincount(index[kept], minlength=4) / real_choices,
                                 stats['expert_load'][m], atol=1e-6)
  assert capacity_factor > 1 or np.any(~np.asarray(kept_MBLK[:, 0]))


def test_command_refuses_bad_arguments(tmp_path):
  with pytest.raises(SystemExit, match='--num_batches=0 is invalid'):
    specialization.main([f'--workdir={tmp_path}', '--num_batches=0'])
  with pytest.raises(SystemExit, match=f'error: {tmp_path}/config.json not found'):
    specialization.main([f'--workdir={tmp_path}'])
