"""embed.py: which test images, the 2-D coordinates (PCA against a reference SVD, t-SNE), files and errors."""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import embed
import main
from conftest import TINY_WIDTH, tiny_run_args
from simclr import feature_map
from simclr.checkpoint import open_run
from simclr.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """results dir of a 1-epoch tiny CPU run named 'tiny' (2 steps: the weights only need to exist)."""
    results = tmp_path_factory.mktemp("embed") / "results"
    assert main.main(tiny_run_args(tiny_folder, results, "tiny", train_subset=16)) == 0  # 2 steps
    return results


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


# ----------------------------------------------------------------------------- which test images

def counts(labels, picked, classes):
    return [int((labels[picked] == c).sum()) for c in range(classes)]


def test_balanced_sample_fills_every_class_in_turn():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 50)[torch.randperm(62, generator=torch.Generator().manual_seed(5))]
    picked = feature_map.balanced_sample(labels, 12, seed=0)
    assert counts(labels, picked, 3) == [5, 2, 5]  # class 1 has only 2; the others share the rest equally
    assert picked.tolist() == sorted(set(picked.tolist()))  # distinct, sorted
    assert counts(labels, feature_map.balanced_sample(labels, 40, seed=3), 3) == [10, 2, 28]
    assert torch.equal(picked, feature_map.balanced_sample(labels, 12, seed=0))  # fixed by the seed
    assert not torch.equal(feature_map.balanced_sample(labels, 12, seed=1), picked)
    assert torch.equal(feature_map.balanced_sample(labels, None, 0), torch.arange(62))
    assert torch.equal(feature_map.balanced_sample(labels, 100, 0), torch.arange(62))


def test_balanced_sample_gives_the_remainder_to_seeded_classes():
    labels = torch.arange(3).repeat(6)  # 6 per class
    extra = set()
    for seed in range(10):
        got = counts(labels, feature_map.balanced_sample(labels, 7, seed), 3)
        assert sorted(got) == [2, 2, 3]
        extra.add(got.index(3))
    assert len(extra) > 1  # not always the first class


# ----------------------------------------------------------------------------- coordinates

def test_pca_agrees_with_a_reference_svd_up_to_sign():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2]) + 7.0
    coords, share = feature_map.pca_2d(x)
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    reference = u[:, :2] * s[:2]
    assert coords.shape == (60, 2) and share.shape == (2,)
    for axis in range(2):
        sign = np.sign(coords[:, axis].numpy() @ reference[:, axis])
        np.testing.assert_allclose(coords[:, axis].numpy(), sign * reference[:, axis], atol=1e-4, rtol=1e-4)
        assert coords[:, axis].abs().argmax() == coords[:, axis].argmax()  # the sign convention
    np.testing.assert_allclose(share.numpy(), s[:2] ** 2 / (s ** 2).sum(), rtol=1e-5)
    # a flipped input gives the same picture: the sign is fixed by the data, not by LAPACK
    assert torch.allclose(feature_map.pca_2d(-x)[0], coords, atol=1e-4)


def test_class_agreement_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    points, labels = torch.randn(40, 2, generator=g), torch.randint(0, 3, (40,), generator=g)
    hits = 0
    for i in range(40):
        others = sorted((float((points[i] - points[j]).norm()), j) for j in range(40) if j != i)
        hits += sum(int(labels[j] == labels[i]) for _, j in others[:5])
    assert feature_map.class_agreement(points, labels, k=5, chunk=7) == pytest.approx(100 * hits / 200)
    two = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    assert feature_map.class_agreement(two, torch.tensor([0, 0, 1, 1]), k=1) == 100.0


def test_tsne_coordinates_are_finite_one_per_point():
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(60, 16, generator=g) + 3 * torch.eye(16)[torch.arange(60) % 3], dim=1)
    coords = feature_map.tsne_2d(x, feature_map.usable_perplexity(30.0, 60), seed=0, threads=1)
    assert coords.shape == (60, 2) and torch.isfinite(coords).all()
    assert torch.equal(coords, feature_map.tsne_2d(x, feature_map.usable_perplexity(30.0, 60), seed=0, threads=1))  # seeded
    assert feature_map.usable_perplexity(30.0, 60) == pytest.approx(59 / 3)
    # three well separated groups stay separated in the map
    assert feature_map.class_agreement(coords, torch.arange(60) % 3, k=5) > 90


def test_sprite_fits_tensorboards_limit():
    small = feature_map.sprite_images(torch.zeros(10, 16, 16, 3, dtype=torch.uint8))
    assert small.shape == (10, 3, 16, 16)
    big = feature_map.sprite_images(torch.full((10_000, 96, 96, 3), 255, dtype=torch.uint8))
    assert big.shape == (10_000, 3, 81, 81) and 100 * 81 <= feature_map.SPRITE_MAX  # 100 x 100 thumbnails
    assert torch.allclose(big[:2], torch.ones(2, 3, 81, 81))


# ----------------------------------------------------------------------------- the script on a tiny run

def test_pca_map_of_every_test_image(tiny_run, tiny_folder, capsys):
    out = tiny_run / "map.png"
    assert embed.main(["--model_path", str(tiny_run / "tiny_model.pth"), "--method", "pca", "--device", "cpu",
                       "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    rows = read_csv(tiny_run / "map.csv")
    bundle = load_dataset("folder", str(tiny_folder), 16, log=lambda *a: None)
    assert [int(r["index"]) for r in rows] == list(range(18))  # one point per test image
    assert [int(r["label"]) for r in rows] == bundle.test.labels.tolist()
    assert [r["class"] for r in rows] == [bundle.classes[int(r["label"])] for r in rows]
    coords = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert np.isfinite(coords).all()

    # the same coordinates from features computed here: eval mode, normalised input, L2-normalised h, numpy SVD
    model, _ = open_run(str(tiny_run / "tiny_model.pth"))
    mean, std = torch.tensor(bundle.mean)[:, None, None], torch.tensor(bundle.std)[:, None, None]
    with torch.no_grad():
        h = model.eval().encode((bundle.test.images.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    x = F.normalize(h, dim=1).double().numpy()
    u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    for axis in range(2):
        reference = u[:, axis] * s[axis]
        np.testing.assert_allclose(np.abs(coords[:, axis]), np.abs(reference), atol=1e-4)
    assert png_size(out) == (1000, 800)


def test_tsne_map_of_a_balanced_sample_with_thumbnails(tiny_run):
    argv = ["--model_path", str(tiny_run / "tiny_model.pth"), "--n", "9", "--seed", "4", "--thumbnails",
            "--device", "cpu", "--threads", "1"]
    assert embed.main(argv) == 0
    rows = read_csv(tiny_run / "tiny_embed_tsne_n9_thumbnails.csv")  # the default names say --n and --thumbnails
    assert len(rows) == 9 and len({r["index"] for r in rows}) == 9
    assert sorted(sum(r["class"] == c for r in rows) for c in ("cat", "dog", "frog")) == [3, 3, 3]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("x", "y"))
    assert png_size(tiny_run / "tiny_embed_tsne_n9_thumbnails.png") == (1000, 800)
    first = [r["index"] for r in rows]
    assert embed.main([*argv[:5], "5", *argv[6:]]) == 0
    assert [r["index"] for r in read_csv(tiny_run / "tiny_embed_tsne_n9_thumbnails.csv")] != first  # another seed, other images


def test_projector_files_for_tensorboard(tiny_run, tmp_path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    logdir = tmp_path / "tb"
    assert embed.main(["--model_path", str(tiny_run / "tiny_model.pth"), "--method", "pca", "--n", "6",
                       "--device", "cpu", "--out", str(tmp_path / "m.png"), "--tensorboard",
                       "--tensorboard_dir", str(logdir)]) == 0
    config = text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (info,) = config.embeddings
    assert info.tensor_name.startswith("encoder_h")
    tensors = np.loadtxt(logdir / info.tensor_path, delimiter="\t")
    assert tensors.shape == (6, TINY_WIDTH) and np.isfinite(tensors).all()
    metadata = (logdir / info.metadata_path).read_text().splitlines()
    assert metadata[0].split("\t") == ["class", "label", "test_index"] and len(metadata) == 7
    rows = read_csv(tmp_path / "m.csv")
    assert [line.split("\t")[2] for line in metadata[1:]] == [r["index"] for r in rows]
    assert list(info.sprite.single_image_dim) == [16, 16]
    assert png_size(logdir / info.sprite.image_path) == (48, 48)  # ceil(sqrt(6)) = 3 thumbnails per side


@pytest.mark.parametrize("extra,needle", [
    (["--method", "umap"], "--method"),
    (["--n", "2"], "--n"),
    (["--perplexity", "0"], "--perplexity"),
])
def test_bad_flags_exit_2_with_one_line(tiny_run, tmp_path, capsys, extra, needle):
    out = tmp_path / "m.png"
    assert embed.main(["--model_path", str(tiny_run / "tiny_model.pth"), "--device", "cpu", "--out", str(out),
                       *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()


def test_bad_files_exit_2(tiny_run, tmp_path, capsys):
    garbage = tmp_path / "garbage_model.pth"
    garbage.write_bytes(b"not a checkpoint")
    config = str(tiny_run / "tiny_config.json")
    for argv, needle in ((["--model_path", str(tmp_path / "missing_model.pth"), "--config", config], "no such file"),
                         (["--model_path", str(garbage), "--config", config], "is damaged"),
                         ([], "--model_path is required")):
        assert embed.main([*argv, "--method", "pca", "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and needle in err[-1], (argv, err)


def test_importing_does_nothing_and_stays_light():
    code = ("import sys, embed, main, linear, simclr.tblog; "
            "assert not [m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard', "
            "'openTSNE', 'sklearn'))], 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
