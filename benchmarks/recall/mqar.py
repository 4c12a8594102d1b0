"""Multi-query associative recall (MQAR), as defined by Zoology (Arora, Eyuboglu et al., 2023) and used
by Based.

A sequence of ``T`` tokens holds ``n`` key-value pairs followed by a query region::

    inputs:   k1 v1 k2 v2 ... kn vn | x  x  k2 x  x  x  k1 x  ...     (x: random filler tokens)
    targets:  -100 ...          -100 | .  .  v2 .  .  .  v1 .  ...     (-100 everywhere else)

- keys come from the first half of the vocabulary (``1 .. V/2 - 1``; token 0 is never a key), values
  from the second half (``V/2 .. V - 1``); keys are distinct within a sequence, and so are values;
- every key is queried exactly once, at position ``2n + 2·gap`` where the ``n`` gaps are drawn without
  replacement from ``0 .. (T - 2n)/2 - 1`` with weights ``p_i ∝ a·i^(a-1)`` (``i = gap + 1``, ``a = 0.01``):
  a power law, so most queries come soon after the context, as repeated bigrams do in text. The
  ``j``-th gap (in draw order) goes with the ``j``-th key of the context, as in Zoology;
- ``targets[t]`` is the token the model must predict after reading ``inputs[:t + 1]``: the value of
  the key at ``t`` where ``t`` is a query, ``-100`` elsewhere (so accuracy and loss see only recalls);
- with ``random_non_queries`` (Zoology's default) the rest of the query region is filled with tokens
  drawn uniformly from the whole vocabulary.

``targets`` are aligned with ``inputs`` the way Zoology's labels are (already shifted). fla_gsa's
``*ForCausalLM.forward(labels=...)`` shifts labels itself, Hugging Face style: pass
:func:`hf_labels` ``(targets)`` there.

Splits: :func:`split_seed` gives train sets even seeds and test sets odd ones, so a train set and a
test set are never drawn from the same random stream (Zoology warns about that leak).
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

IGNORE_INDEX = -100
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class MQARSlice:
    """One kind of MQAR sequence: ``seq_len`` tokens holding ``num_kv_pairs`` pairs."""

    seq_len: int
    num_kv_pairs: int

    @classmethod
    def parse(cls, text: str) -> "MQARSlice":
        """``"256:16"`` → ``MQARSlice(256, 16)``."""
        try:
            t, n = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"an MQAR slice is 'seq_len:num_kv_pairs' (e.g. '256:16'), got {text!r}") from None
        return cls(t, n)

    def __str__(self) -> str:
        return f"{self.seq_len}:{self.num_kv_pairs}"


@dataclasses.dataclass
class MQARData:
    """A set of MQAR sequences.

    inputs:  ``[N, T]`` int64 tokens.
    targets: ``[N, T]`` int64, the value to recall at each query position, ``-100`` elsewhere.
    keys, values: ``[N, n]`` the context's pairs in order.
    gaps:    ``[N, n]`` the query offset of each key (query of key ``j`` at ``2n + 2·gaps[:, j]``).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor
    slice: MQARSlice
    vocab_size: int
    seed: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def query_positions(self) -> torch.Tensor:
        """``[N, n]`` the position of the query of each key."""
        return 2 * self.slice.num_kv_pairs + 2 * self.gaps


def power_law_weights(space: int, power_a: float = 0.01) -> torch.Tensor:
    """Zoology's query-gap weights ``p_i = a·i^(a-1)`` for ``i = 1 .. space``, normalized (float64)."""
    if space < 1:
        raise ValueError(f"space must be >= 1, got {space}")
    if not power_a > 0:
        raise ValueError(f"power_a must be positive, got {power_a}")
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def split_seed(split: str, seed: int, sl: MQARSlice) -> int:
    """The generator seed of one slice of one split: a hash of ``(seed, slice)``, even for ``"train"`` and
    odd for ``"test"``, so no train set ever shares a seed (a random stream) with a test set."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digest = hashlib.sha256(f"mqar/{seed}/{sl.seq_len}/{sl.num_kv_pairs}".encode()).digest()
    base = int.from_bytes(digest[:7], "little")  # 56 bits: 2·base + 1 stays below 2^63
    return 2 * base + SPLITS.index(split)


def _distinct_uniform(num_rows: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """``[num_rows, k]`` tokens uniform in ``[low, high)``, distinct within each row, in random order.

    Draws with replacement and redraws the later copies of a repeated token until none is left. The
    procedure treats every token alike (whether an entry is redrawn depends only on positions and
    equalities), so each row is a uniformly random ordered k-subset, as ``np.random.choice(...,
    replace=False)`` gives, at a fraction of the cost for a vocabulary of thousands.
    """
    if high - low < k:
        raise ValueError(f"cannot draw {k} distinct tokens from [{low}, {high})")
    x = torch.randint(low, high, (num_rows, k), generator=gen)
    while True:
        s, idx = x.sort(dim=1, stable=True)  # stable: the first copy (in position order) is kept
        later = torch.zeros_like(x, dtype=torch.bool)
        later.scatter_(1, idx[:, 1:], s[:, 1:] == s[:, :-1])
        n = int(later.sum())
        if n == 0:
            return x
        x[later] = torch.randint(low, high, (n,), generator=gen)


def multiquery_ar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    seed: int = 0,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> MQARData:
    """Generate ``num_examples`` MQAR sequences (module docstring), deterministically from ``seed``
    (on the CPU, whatever device trains on them)."""
    T, n, V = seq_len, num_kv_pairs, vocab_size
    if T % 2:
        raise ValueError(f"seq_len must be even, got {T}")
    if n < 1 or 4 * n > T:
        raise ValueError(f"num_kv_pairs must be in [1, seq_len / 4] = [1, {T // 4}], got {n}")
    if V <= T:
        raise ValueError(f"vocab_size ({V}) must be larger than seq_len ({T})")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    gen = torch.Generator().manual_seed(seed)
    half = V // 2
    keys = _distinct_uniform(num_examples, n, 1, half, gen)
    values = _distinct_uniform(num_examples, n, half, V, gen)
    space = (T - 2 * n) // 2
    # Weighted sampling without replacement; the CPU op ranks exponential races (Efraimidis-Spirakis),
    # so the order of the draws is that of successive sampling, like Zoology's np.random.choice.
    p = power_law_weights(space, power_a).float().expand(num_examples, space)
    gaps = torch.multinomial(p, n, replacement=False, generator=gen)

    inputs = torch.zeros(num_examples, T, dtype=torch.long)
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    queries = 2 * n + 2 * gaps
    inputs.scatter_(1, queries, keys)
    targets = torch.full((num_examples, T), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, queries, values)
    if random_non_queries:
        filler = torch.ones(num_examples, T, dtype=torch.bool)
        filler[:, :2 * n] = False
        filler.scatter_(1, queries, False)
        inputs[filler] = torch.randint(0, V, (int(filler.sum()),), generator=gen)
    return MQARData(inputs=inputs, targets=targets, keys=keys, values=values, gaps=gaps,
                    slice=MQARSlice(T, n), vocab_size=V, seed=seed)


def make_split(split: str, slices, num_examples: int, vocab_size: int = 8192, seed: int = 0,
               power_a: float = 0.01, random_non_queries: bool = True) -> list[MQARData]:
    """One :class:`MQARData` per slice, each from :func:`split_seed` ``(split, seed, slice)``."""
    return [multiquery_ar(num_examples, sl.seq_len, sl.num_kv_pairs, vocab_size=vocab_size,
                          seed=split_seed(split, seed, sl), power_a=power_a,
                          random_non_queries=random_non_queries)
            for sl in slices]


def hf_labels(targets: torch.Tensor) -> torch.Tensor:
    """The ``labels`` for a Hugging Face causal LM (which predicts ``labels[:, t + 1]`` at ``t``):
    ``targets`` shifted right by one."""
    if bool((targets[:, -1] != IGNORE_INDEX).any()):
        raise ValueError("targets at the last position cannot be expressed as next-token labels")
    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return labels
