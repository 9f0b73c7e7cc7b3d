"""Independent references for the tests: each numeric component of the product, written plainly.

Nothing in the product imports this module, and nothing here imports the product: each function is
the textbook definition, with loops where that makes it obviously right, in float64 where a value
is compared. They are slow and only meant for the small inputs of the tests.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms as T
from PIL import Image


# ----------------------------------------------------------------------------- losses

def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two vectors (d,), (d,) -> scalar, in float64, differentiable."""
    a, b = a.double(), b.double()
    return (a * b).sum() / (a.norm() * b.norm())


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference for NT-Xent (SimCLR Eq. 1): z1, z2 (N, d) the projections of two views of N images -> scalar.

    Anchor by anchor over the 2N rows of [z1; z2]: the one positive of an anchor is its other view,
    l = -log( exp(s_ap / t) / sum_{k != a} exp(s_ak / t) ) with s the cosine similarity, averaged
    over all 2N anchors. Float64 and differentiable (autograd flows back into z1, z2); exp overflows
    below t ~ 1/700, where only the product's cross-entropy form stays finite.
    """
    z = torch.cat([z1, z2])                                          # (2N, d)
    n2 = z.shape[0]
    losses = []
    for a in range(n2):
        p = (a + n2 // 2) % n2                                       # the other view of the same image
        positive = torch.exp(_cosine(z[a], z[p]) / temperature)
        denominator = 0
        for k in range(n2):
            if k != a:                                               # the positive and all 2N-2 negatives
                denominator = denominator + torch.exp(_cosine(z[a], z[k]) / temperature)
        losses.append(-torch.log(positive / denominator))
    return torch.stack(losses).mean()


def naive_nt_xent_ids(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference for a contrastive loss that takes positive ids: z (M, d), ids (M,) -> scalar.

    Rows sharing an id are positives of each other (SupCon's "L_out" form): for anchor a with
    positives P(a) = {p != a : ids[p] == ids[a]},
    l_a = mean over p in P(a) of -log( exp(s_ap / t) / sum_{k != a} exp(s_ak / t) ),
    averaged over the anchors that have a positive. With ids = image index (two views each) every
    anchor has one positive and this is naive_nt_xent of the two halves.
    """
    ids = [int(i) for i in ids]
    m = z.shape[0]
    losses = []
    for a in range(m):
        positives = [p for p in range(m) if p != a and ids[p] == ids[a]]
        if not positives:
            continue
        denominator = 0
        for k in range(m):
            if k != a:
                denominator = denominator + torch.exp(_cosine(z[a], z[k]) / temperature)
        per_positive = [-torch.log(torch.exp(_cosine(z[a], z[p]) / temperature) / denominator) for p in positives]
        losses.append(torch.stack(per_positive).mean())
    return torch.stack(losses).mean()


def naive_dcl(z1: torch.Tensor, z2: torch.Tensor, temperature: float, sigma: float | None = None,
              weight_gradient: bool = False) -> torch.Tensor:
    """Reference for the decoupled contrastive loss (Yeh et al. 2022): z1, z2 (N, d) -> scalar.

    Anchor by anchor over the 2N rows of [z1; z2], with p the anchor's other view:
    l_a = -w_a * s_ap / t + log sum_{k != a, k != p} exp(s_ak / t), the positive left out of the
    sum. w_a = 1 (DCL), or for DCLW w_a = 2 - N * exp(s_pair(a) / sigma) / sum over the N pairs
    (i, i + N) of exp(s_i,i+N / sigma). Averaged over the 2N anchors, in float64. The weights are
    constants of the gradient (a weight of each term); weight_gradient: the gradient flows through
    them too (raminnakhli/Decoupled-Contrastive-Learning's DCLW).
    """
    z = torch.cat([z1, z2])                                          # (2N, d)
    n2, n = z.shape[0], z.shape[0] // 2
    pair_weight = [1.0] * n
    if sigma is not None:
        zw = z if weight_gradient else z.detach()
        pair_terms = [torch.exp(_cosine(zw[i], zw[i + n]) / sigma) for i in range(n)]
        total = sum(pair_terms)
        pair_weight = [2 - n * term / total for term in pair_terms]
    losses = []
    for a in range(n2):
        p = (a + n) % n2
        negatives = 0
        for k in range(n2):
            if k != a and k != p:
                negatives = negatives + torch.exp(_cosine(z[a], z[k]) / temperature)
        losses.append(-pair_weight[a % n] * _cosine(z[a], z[p]) / temperature + torch.log(negatives))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- augmentation

def naive_nnclr(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, support: list,
                temperature: float) -> torch.Tensor:
    """Reference for NNCLR's loss (Dwibedi et al. 2021, Eq. 2 made symmetric as its Algorithm 1): z1, z2 the
    projections and p1, p2 the predictions (N, d) of two views of N images; support the queue's filled rows.

    For each view-1 image i: its neighbour q = the support row of the largest cosine with z1_i, found by a
    loop over every row (z1_i itself when the support is empty), detached; l_i = -log( exp(cos(q, p2_i) / t)
    / sum_j exp(cos(q, p2_j) / t) ); the same from view 2 against p1; the mean over all 2N terms.
    Float64 and differentiable in p1, p2 (nothing flows through a neighbour).
    """
    def neighbour(z: torch.Tensor) -> torch.Tensor:
        if not support:
            return z.detach()
        best, chosen = -math.inf, None
        for row in support:
            similarity = _cosine(z.detach(), row).item()
            if similarity > best:
                best, chosen = similarity, row
        return chosen.detach()

    terms = []
    for z, p_other in ((z1, p2), (z2, p1)):
        for i in range(len(z)):
            q = neighbour(z[i])
            scores = torch.stack([_cosine(q, p_other[j]) / temperature for j in range(len(p_other))])
            terms.append(-(scores[i] - torch.log(torch.exp(scores).sum())))
    return torch.stack(terms).mean()


def pil_simclr_transform(image_size: int, mean, std) -> T.Compose:
    """Reference for the SimCLR augmentation on one PIL image -> (3, S, S) float32, normalised.

    torchvision's own transforms with the CIFAR settings of the SimCLR paper (colour jitter
    strength 0.5, no blur); random numbers come from torch's global generator.
    """
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def pil_two_views(images: torch.Tensor, image_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for two augmented views: uint8 images (B, H, W, 3) -> ((B, 3, S, S), (B, 3, S, S)).

    One image at a time, as a DataLoader over a torchvision data set does: view 1 then view 2 of
    image 0, then of image 1, and so on.
    """
    transform = pil_simclr_transform(image_size, mean, std)
    pictures = [Image.fromarray(array) for array in images.numpy()]
    pairs = [(transform(picture), transform(picture)) for picture in pictures]   # view 1, then view 2
    return torch.stack([one for one, _ in pairs]), torch.stack([two for _, two in pairs])


# ----------------------------------------------------------------------------- training step

def naive_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, v1: torch.Tensor, v2: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Reference for one SimCLR training step, as the original tool wrote it -> the loss (detached).

    A forward pass per view (so each view has its own BatchNorm batch statistics), the naive loss
    on the projections, then zero_grad, backward and one optimizer (Adam) step; no autocast.
    """
    _, z1 = net(v1)
    _, z2 = net(v2)
    loss = naive_nt_xent(z1, z2, temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------- kNN

def brute_force_knn_scores(test: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                           k: int, temperature: float) -> list[list[float]]:
    """Reference for weighted kNN class scores: test (T, d), bank (N, d), labels (N,) -> T lists of C votes.

    For each test sample: the cosine similarity to every bank sample, the k most similar (all of
    them when k > N), and each of those adds exp(similarity / temperature) to its class's vote.
    """
    bank_rows = bank.double().tolist()
    labels = [int(y) for y in bank_labels]
    scores = []
    for x in test.double().tolist():
        sims = []
        for b in bank_rows:
            dot = sum(xi * bi for xi, bi in zip(x, b))
            sims.append(dot / (math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in b))))
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[labels[i]] += math.exp(sims[i] / temperature)
        scores.append(votes)
    return scores


def brute_force_knn_accuracy(test: torch.Tensor, test_labels: torch.Tensor, bank: torch.Tensor,
                             bank_labels: torch.Tensor, num_classes: int, k: int,
                             temperature: float) -> tuple[float, float]:
    """Reference for weighted kNN accuracy: percent of test samples whose label is the top class, and among the top 5."""
    top1 = top5 = 0
    for votes, y in zip(brute_force_knn_scores(test, bank, bank_labels, num_classes, k, temperature), test_labels):
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
    return 100 * top1 / len(test), 100 * top5 / len(test)
