"""Result pictures: the per-run curves, the comparison of several runs, and the nearest-neighbour grid."""
import glob
import os
import shlex
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from conftest import tiny_run_args
import neighbors
import plot
from simclr import curves, neighbor_grid
from simclr.names import PRETRAIN_COLUMNS
from simclr.checkpoint import open_run
from simclr.data import load_dataset
from simclr.knn import nearest_neighbors
from simclr.model import SimCLR
from simclr.engine import Runtime

ROWS = [{"epoch": 1, "train_loss": 5.1, "test_acc@1": 30.0, "test_acc@5": 70.0},
        {"epoch": 2, "train_loss": 4.8, "test_acc@1": None, "test_acc@5": None},  # an epoch without kNN
        {"epoch": 3, "train_loss": 4.6, "test_acc@1": 41.5, "test_acc@5": 80.0}]
CSV_HEADER = "epoch,train_loss,test_acc@1,test_acc@5,lr,epoch_seconds,train_images_per_second,knn_seconds\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after PIL has fully decoded it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here, not at open
        return image.size


def no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def write_csv(path, rows) -> str:
    lines = [f"{r['epoch']},{r['train_loss']},{'' if r['test_acc@1'] is None else r['test_acc@1']},"
             f"{'' if r['test_acc@5'] is None else r['test_acc@5']},0.001,1.0,100.0,0.5\n" for r in rows]
    path.write_text(CSV_HEADER + "".join(lines))
    return str(path)


# ----------------------------------------------------------------------------- plot_run

def test_plot_run_writes_a_png_of_the_figure_size(tmp_path):
    path = tmp_path / "run_curves.png"
    curves.plot_run(ROWS, str(path), "run")
    assert png_size(path) == (1000, 400)  # figsize (10, 4) at 100 dpi
    assert no_temp_files(tmp_path)


def test_plot_run_second_write_replaces_the_file(tmp_path):
    path = tmp_path / "run_curves.png"
    curves.plot_run(ROWS[:1], str(path), "run")
    first = path.read_bytes()
    curves.plot_run(ROWS, str(path), "run")
    assert path.read_bytes() != first
    assert png_size(path) == (1000, 400) and no_temp_files(tmp_path)


def test_plot_run_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run_curves.png"
    curves.plot_run(ROWS, str(path), "run")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)  # dies at the very last moment of the second write
    with pytest.raises(OSError, match="disk full"):
        curves.plot_run(ROWS[:1], str(path), "other title")
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_plot_run_with_linear_keys(tmp_path):
    rows = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "test_acc@1": 10.0 * e, "test_acc@5": 20.0 * e}
            for e in (1, 2)]
    path = tmp_path / "lin.png"
    curves.plot_run(rows, str(path), "linear", acc_label="linear accuracy (%)")
    assert png_size(path) == (1000, 400)


def _right_panel_labels(rows, monkeypatch) -> list[str]:
    """The legend labels of plot_run's accuracy panel for `rows` (the figure caught before it is saved)."""
    drawn = []
    monkeypatch.setattr(curves, "save", lambda fig, path: drawn.append(fig))
    curves.plot_run(rows, "unused.png", "run")
    right = drawn[0].axes[1]
    assert ("online probe" in right.get_ylabel()) == ("online probe top-1" in right.get_legend_handles_labels()[1])
    return right.get_legend_handles_labels()[1]


def test_plot_run_draws_the_online_probe_where_the_rows_have_it(monkeypatch):
    with_probe = [{**r, "probe_acc@1": None if r["test_acc@1"] is None else r["test_acc@1"] - 5, "probe_acc@5": None}
                  for r in ROWS]
    assert _right_panel_labels(with_probe, monkeypatch) == ["test acc@1", "test acc@5", "online probe top-1"]
    no_figures = [{**r, "probe_acc@1": float("nan")} for r in ROWS]  # the probe's columns empty: no line
    assert _right_panel_labels(no_figures, monkeypatch) == ["test acc@1", "test acc@5"]
    assert _right_panel_labels(ROWS, monkeypatch) == ["test acc@1", "test acc@5"]


# ----------------------------------------------------------------------------- plot.py

def test_compare_one_and_several_runs(tmp_path, capsys):
    a = write_csv(tmp_path / "a_statistics.csv", ROWS)
    b = write_csv(tmp_path / "b_statistics.csv", ROWS[:2])
    for paths, out in (([a], tmp_path / "one.png"), ([a, b], tmp_path / "two.png")):
        assert plot.main([*paths, "--out", str(out)]) == 0
        assert png_size(out) == (1100, 450)  # figsize (11, 4.5) at 100 dpi
        assert f"wrote {out}" in capsys.readouterr().out
    assert no_temp_files(tmp_path)


def test_compare_reads_main_py_statistics(tmp_path):
    from simclr.files import atomic_write_csv
    path = tmp_path / "r_statistics.csv"
    atomic_write_csv(str(path), PRETRAIN_COLUMNS, ROWS)
    rows = plot.read_statistics(str(path)).rows
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1]["test_acc@1"] is None
    assert plot.run_name(str(path)) == "r"


def test_compare_default_out_in_cwd(tmp_path, monkeypatch):
    a = write_csv(tmp_path / "a_statistics.csv", ROWS)
    monkeypatch.chdir(tmp_path)
    assert plot.main([a]) == 0
    assert png_size(tmp_path / "compare.png") == (1100, 450)


@pytest.mark.parametrize("content,needle", [
    ("epoch,loss\n1,2.0\n", "lacks the columns train_loss, test_acc@1, test_acc@5"),
    ("", "not a readable CSV"),
])
def test_compare_rejects_a_csv_without_the_columns(tmp_path, capsys, content, needle):
    good = write_csv(tmp_path / "a_statistics.csv", ROWS)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    out = tmp_path / "c.png"
    assert plot.main([good, str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err and str(bad) in err, err
    assert not out.exists()


def test_compare_missing_file_exits_2(tmp_path, capsys):
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "nope_statistics.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file" in err, err
    assert not out.exists()


def test_compare_unwritable_out_exits_2(tmp_path, capsys):
    a = write_csv(tmp_path / "a_statistics.csv", ROWS)
    assert plot.main([a, "--out", str(tmp_path)]) == 2  # a directory cannot be replaced by a file
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot write"), err
    assert no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- plot.py: what it reads and writes

LINEAR_HEADER = "epoch,train_loss,train_acc@1,train_acc@5,test_loss,test_acc@1,test_acc@5,lr,epoch_seconds\n"


def one_error_line(capsys, code) -> str:
    """The only stderr line of a refused command (exit 2), with no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


@pytest.fixture
def drawn(monkeypatch):
    """What each plot.main call drew: its title, legend texts and the loss panel's points per line."""
    figures = []
    real_save = plot.save

    def record(fig, path, *args):
        left, right = fig.axes
        figures.append({"title": fig.get_suptitle(),
                        "labels": [t.get_text().replace("\\$", "$") for t in right.get_legend().get_texts()],
                        "loss": [list(zip(line.get_xdata(), line.get_ydata())) for line in left.lines]})
        real_save(fig, path, *args)
    monkeypatch.setattr(plot, "save", record)
    return figures


def test_compare_refuses_an_out_that_is_an_input_or_not_a_figure(tmp_path, capsys):
    run = tmp_path / "results"
    run.mkdir()
    a = write_csv(run / "a_statistics.csv", ROWS)
    for name in ("a_model.pth", "a_last.pth", "a_config.json", "a_linear_statistics.csv"):
        (run / name).write_bytes(b"keep me " + name.encode())
    (run / "link.png").symlink_to("a_statistics.csv")
    os.link(a, run / "hard.png")
    (run / "figures.png").mkdir()
    os.mkfifo(run / "pipe.png")
    (run / "old.png").write_bytes(b"an old figure")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "pipe.png"}
    cases = [(a, f"is the input {a}"),
             (str(run / "a_model.pth"), "never a run's .csv, .pth or .json"),
             (str(run / "a_last.pth"), ".png, .pdf or .svg"),
             (str(run / "a_config.json"), ".png, .pdf or .svg"),
             (str(run / "a_linear_statistics.csv"), ".png, .pdf or .svg"),
             (str(run / "link.png"), f"is the input {a}"),  # a symlink to the input
             (str(run / "hard.png"), f"is the input {a}"),  # a second name of the input
             (str(run / "figures.png"), "it is a directory"),
             (str(run / "pipe.png"), "not a regular file"),
             (str(run / "a_model.pth" / "x.png"), "is a file, not a folder")]
    for out, needle in cases:
        assert needle in one_error_line(capsys, plot.main([a, "--out", out])), out
    # a CSV named like a figure is refused as --out by its real path, however it is spelled
    fig_named = run / "b.png"
    fig_named.write_text((run / "a_statistics.csv").read_text())
    for spelling in (str(fig_named), str(run / "." / "b.png"), str(run / ".." / "results" / "b.png")):
        assert "is the input" in one_error_line(capsys, plot.main([str(fig_named), "--out", spelling])), spelling
    assert fig_named.read_text() == (run / "a_statistics.csv").read_text()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before} == before
    assert (run / "link.png").is_symlink() and (run / "pipe.png").is_fifo() and no_temp_files(run)
    assert plot.main([a, "--out", str(run / "old.png")]) == 0  # an existing figure is replaced, as asked
    assert png_size(run / "old.png") == (1100, 450)


@pytest.mark.parametrize("name,magic", [("c.png", b"\x89PNG"), ("c.PNG", b"\x89PNG"), ("c.pdf", b"%PDF"),
                                        ("new/folder/c.svg", b"<?xml")])
def test_compare_writes_the_format_its_out_names(tmp_path, name, magic):
    a = write_csv(tmp_path / "a_statistics.csv", ROWS)
    assert plot.main([a, "--out", str(tmp_path / name)]) == 0  # a folder that does not exist yet is made
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_the_readme_glob_draws_main_py_runs_and_says_how_to_draw_the_probes(tmp_path, capsys, drawn, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    for name in ("a", "b"):
        write_csv(results / f"{name}_statistics.csv", ROWS)
        (results / f"{name}_linear_statistics.csv").write_text(LINEAR_HEADER + "1,2.0,30,80,2.1,31,81,0.1,1.0\n")
    monkeypatch.chdir(tmp_path)
    paths = sorted(glob.glob("results/*_statistics.csv"))  # as the shell expands it: a probe's CSV comes first
    assert paths[0] == "results/a_linear_statistics.csv"
    assert plot.main([*paths, "--out", "compare.png"]) == 0
    assert drawn[-1]["title"] == "2 runs (main.py statistics)" and drawn[-1]["labels"] == ["a", "b"]
    err = capsys.readouterr().err.strip()
    command = "python plot.py results/*_linear_statistics.csv --out compare_linear.png"
    assert len(err.splitlines()) == 1 and err.startswith("skipped 2 linear.py probe CSVs") and err.endswith(command)
    argv = [m for arg in shlex.split(command)[2:] for m in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
    assert plot.main(argv) == 0  # the command as the shell runs it
    assert drawn[-1]["title"] == "2 runs (linear.py probe)" and drawn[-1]["labels"] == ["a_linear", "b_linear"]


def test_compare_without_main_py_runs_draws_the_first_kind(tmp_path, capsys, drawn):
    linear = tmp_path / "x_linear_statistics.csv"
    linear.write_text(LINEAR_HEADER + "1,2.0,30,80,2.1,31,81,0.1,1.0\n")
    tuned = tmp_path / "x_finetune_0.1_statistics.csv"
    tuned.write_text("epoch,train_loss,train_acc@1,test_acc@1,test_acc@5\n1,2.0,30,31,81\n")
    assert plot.main([str(linear), str(tuned), "--out", str(tmp_path / "c.png")]) == 0
    assert drawn[-1]["title"] == "1 run (linear.py probe)"
    err = capsys.readouterr().err.strip()
    assert err == (f"skipped {tuned} (a finetune.py CSV): this figure draws linear.py probe CSVs; to draw it: "
                   f"python plot.py {tuned} --out {tmp_path / 'c_finetune.png'}")


def test_legend_entries_are_the_shortest_path_that_tells_runs_apart(tmp_path):
    paths = [str(tmp_path / d / "results" / "x_statistics.csv") for d in ("exp1/a", "exp2/a", "exp1/b")]
    paths.append(str(tmp_path / "exp1" / "a" / "results" / "y_statistics.csv"))
    assert plot.legend_labels(paths) == ["exp1/a/results/x", "exp2/a/results/x", "b/results/x", "y"]
    # one NAME from two files of one folder: the file names tell them apart
    same = [str(tmp_path / "x_statistics.csv"), str(tmp_path / "x.csv")]
    assert plot.legend_labels(same) == ["x_statistics.csv", "x.csv"]
    assert plot.legend_labels(["/x_statistics.csv", "/r/x_statistics.csv"]) == ["/x", "r/x"]


def test_compare_draws_a_distinct_legend_entry_per_run(tmp_path, capsys, drawn):
    paths = []
    for folder in ("one/a/results", "two/a/results"):  # the same two folders deep
        (tmp_path / folder).mkdir(parents=True)
        paths.append(write_csv(tmp_path / folder / "x_statistics.csv", ROWS))
    paths.append(write_csv(tmp_path / "_hidden_statistics.csv", ROWS))  # matplotlib hides labels that start with _
    paths.append(write_csv(tmp_path / "$x$_statistics.csv", ROWS))  # not mathtext
    again = os.path.join(os.path.dirname(paths[0]), ".", "x_statistics.csv")
    assert plot.main([*paths, again, "--out", str(tmp_path / "c.png")]) == 0
    assert drawn[-1]["labels"] == ["one/a/results/x", "two/a/results/x", "_hidden", "$x$"]
    assert capsys.readouterr().err.strip() == f"note: {again} is {paths[0]} again: drawn once"


def test_compare_says_which_rows_it_leaves_out_and_draws_the_rest(tmp_path, capsys, drawn):
    good = write_csv(tmp_path / "good_statistics.csv", ROWS)
    bad = tmp_path / "bad_statistics.csv"
    bad.write_text(CSV_HEADER[:38] + "\n1,5.0,30,70\nnan,4.9,31,71\n3,inf,32,72\n4,4.7,-inf,73\n5,4.6,34,NaN\n"
                   "6,1e308,35,76\n,4.5,36,77\n8,4.4,37,78\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot.main([good, str(bad), "--out", str(tmp_path / "c.png")]) == 0
    assert not caught, [str(w.message) for w in caught]
    assert drawn[-1]["loss"][1] == [(1.0, 5.0), (8.0, 4.4)]
    err = capsys.readouterr().err.strip()
    assert err == (f"note: {bad}: 6 rows left out (lines 3, 4, 5, 6, 7, ...): no epoch, or a NaN, infinite or huge "
                   f"(beyond 3.4e38) value; the other rows are drawn")
    assert png_size(tmp_path / "c.png") == (1100, 450)


@pytest.mark.parametrize("value", ["1e308", "-1e308", "3.5e38"])
def test_huge_finite_values_draw_without_a_warning(tmp_path, capsys, value):
    path = tmp_path / "r_statistics.csv"
    path.write_text(CSV_HEADER[:38] + f"\n1,5.0,30,70\n2,{value},31,71\n{value},4.0,40,80\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot.main([str(path), "--out", str(tmp_path / "c.png")]) == 0
    assert not caught, [str(w.message) for w in caught]
    assert f"note: {path}: 2 rows left out (lines 3, 4)" in capsys.readouterr().err
    # float32's largest values are still drawn, without a warning either
    path.write_text(CSV_HEADER[:38] + "\n1,3.4e38,-3.4e38,70\n-3.4e38,4.0,3.4e38,80\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot.main([str(path), "--out", str(tmp_path / "c.png")]) == 0
    assert not caught and capsys.readouterr().err == ""


def test_compare_refuses_a_fifo_or_a_folder_before_opening_it(tmp_path, capsys):
    fifo = tmp_path / "f_statistics.csv"
    os.mkfifo(fifo)
    # a writer that sends nothing stands by, so that a read that was let through ends instead of waiting for ever:
    # it polls without blocking (a blocking open would wait for ever when no reader ever comes)
    done = threading.Event()

    def writer() -> None:
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is there: give it an EOF
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.01)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    out = tmp_path / "c.png"
    err = one_error_line(capsys, plot.main([str(fifo), "--out", str(out)]))
    done.set()
    thread.join()
    assert "is not a regular file (a FIFO" in err
    err = one_error_line(capsys, plot.main([str(tmp_path), "--out", str(out)]))
    assert f"{tmp_path} is a directory" in err and "*_statistics.csv" in err
    assert not out.exists()


def one_error_line_after_notes(capsys, code) -> str:
    """The last stderr line of a refused command (exit 2): the only error, after notes, with no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [line for line in err if line.startswith("error:")] == err[-1:], err
    assert not [line for line in err[:-1] if not line.startswith("note:")], err
    return err[-1]


def test_compare_of_rows_yet_to_come(tmp_path, capsys, drawn):
    header_only = tmp_path / "new_statistics.csv"
    header_only.write_text(CSV_HEADER)
    out = tmp_path / "c.png"
    assert "nothing to draw" in one_error_line_after_notes(capsys, plot.main([str(header_only), "--out", str(out)]))
    assert not out.exists()
    good = write_csv(tmp_path / "good_statistics.csv", ROWS)
    assert plot.main([str(header_only), good, "--out", str(out)]) == 0
    assert drawn[-1]["labels"] == ["good"]
    assert f"note: {header_only} has no rows yet" in capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [
    (b"", "not a readable CSV: it is empty"),
    (b"\x80\x02ctorch\xff\xfe", "not a readable CSV"),  # weights given as a CSV
    (b"a,b,c\n1,2,3\n", "lacks the columns epoch, train_loss"),  # a CSV of another tool
    (b"epoch,train_loss,test_acc@1,test_acc@5\n1,2,3,4,5\n", "line 2 has 5 cells, the header 4"),
    (b"epoch,train_loss,test_acc@1,test_acc@5\n1,NA,3,4\n", "non-numeric value 'NA' (line 2)"),
])
def test_compare_refuses_what_is_not_a_statistics_csv(tmp_path, capsys, content, needle):
    path = tmp_path / "x_statistics.csv"
    path.write_bytes(content)
    out = tmp_path / "c.png"
    err = one_error_line(capsys, plot.main([str(path), "--out", str(out)]))
    assert needle in err and str(path) in err, err
    assert not out.exists()


def test_compare_reads_a_byte_order_mark_and_short_rows(tmp_path, drawn):
    path = tmp_path / "x_statistics.csv"
    path.write_bytes("\ufeffepoch,train_loss,test_acc@1,test_acc@5\n1,2.0\n\n2,1.5,40,80\n".encode())
    assert plot.main([str(path), "--out", str(tmp_path / "c.png")]) == 0
    assert drawn[-1]["loss"] == [[(1.0, 2.0), (2.0, 1.5)]]


def test_compare_unreadable_file_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_csv(tmp_path / "x_statistics.csv", ROWS)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(plot, "open", denied, raising=False)  # root reads any file: the error is made here
    assert one_error_line(capsys, plot.main([path, "--out", str(tmp_path / "c.png")])) == \
        f"error: cannot read {path}: Permission denied"


# ----------------------------------------------------------------------------- neighbors: the search

def brute_force(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-k by cosine, one pair at a time in float64: (n, d), (N, d) -> (n, k), (n, k)."""
    indices, similarities = [], []
    for q in query.double():
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank.double()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        indices.append(order)
        similarities.append([sims[j] for j in order])
    return torch.tensor(indices), torch.tensor(similarities, dtype=torch.float64)


def assert_same_neighbors(query, bank, indices, similarities, k):
    """indices/similarities are a correct cosine top-k of query against bank (ties may be ordered either way)."""
    ref_idx, ref_sim = brute_force(query, bank, k)
    assert indices.shape == similarities.shape == (query.shape[0], k)
    assert indices.dtype == torch.long and similarities.dtype == torch.float32
    # the chosen similarities are the k largest ...
    torch.testing.assert_close(similarities.double(), ref_sim, atol=1e-5, rtol=0)
    # ... and really belong to the chosen bank rows
    actual = F.cosine_similarity(query.double()[:, None], bank.double()[indices], dim=2)
    torch.testing.assert_close(actual, ref_sim, atol=1e-5, rtol=0)
    gaps = (ref_sim[:, :-1] - ref_sim[:, 1:]).abs().min() if k > 1 else torch.tensor(1.0)
    if gaps > 1e-4:  # no near-ties: the order must be exactly the reference's
        assert torch.equal(indices, ref_idx)


def test_nearest_neighbors_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 7, generator=g) * torch.rand(50, 1, generator=g) * 5  # norms vary: cosine, not dot
    query = torch.randn(9, 7, generator=g)
    indices, similarities = nearest_neighbors(query, bank, 6, chunk_size=4)  # several chunks
    assert_same_neighbors(query, bank, indices, similarities, 6)


def test_nearest_neighbors_finds_itself_and_checks_k():
    bank = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    indices, similarities = nearest_neighbors(bank[[3, 11]] * 7, bank, 1)
    assert indices.flatten().tolist() == [3, 11]
    torch.testing.assert_close(similarities, torch.ones(2, 1))
    with pytest.raises(ValueError):
        nearest_neighbors(bank[:1], bank, 21)


def test_pick_queries_is_seeded_and_distinct():
    a, b = neighbor_grid.pick_queries(100, 8, 0), neighbor_grid.pick_queries(100, 8, 0)
    assert torch.equal(a, b) and len(set(a.tolist())) == 8
    assert not torch.equal(a, neighbor_grid.pick_queries(100, 8, 1))


# ----------------------------------------------------------------------------- neighbors: a tiny run

@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """results dir of a 1-epoch tiny CPU run named 'tiny'."""
    results = tmp_path_factory.mktemp("neighbors") / "results"
    assert main.main(tiny_run_args(tiny_folder, results, "tiny", train_subset=16)) == 0  # 2 steps
    return results


def test_find_neighbors_matches_brute_force_on_a_trained_model(tiny_run, tiny_folder):
    model, _ = open_run(str(tiny_run / "tiny_model.pth"))
    bundle = load_dataset("folder", str(tiny_folder), 16, log=lambda *a: None)
    result = neighbor_grid.find_neighbors(model, bundle, 5, 4, seed=3, runtime=Runtime(torch.device("cpu")), batch_size=7)
    assert torch.equal(result.queries, neighbor_grid.pick_queries(len(bundle.test.labels), 5, 3))

    # features computed here independently: normalised float input, encoder in eval mode, no batching
    mean, std = torch.tensor(bundle.mean)[:, None, None], torch.tensor(bundle.std)[:, None, None]
    to_input = lambda u8: (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std  # noqa: E731
    model.eval()
    with torch.no_grad():
        query = model.encode(to_input(bundle.test.images[result.queries]))
        bank = model.encode(to_input(bundle.labeled.images))
    assert_same_neighbors(query, bank, result.indices, result.similarities, 4)


def test_neighbors_script_writes_the_grid(tiny_run, capsys):
    out = tiny_run / "grid.png"
    argv = ["--model_path", str(tiny_run / "tiny_model.pth"), "--n", "4", "--k", "5", "--device", "cpu",
            "--out", str(out)]
    assert neighbors.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    # 16-px images are shown 6x (96 px) in a 4-px frame: 104-px cells, 30 px of text under each
    assert neighbor_grid.grid_size(4, 5, 16) == (686, 610)
    assert png_size(out) == (686, 610)
    first = out.read_bytes()
    assert neighbors.main([*argv, "--seed", "1"]) == 0  # other test images replace the file
    assert out.read_bytes() != first and png_size(out) == (686, 610)
    assert no_temp_files(tiny_run)


def test_grid_borders_show_whether_the_class_matches(tiny_folder, tmp_path):
    bundle = load_dataset("folder", str(tiny_folder), 16, log=lambda *a: None)  # 16 per class: cat, dog, frog
    result = neighbor_grid.Neighbors(queries=torch.tensor([0, 6]), indices=torch.tensor([[1, 20], [17, 40]]),
                                 similarities=torch.tensor([[0.9, 0.5], [0.8, -0.1]]))
    path = tmp_path / "grid.png"
    path.write_bytes(neighbor_grid.draw_neighbors(bundle, result, "borders"))
    assert png_size(path) == neighbor_grid.grid_size(2, 2, 16)
    image = Image.open(path).convert("RGB")
    cell = neighbor_grid.tile_side(16) + 2 * neighbor_grid.BORDER
    top = lambda row: neighbor_grid.HEADER + row * (cell + neighbor_grid.LABEL + neighbor_grid.PAD)  # noqa: E731
    left = lambda col: neighbor_grid.MARGIN + cell + neighbor_grid.GAP + col * (cell + neighbor_grid.PAD)  # noqa: E731
    q_labels = bundle.test.labels[result.queries]
    for row in range(2):
        assert image.getpixel((neighbor_grid.MARGIN + 1, top(row) + 1)) == neighbor_grid.QUERY_COLOUR
        # the query's pixels are shown as stored (top-left pixel of the upscaled image)
        q = int(result.queries[row])
        assert image.getpixel((neighbor_grid.MARGIN + neighbor_grid.BORDER, top(row) + neighbor_grid.BORDER)) == \
            tuple(bundle.test.images[q, 0, 0].tolist())
        for col in range(2):
            same = int(bundle.labeled.labels[result.indices[row, col]]) == int(q_labels[row])
            expected = neighbor_grid.MATCH_COLOUR if same else neighbor_grid.MISMATCH_COLOUR
            assert image.getpixel((left(col) + 1, top(row) + 1)) == expected, (row, col)
    assert neighbor_grid.same_class_fraction(bundle, result) == pytest.approx(0.5)  # (0,1) and (1,17) match


def test_neighbors_default_out_is_beside_the_weights(tiny_run):
    assert neighbors.main(["--model_path", str(tiny_run / "tiny_model.pth"), "--n", "2", "--k", "3",
                           "--device", "cpu"]) == 0
    assert png_size(tiny_run / "tiny_neighbors.png") == neighbor_grid.grid_size(2, 3, 16)


def test_neighbors_bad_input_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    model = str(tiny_run / "tiny_model.pth")
    garbage = tmp_path / "garbage_model.pth"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other_model.pth"  # another architecture than the config says
    torch.save(SimCLR("resnet34", feature_dim=16, proj_hidden_dim=32).state_dict(), other)
    out = tmp_path / "n.png"
    cases = [
        (["--model_path", str(tmp_path / "missing_model.pth"), "--config", str(tiny_run / "tiny_config.json")],
         "no such file"),
        (["--model_path", str(tmp_path / "missing_model.pth")], "missing_model.pth: no such file"),
        (["--model_path", str(garbage), "--config", str(tiny_run / "tiny_config.json")], "is damaged"),
        (["--model_path", str(other), "--config", str(tiny_run / "tiny_config.json")], "does not fit a tiny"),
        (["--model_path", model, "--n", "1000"], "--n 1000"),
        (["--model_path", model, "--k", "0"], "must be positive"),
        (["--model_path", model, "--data_root", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for extra, needle in cases:
        assert neighbors.main([*extra, "--device", "cpu", "--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and needle in err[-1], (extra, err)
        assert not out.exists()
    assert neighbors.main([]) == 2  # the weights are required
    assert "--model_path" in capsys.readouterr().err


def test_the_runs_cache_folder_only_for_the_runs_data_folder(tmp_path, monkeypatch):
    from simclr.checkpoint import data_location
    config = {"dataset": "folder", "data_root": "data/small", "image_size": 32, "cache_dir": "/elsewhere/cache"}
    monkeypatch.chdir(tmp_path)
    assert data_location(config) == dict(name="folder", root="data/small", image_size=32, cache_dir="/elsewhere/cache")
    same = data_location(config, data_root=str(tmp_path / "data" / "small"))  # the same folder, written otherwise
    assert same["cache_dir"] == "/elsewhere/cache"
    other = data_location(config, data_root="data/full", image_size=16)
    assert other == dict(name="folder", root="data/full", image_size=16, cache_dir=None)
    # linear.py and finetune.py (checkpoint.resolve_encoder): the same rule, and an explicit --cache_dir wins
    from simclr.checkpoint import resolve_encoder
    saved = {**config, "arch": "resnet18", "stem": "cifar"}
    assert resolve_encoder(saved).cache_dir == "/elsewhere/cache"
    assert resolve_encoder(saved, data_root="data/full").cache_dir is None
    assert resolve_encoder(saved, data_root="data/full", cache_dir="c").cache_dir == "c"


def test_importing_does_nothing(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import neighbors, plot"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
