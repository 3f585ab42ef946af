"""The hierarchical Shapley core of DnCShap, on abstract set-function games (pure numpy).

DnCShap -- divide-and-conquer hierarchical Shapley
==================================================
The image is cut recursively into a tree of regions (``partition="binary"``: halve the longer
side at each level, depth 6 = 64 regions; ``"quad"``: quarter at each level, depth 3 = 64). The
leaves are the players of the game ``v(S) = p_target(image with the regions in S kept and the
rest replaced by the baseline)``. The value of every node N is split among its children C_1..C_k:

1. Raw values: in each of two contexts -- everything outside N at the baseline (c0) and
   everything outside N present (c1) -- compute the exact k-player Shapley value of the children
   (2^k coalitions, k = 2 or 4), and average over the two contexts: ``psi(C)``.
2. Residual: ``r = phi(N) - sum_j psi(C_j)`` is given to the children in proportion to their
   activity ``m(C)`` (the Shapley-weighted mean |marginal contribution| of C over all coalitions
   evaluated at N; equal shares if every child has m = 0): ``phi(C) = psi(C) + r m(C)/sum m``.

``contexts="present"`` or ``"absent"`` keeps one of the two contexts in step 1: a node's
context coalitions are then the complement of each node (resp. each node alone), so a binary
tree needs only ``2 * 2^D`` evaluations (128 for 64 regions), half the cost; efficiency,
symmetry and the null-player property hold as before, (d) holds at depth 1 only, and in (e)
g_C(1) (resp. g_C(0)) replaces the average. "present" is occlusion-like (what the prediction
loses when a region is removed from the image); "absent" is insertion-like.

``phi(root) = v(all) - v(empty)``. The two contexts of a node are fixed masks (the design is not
adaptive), so every masked image of every level is known in advance and evaluated in batches;
after de-duplication a binary tree of depth D needs ``4 * 2^D - 4`` model evaluations (252 for
64 regions), i.e. LINEAR in the number of regions, where the exact Owen value needs
``~2^D`` contexts per leaf.

Properties (proof sketches; each is tested in tests/test_explain.py)

(a) Efficiency: the children's values sum to their parent's at every node by construction, so
    the leaf values sum to ``f(image) - f(baseline)`` at every depth (float64 round-off only).
(b) Symmetry: the rule is equivariant under any permutation of siblings and any automorphism of
    the tree, so players that the game and the tree treat alike get equal values.
(c) Null player: a leaf whose marginal contribution is always 0 has psi = 0 and m = 0, hence
    value exactly 0 -- unless ALL its siblings also have m = 0 while the parent's value is
    non-zero (possible only for games with interactions spanning >= 3 blocks that show up only
    in contexts that are neither c0 nor c1; then the parent's value is split equally).
(d) Depth 1 = exact Shapley (the only context is the empty one). Depth 2 of a binary tree =
    exact Owen value: the Owen value of a grandchild averages its two-player Shapley value over
    the sibling block of its parent being absent or present, which are exactly c0 and c1; and
    the Owen value is efficient within each block, so the residual is 0.
(e) Relation to the Owen value for deeper trees. The Owen value of child C of N averages its
    k-player Shapley value g_C(z) over independent fair coins z_B, one per block B outside N
    (the siblings of N and of its ancestors) [binary; quad: Shapley weights, still E z_B = 1/2].
    We use (g_C(0) + g_C(1)) / 2 instead. Both equal g_C(1/2) when g_C is affine in z, so
    ``psi = Owen`` at every node whenever no Harsanyi dividend of the game touches a child of a
    node together with >= 2 different blocks outside that node. This holds for additive games,
    for ALL games with interactions of order <= 2 (any pairs, not only siblings; binary or quad
    tree), and for interactions inside sibling groups; then every residual is 0 and the leaf
    values ARE the Owen values. Otherwise, with delta(C) = psi(C) - Owen(C) and e = phi - Owen:
    ``sum_C |e(C)| <= |e(N)| + 2 sum_C |delta(C)|``, hence

        sum_leaves |phi - Owen| <= 2 * sum_{non-root nodes} |psi(node) - Owen(node)|

    (binary trees: only nodes at level >= 3 contribute, psi = Owen above),

    and each |delta(C)| <= max_z g_C(z) - min_z g_C(z) (context sensitivity of C's value).
    A unanimity game on a coalition touching m >= 2 outside blocks is over-weighted by 2^(m-1)
    in psi -- the price of linear cost.

The reference code published with the paper had three defects this implementation does not
repeat: masks at deeper levels covered the whole image instead of the sub-region, baselines
were passed down as sums (scores stopped being probabilities), and only the last level was kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Game = Callable[[np.ndarray], np.ndarray]  # present (M, n_players) bool -> values (M,) float


# --------------------------------------------------------------------------------------------
# Partition trees and the hierarchical Shapley core on abstract set-function games
# --------------------------------------------------------------------------------------------
@dataclass
class PartitionTree:
    """A rooted tree whose leaves are the players 0..n_leaves-1 (node 0 is the root)."""

    children: list[list[int]]  # node -> child nodes ([] for a leaf)
    leaf_sets: np.ndarray  # (n_nodes, n_leaves) bool: the players under each node
    level: np.ndarray  # (n_nodes,) int: root 0
    leaf_node: np.ndarray  # (n_leaves,) int: node id of each player

    @property
    def n_leaves(self) -> int:
        return int(self.leaf_sets.shape[1])

    @property
    def n_nodes(self) -> int:
        return int(self.leaf_sets.shape[0])

    @classmethod
    def from_nested(cls, nested: int | Sequence) -> PartitionTree:
        """Build from nested lists of player ids, e.g. ``[[0, 1], [2, 3]]``."""
        children: list[list[int]] = []
        levels: list[int] = []
        members: list[list[int]] = []

        def add(item: int | Sequence, lvl: int) -> int:
            nid = len(children)
            children.append([])
            levels.append(lvl)
            members.append([])
            if isinstance(item, int | np.integer):
                members[nid] = [int(item)]
            else:
                if len(item) < 2:
                    raise ValueError("every internal node needs >= 2 children")
                for sub in item:
                    c = add(sub, lvl + 1)
                    children[nid].append(c)
                    members[nid].extend(members[c])
            return nid

        add(nested, 0)
        players = sorted(members[0])
        n = len(players)
        if players != list(range(n)):
            raise ValueError(f"players must be 0..n-1 exactly once, got {players}")
        leaf_sets = np.zeros((len(children), n), bool)
        leaf_node = np.zeros(n, np.int64)
        for nid, mem in enumerate(members):
            leaf_sets[nid, mem] = True
            if not children[nid]:
                leaf_node[mem[0]] = nid
        return cls(children, leaf_sets, np.asarray(levels), leaf_node)

    @classmethod
    def balanced(cls, depth: int, arity: int = 2) -> PartitionTree:
        """Complete ``arity``-ary tree of ``depth`` levels; players in depth-first order."""
        counter = itertools.count()

        def build(d: int) -> int | list:
            return next(counter) if d == 0 else [build(d - 1) for _ in range(arity)]

        return cls.from_nested(build(depth))


@dataclass
class TreeValues:
    """Result of ``dnc_shapley`` on an abstract game."""

    leaf_values: np.ndarray  # (n_leaves,) float64
    node_values: np.ndarray  # (n_nodes,) float64: phi, the value assigned to every node
    raw_values: np.ndarray  # (n_nodes,) float64: psi (two-context average); root: v(all)-v(empty)
    v_full: float
    v_empty: float
    n_evals: int  # distinct coalitions evaluated


def shapley_weights(k: int) -> np.ndarray:
    # weight of a coalition of s other players in a k-player Shapley value
    return np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k)
                     for s in range(k)])


Contexts = Literal["both", "absent", "present"]
CONTEXTS: tuple[str, ...] = ("both", "absent", "present")


def check_contexts(contexts: str) -> None:
    if contexts not in CONTEXTS:
        raise ValueError(f"contexts must be one of {CONTEXTS}, got {contexts!r}")


def dnc_coalitions(tree: PartitionTree, contexts: Contexts = "both") -> np.ndarray:
    """Every coalition ``dnc_shapley`` evaluates, de-duplicated: (M, n_leaves) bool."""
    return _plan(tree, contexts)[0]


def _plan(tree: PartitionTree, contexts: Contexts = "both"
          ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Coalitions to evaluate and, per internal node, their indices (contexts x 2^k subsets)."""
    check_contexts(contexts)
    n = tree.n_leaves
    index: dict[bytes, int] = {}
    rows: list[np.ndarray] = []

    def idx(mask: np.ndarray) -> int:
        key = np.packbits(mask).tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append(mask)
        return index[key]

    idx(np.ones(n, bool))  # row 0: everything present (the image itself)
    idx(np.zeros(n, bool))  # row 1: nothing present (the baseline)
    per_node: dict[int, np.ndarray] = {}
    for nid in range(tree.n_nodes):
        kids = tree.children[nid]
        if not kids:
            continue
        k = len(kids)
        ctxs = {"both": (np.zeros(n, bool), ~tree.leaf_sets[nid]),  # c0: outside absent, c1: present
                "absent": (np.zeros(n, bool),), "present": (~tree.leaf_sets[nid],)}[contexts]
        table = np.empty((len(ctxs), 1 << k), np.int64)  # (context, subset bitmask)
        for ci, ctx in enumerate(ctxs):
            for sub in range(1 << k):
                m = ctx.copy()
                for j, c in enumerate(kids):
                    if sub >> j & 1:
                        m |= tree.leaf_sets[c]
                table[ci, sub] = idx(m)
        per_node[nid] = table
    return np.stack(rows), per_node


def dnc_shapley(
    game: Game, tree: PartitionTree, values: np.ndarray | None = None,
    contexts: Contexts = "both",
) -> TreeValues:
    """Divide-and-conquer hierarchical Shapley values of ``game`` on ``tree`` (see module doc).

    ``values``: precomputed game values of ``dnc_coalitions(tree, contexts)`` (M,), else
    ``game`` is called once with all of them.
    """
    coalitions, per_node = _plan(tree, contexts)
    if values is None:
        values = np.asarray(game(coalitions), dtype=np.float64).reshape(-1)
    else:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != coalitions.shape[0]:
        raise ValueError(f"game returned {values.shape[0]} values for {coalitions.shape[0]} coalitions")
    if not np.isfinite(values).all():
        raise ValueError("game returned non-finite values")
    v_full, v_empty = float(values[0]), float(values[1])

    raw = np.zeros(tree.n_nodes)
    activity = np.zeros(tree.n_nodes)
    raw[0] = v_full - v_empty
    for nid, table in per_node.items():
        kids = tree.children[nid]
        k = len(kids)
        w = shapley_weights(k)
        vals = values[table]  # (contexts, 2^k)
        for j, c in enumerate(kids):
            psi = act = 0.0
            for sub in range(1 << k):
                if sub >> j & 1:
                    continue
                s = bin(sub).count("1")
                marg = vals[:, sub | (1 << j)] - vals[:, sub]  # one per context
                psi += w[s] * marg.mean()
                act += w[s] * np.abs(marg).mean()
            raw[c], activity[c] = psi, act

    phi = np.zeros(tree.n_nodes)
    phi[0] = raw[0]
    for nid in range(tree.n_nodes):  # parents precede children in from_nested's numbering
        kids = tree.children[nid]
        if not kids:
            continue
        resid = phi[nid] - raw[kids].sum()
        act = activity[kids]
        share = act / act.sum() if act.sum() > 0 else np.full(len(kids), 1.0 / len(kids))
        phi[kids] = raw[kids] + resid * share
    return TreeValues(phi[tree.leaf_node], phi, raw, v_full, v_empty, int(coalitions.shape[0]))


def exact_shapley(game: Game, n: int) -> np.ndarray:
    """Brute-force Shapley values (2^n coalitions; n <= 16)."""
    if n > 16:
        raise ValueError("exact_shapley enumerates 2^n coalitions: n <= 16")
    allm = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)  # (2^n, n)
    v = np.asarray(game(allm), dtype=np.float64)
    w = shapley_weights(n)
    phi = np.zeros(n)
    for i in range(n):
        without = np.flatnonzero(~allm[:, i])
        sizes = allm[without].sum(1)
        phi[i] = (w[sizes] * (v[without | (1 << i)] - v[without])).sum()
    return phi


def exact_owen(game: Game, tree: PartitionTree) -> np.ndarray:
    """Brute-force Owen (Winter level-structure) value on ``tree``: per-node values (n_nodes,).

    A leaf's value is its marginal contribution averaged over random orders consistent with the
    tree: at every ancestor, a subset S of the other children precedes with Shapley weight.
    Exponential: for small test trees only.
    """
    n = tree.n_leaves
    parent = np.full(tree.n_nodes, -1)
    for nid, kids in enumerate(tree.children):
        parent[kids] = nid
    coal: list[np.ndarray] = []
    plan: list[tuple[int, float, int, int]] = []
    for i in range(n):
        chain = []  # (ancestor, child on the path)
        c = int(tree.leaf_node[i])
        while parent[c] >= 0:
            chain.append((int(parent[c]), c))
            c = int(parent[c])
        options = []  # per level: list of (weight, leaf mask of preceding siblings)
        for a, on_path in chain:
            others = [o for o in tree.children[a] if o != on_path]
            w = shapley_weights(len(others) + 1)
            opts = []
            for r in range(len(others) + 1):
                for sub in itertools.combinations(others, r):
                    m = tree.leaf_sets[list(sub)].any(0) if sub else np.zeros(n, bool)
                    opts.append((w[r], m))
            options.append(opts)
        for combo in itertools.product(*options):
            weight = float(np.prod([o[0] for o in combo]))
            ctx = np.zeros(n, bool)
            for _, m in combo:
                ctx |= m
            with_i = ctx.copy()
            with_i[i] = True
            plan.append((i, weight, len(coal), len(coal) + 1))
            coal.extend([with_i, ctx])
    v = np.asarray(game(np.stack(coal)), dtype=np.float64)
    leaf = np.zeros(n)
    for i, w, a, b in plan:
        leaf[i] += w * (v[a] - v[b])
    return tree.leaf_sets.astype(np.float64) @ leaf



__all__ = ["Contexts", "Game", "PartitionTree", "TreeValues", "check_contexts", "dnc_coalitions",
           "dnc_shapley", "exact_owen", "exact_shapley", "shapley_weights"]
