"""Split one SwiGLU FFN's I neurons into E equal groups (the experts).

- `cluster_split` (MoEfication, Zhang et al., Findings ACL 2022, arXiv 2110.01786): neurons that are active on the
  same tokens belong together, so that a token's activation mass falls into few groups and the rest can be skipped.
  MoEfication partitions a co-activation graph of ReLU neurons; a SwiGLU neuron is never exactly zero, so here each
  neuron is described by its activation *magnitudes* |a_i(x_t)| over the calibration tokens, normalised to unit
  length, and the neurons are grouped by balanced spherical k-means (cosine similarity = co-activation).
- `random_split`: the ablation, a random balanced partition.

Both return `groups_EF`, a LongTensor of neuron ids, row e = expert e's F = I / E neurons (a partition of 0..I-1).
Shape suffixes: T calibration tokens, I neurons, E experts, F = I / E neurons per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_split(num_neurons: int, num_experts: int, seed: int = 0) -> Tensor:
    """A random balanced partition of `num_neurons` into `num_experts` groups."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_neurons, generator=g).view(num_experts, -1).sort(dim=1).values


def balanced_assign(sim_IE: Tensor, capacity: int) -> Tensor:
    """Assign each neuron to a cluster, at most `capacity` per cluster, preferring high similarity: every unassigned
    neuron bids for its best cluster that still has room, and each cluster keeps its most similar bidders. A few
    vectorised rounds instead of a Python loop over all (neuron, cluster) pairs."""
    n, E = sim_IE.shape
    labels_I = torch.full((n,), -1, dtype=torch.long)
    free_E = torch.full((E,), capacity, dtype=torch.long)
    while (todo := (labels_I < 0).nonzero().squeeze(1)).numel():
        choice = sim_IE[todo].masked_fill(free_E[None] <= 0, float("-inf")).argmax(1)
        for e in choice.unique().tolist():
            bidders = todo[choice == e]
            keep = bidders[sim_IE[bidders, e].argsort(descending=True)[: int(free_E[e])]]
            labels_I[keep] = e
            free_E[e] -= len(keep)
    return labels_I


def cluster_split(act_TI: Tensor, num_experts: int, iters: int = 15, seed: int = 0) -> Tensor:
    """Balanced spherical k-means of the neurons' activation-magnitude profiles (module docstring)."""
    feat_IT = act_TI.abs().T.float()
    feat_IT = feat_IT / feat_IT.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n, E = feat_IT.shape[0], num_experts
    centroids_ET = farthest_first(feat_IT, E, seed)
    labels_I = balanced_assign(feat_IT @ centroids_ET.T, n // E)
    for _ in range(iters):
        centroids_ET = torch.zeros(E, feat_IT.shape[1]).index_add_(0, labels_I, feat_IT)
        centroids_ET = centroids_ET / centroids_ET.norm(dim=1, keepdim=True).clamp_min(1e-12)
        new_I = balanced_assign(feat_IT @ centroids_ET.T, n // E)
        if torch.equal(new_I, labels_I):
            break
        labels_I = new_I
    return labels_I.argsort(stable=True).view(E, n // E)  # neuron ids grouped by label, ascending within a group


def farthest_first(feat_IT: Tensor, k: int, seed: int) -> Tensor:
    """k starting centroids: a random neuron, then each time the neuron least similar to those already chosen
    (k-means++'s deterministic cousin); a random balanced start left k-means with near-identical centroids."""
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(feat_IT.shape[0], (1,), generator=g))]
    best_I = feat_IT @ feat_IT[chosen[0]]
    for _ in range(k - 1):
        chosen.append(int(best_I.argmin()))
        best_I = torch.maximum(best_I, feat_IT @ feat_IT[chosen[-1]])
    return feat_IT[chosen]


def coactivation_score(act_TI: Tensor, groups_EF: Tensor, k: int) -> float:
    """Share of the activation mass Σ|a| that each token's k heaviest groups hold (1.0 = perfectly concentrated);
    the quantity a good split raises, reported in the conversion summary."""
    mass_TE = act_TI.abs()[:, groups_EF].sum(-1)  # (T, E)
    return float(mass_TE.topk(k, dim=-1).values.sum() / mass_TE.sum())
