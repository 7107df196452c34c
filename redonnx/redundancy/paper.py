"""The paper's relaxed criterion (RED, ``merge_criterion=paper``): within each set of parallel
classes, the alpha fraction of channels closest to another (Euclidean distance of their sources)
is merged, each merged group taking the mean of its sources; per-layer alpha from the strategy.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from redonnx.passes.base import PassResult
from redonnx.redundancy.classes import ClassInfo, Plan


def _layer_alphas(groups: dict[tuple, list[ClassInfo]], alpha: float, strategy: str) -> dict[tuple, float]:
    keys = list(groups)
    if strategy == "constant":  # else "block" (MergeChannels checks the name)
        return dict.fromkeys(keys, alpha)
    n = len(keys)
    third = [max(2 * alpha - 1, 0.0), alpha, min(2 * alpha, 0.95)]
    return {k: third[min(3 * i // max(n, 1), 2)] for i, k in enumerate(keys)}


def paper_merges(
    groups: dict[tuple, list[ClassInfo]], plan: Plan, res: PassResult, alpha: float, strategy: str
) -> None:
    """The paper's relaxed merging: per group, merge the closest rows (alpha of them), mean rows."""
    alphas = _layer_alphas(groups, alpha, strategy)
    gone = {m[0] for m in plan.merges}
    for key, members in groups.items():
        alive = [i for i in members if i.root not in gone and i.sourced and not i.zero_item]
        n_merge = round(alphas[key] * len(alive))
        if n_merge < 1 or len(alive) < 2:
            continue
        vecs = np.stack([np.concatenate(i.vectors()) for i in alive])
        for comp in _greedy_components(vecs, n_merge):
            _merge_component([alive[k] for k in comp], vecs[comp], plan)
            res.count("similar channels merged", len(comp) - 1)


def _greedy_components(vecs: np.ndarray, n_merge: int) -> list[list[int]]:
    """Merge ``n_merge`` channels, closest pair first (paper: Euclidean distance of the sources)."""
    n = len(vecs)
    cost = np.sqrt(np.maximum(((vecs[:, None, :] - vecs[None, :, :]) ** 2).sum(-1), 0))
    iu = np.triu_indices(n, 1)
    order = np.argsort(cost[iu], kind="stable")
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    merged = 0
    for k in order:
        a, b = find(int(iu[0][k])), find(int(iu[1][k]))
        if a == b:
            continue
        parent[max(a, b)] = min(a, b)
        merged += 1
        if merged >= n_merge:
            break
    comps: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        comps[find(i)].append(i)
    return [c for c in comps.values() if len(c) > 1]


def _merge_component(infos: list[ClassInfo], vecs: np.ndarray, plan: Plan) -> None:
    keep = infos[0]
    plan.new_sources[keep.root] = vecs.mean(0)
    for other in infos[1:]:
        plan.merges.append((other.root, keep.root, 1.0))
