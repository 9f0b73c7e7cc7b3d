"""Weighted kNN (simclr.knn) against the brute-force reference in tests/references.py."""
import pytest
import torch

from references import brute_force_knn_accuracy, brute_force_knn_scores
from simclr.knn import cosine_topk, knn_accuracy, knn_scores, nearest_neighbors, topk_accuracy


def random_features(seed: int, bank_size: int, test_size: int, classes: int, dim: int = 16):
    """Gaussian features and uniform labels: (test, test_labels, bank, bank_labels)."""
    g = torch.Generator().manual_seed(seed)
    bank, test = torch.randn(bank_size, dim, generator=g), torch.randn(test_size, dim, generator=g)
    bank_labels = torch.randint(0, classes, (bank_size,), generator=g)
    test_labels = torch.randint(0, classes, (test_size,), generator=g)
    return test, test_labels, bank, bank_labels


# bank and test sets smaller and larger than the chunk size (chunks of test samples), k up to more
# than the bank holds, temperatures from sharp to flat
CASES = [(1, 0.5, 7, 120, 37), (10, 0.1, 1024, 120, 37), (50, 0.5, 3, 120, 37), (5, 0.05, 16, 10, 40),
         (200, 1.0, 16, 60, 9), (20, 0.2, 64, 300, 200)]


@pytest.mark.parametrize("k,t,chunk,bank_size,test_size", CASES)
def test_knn_scores_match_brute_force(k, t, chunk, bank_size, test_size):
    test, _, bank, bank_labels = random_features(k + bank_size, bank_size, test_size, 10)
    got = knn_scores(test, bank, bank_labels, 10, k, t, chunk_size=chunk)
    want = torch.tensor(brute_force_knn_scores(test, bank, bank_labels, 10, k, t), dtype=torch.float64)
    assert got.shape == (test_size, 10) and got.dtype == torch.float32
    # the product computes in fp32, the reference in float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(1).double(), want.sum(1), rtol=1e-5)  # min(k, N) votes each


@pytest.mark.parametrize("k,t,chunk,bank_size,test_size", CASES)
def test_knn_accuracy_matches_brute_force(k, t, chunk, bank_size, test_size):
    test, test_labels, bank, bank_labels = random_features(k + bank_size, bank_size, test_size, 10)
    got = knn_accuracy(test, test_labels, bank, bank_labels, 10, k, t, chunk_size=chunk)
    want = brute_force_knn_accuracy(test, test_labels, bank, bank_labels, 10, k, t)
    assert got == pytest.approx(want)


def test_knn_accuracy_with_fewer_classes_than_five_counts_every_sample_in_top5():
    test, test_labels, bank, bank_labels = random_features(4, 50, 20, 3)
    got = knn_accuracy(test, test_labels, bank, bank_labels, 3, 10, 0.5)
    assert got == pytest.approx(brute_force_knn_accuracy(test, test_labels, bank, bank_labels, 3, 10, 0.5))
    assert got[1] == 100.0


def test_knn_separable_data_scores_100_and_small_test_set():
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(6, 32) * 10
    bank_labels = torch.arange(6).repeat(20)
    bank = centres[bank_labels] + 0.1 * torch.randn(120, 32, generator=g)
    test_labels = torch.tensor([4, 1, 5])  # fewer test images than the chunk size
    test = centres[test_labels] + 0.1 * torch.randn(3, 32, generator=g)
    top1, top5 = knn_accuracy(test, test_labels, bank, bank_labels, 6, 200, 0.5, chunk_size=1024)
    assert top1 == 100.0 and top5 == 100.0


def test_knn_weights_votes_by_similarity():
    # one very close neighbour of class 1 must outvote two far ones of class 0 at low temperature
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bank_labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(test, bank, bank_labels, 2, 3, 0.05)
    assert scores.argmax().item() == 1
    assert topk_accuracy(scores, torch.tensor([1]), (1,)) == [100.0]
    # at a high temperature the votes flatten and the two of class 0 win
    assert knn_scores(test, bank, bank_labels, 2, 3, 10.0).argmax().item() == 0


def test_nearest_neighbors_match_brute_force_and_refuse_k_beyond_the_bank():
    test, _, bank, _ = random_features(5, 40, 12, 2)
    indices, sims = nearest_neighbors(test, bank, 4, chunk_size=5)
    full = torch.nn.functional.normalize(test.double(), dim=1) @ torch.nn.functional.normalize(bank.double(), dim=1).T
    want = full.topk(4, dim=1)
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(sims.double(), want.values, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k must be in 1..40"):
        nearest_neighbors(test, bank, 41)


def test_cosine_topk_of_an_empty_query():
    sims, idx = cosine_topk(torch.zeros(0, 4), torch.randn(10, 4), 3)
    assert sims.shape == (0, 3) and idx.shape == (0, 3)


def test_topk_accuracy_of_an_empty_test_set_is_nan():
    top1, top5 = topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert top1 != top1 and top5 != top5
