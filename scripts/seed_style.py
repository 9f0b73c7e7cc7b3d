"""Reference run trained the way the original tool trained: one forward pass per view.

    python scripts/seed_style.py --dataset folder --data_root data/cifar10-jpg --arch resnet18 \
        --batch_size 256 --epochs 3 --k 200 --knn_temperature 0.1 --seed 0

Each step: two PIL-augmented views per image (augment.pil_transform, in DataLoader workers), the
encoder and head run on view 1, then on view 2 (so every BatchNorm sees each view alone), NT-Xent
on the concatenation [z1; z2], Adam 1e-3 with weight decay 1e-6, fp32, the last incomplete batch
dropped. After every epoch it prints the weighted kNN top-1/top-5 of the project's evaluation
(knn.knn_accuracy on encoder features h, running BatchNorm statistics). It imports only
library modules, never main.py, so it measures the two-pass semantics independently of the
one-pass training loop.

The random stream (batch order and views) is a DataLoader's by default (`--stream loader`: a
shuffling sampler, worker-seeded transforms), as in the original tool. `--stream project` draws
the batches and views exactly as `main.py --aug_backend pil` does for the same seed (the epoch
permutation and the per-image seeded views), so that the two scripts differ only in how the
step is computed: then their first steps give the same losses up to float rounding (after
that, equivalent runs drift apart as float rounding grows through Adam).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Iterable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library modules

from simclr.augment import AugmentConfig, normalize, pil_transform  # noqa: E402
from simclr.data import DATASETS, PilViews, collate_views, load_dataset  # noqa: E402
from simclr.model import ARCHS, SimCLR, nt_xent  # noqa: E402
from simclr.engine import Runtime, mix_seed, seed_everything  # noqa: E402
from simclr.knn import extract_features, knn_accuracy  # noqa: E402


class TwoViews(torch.utils.data.Dataset):
    """uint8 images (N, H, W, 3) -> (view 1, view 2), each (3, S, S), drawn independently."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        image = Image.fromarray(self.images[index].numpy())
        return self.transform(image), self.transform(image)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # PIL work is per image; torch threads in workers only contend


def train_epoch(model: SimCLR, loader, optimizer: torch.optim.Optimizer, temperature: float,
                device: torch.device) -> float:
    """One epoch of two-pass steps; returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    for views in loader:                                          # (2B, 3, S, S) = [view 1; view 2]
        view1, view2 = views.chunk(2)                             # each (B, 3, S, S)
        _, z1 = model(view1.to(device))                           # BatchNorm: view 1's statistics
        _, z2 = model(view2.to(device))                           # BatchNorm: view 2's statistics
        loss = nt_xent(torch.cat([z1, z2]), temperature)          # rows i and i+B are partners
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def loader_batches(images: torch.Tensor, transform, args) -> Callable[[int], Iterable[torch.Tensor]]:
    """epoch -> batches of views (2B, 3, S, S): a shuffling DataLoader with persistent workers."""
    loader = torch.utils.data.DataLoader(
        TwoViews(images, transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, worker_init_fn=_one_thread, collate_fn=collate_views,
        generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.workers > 0)
    return lambda epoch: loader


def project_batches(images: torch.Tensor, transform, args) -> Callable[[int], Iterable[torch.Tensor]]:
    """epoch -> batches of views (2B, 3, S, S) in main.py's order, with its per-image seeded views."""
    steps = len(images) // args.batch_size

    def batches(epoch: int) -> Iterable[torch.Tensor]:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix_seed(args.seed, epoch - 1)))
        sampler = [order[s * args.batch_size:(s + 1) * args.batch_size].tolist() for s in range(steps)]
        return torch.utils.data.DataLoader(PilViews(images, transform=transform, seed=args.seed, epoch=epoch - 1),
                                           batch_sampler=sampler,
                                           num_workers=args.workers, worker_init_fn=_one_thread,
                                           collate_fn=collate_views)
    return batches


def knn_top1_top5(model: SimCLR, bundle, k: int, knn_temperature: float, runtime: Runtime,
                  batch_size: int = 512) -> tuple[float, float]:
    """The project's weighted kNN of test images against the memory bank, on features h."""
    model.eval()
    to_input = lambda batch: normalize(batch, bundle.mean, bundle.std)  # noqa: E731
    bank = extract_features(model.encode, images=bundle.labeled.images, to_input=to_input, runtime=runtime,
                            batch_size=batch_size)
    test = extract_features(model.encode, images=bundle.test.images, to_input=to_input, runtime=runtime,
                            batch_size=batch_size)
    return knn_accuracy(test, test_labels=bundle.test.labels, bank_features=bank, bank_labels=bundle.labeled.labels,
                        num_classes=len(bundle.classes), k=k,
                        temperature=knn_temperature)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data_root", default="data")
    p.add_argument("--cache_dir", default=None, help="folder data: where the decoded-image cache goes")
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--feature_dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--knn_temperature", type=float, default=None, help="default: --temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stream", default="loader", choices=("loader", "project"),
                   help="batch order and views: a DataLoader's (the original way) or main.py's for this seed")
    args = p.parse_args()

    device = torch.device(args.device)
    bundle = load_dataset(args.dataset, args.data_root, cache_dir=args.cache_dir)
    seed_everything(args.seed)  # after loading, as main.py does: the same initial weights for a seed
    model = SimCLR(args.arch, feature_dim=args.feature_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    aug = AugmentConfig(image_size=bundle.image_size, mean=bundle.mean, std=bundle.std)
    make = project_batches if args.stream == "project" else loader_batches
    batches = make(bundle.train.images, pil_transform(aug), args)
    runtime = Runtime(device)
    knn_temperature = args.knn_temperature if args.knn_temperature is not None else args.temperature

    print(f"seed_style: {args.arch}, batch {args.batch_size}, {len(bundle.train) // args.batch_size} steps per "
          f"epoch, seed {args.seed}, {args.stream} stream", flush=True)
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, loader=batches(epoch), optimizer=optimizer, temperature=args.temperature,
                           device=device)
        seconds = time.perf_counter() - t0
        top1, top5 = knn_top1_top5(model, bundle=bundle, k=args.k, knn_temperature=knn_temperature, runtime=runtime)
        print(f"epoch {epoch}: loss {loss:.6f}, kNN top-1 {top1:.2f}% top-5 {top5:.2f}%, {seconds:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
