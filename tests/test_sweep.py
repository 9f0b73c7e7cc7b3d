"""sweep.py: the tables recomputed from the runs' own CSVs (statistics + scipy.stats.t by hand), a sweep
stopped after its first run and run again (nothing finished repeated, the same tables), a failing run
recorded, --then linear, signals passed on, every bad input refused before anything runs, --dry_run."""
import contextlib
import csv
import io
import math
import os
import signal
import statistics
import sys

import pytest
from scipy import stats

import sweep
from conftest import tiny_run_args
from simclr import sweep as sweep_lib

# the tiny run made smaller still: 8 images of 8x8, one step an epoch
SMALL = dict(image_size=8, train_subset=8)


def shared_flags(data, **overrides):
    return tiny_run_args(data, None, None, **{**SMALL, **overrides})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text):
    return float(text) if text not in ("", None) else None


def run_sweep(argv, launches=None, after_launch=None):
    """sweep.main(argv) in this process; every process it starts is recorded in `launches` (its --name)."""
    real = sweep_lib.launch

    def counting(cmd, env, stdout, stderr):
        proc = real(cmd, env, stdout, stderr)
        if launches is not None:
            launches.append(cmd[cmd.index("--name") + 1] if "--name" in cmd else cmd[1])
        if after_launch is not None:
            after_launch(len(launches or []), proc)
        return proc

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sweep_lib, "launch", counting)
        code = sweep.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def swept(tiny_folder, tmp_path_factory):
    """A 2 temperatures x 2 seeds sweep, stopped by SIGINT as its second run starts, then run again twice."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    argv = ["--seeds", "0-1", "--grid", "temperature=0.2,0.5", "--baseline", "temperature=0.5", "--out", str(out),
            "--", *shared_flags(tiny_folder, epochs=2)]
    first = []

    def interrupt(count, proc):
        if count == 2:  # as if Ctrl-C came while the second run starts: the sweep passes it on
            os.kill(os.getpid(), signal.SIGINT)

    code, _ = run_sweep(argv, first, interrupt)
    statuses = {name: sweep_lib.read_status_file(os.path.join(out, name, f"{name}_sweep.json")) for name in first}
    kept = os.path.join(out, first[0], f"{first[0]}_statistics.csv")
    kept_mtime = os.stat(kept).st_mtime_ns
    second = []
    code2, printed = run_sweep(argv, second)
    tables = {f: (out / f).read_bytes() for f in ("runs.csv", "summary.csv", "comparison.csv")}
    third = []
    code3, _ = run_sweep(argv, third)
    return dict(out=out, codes=(code, code2, code3), launches=(first, second, third), statuses=statuses,
                kept_unchanged=os.stat(kept).st_mtime_ns == kept_mtime, tables=tables, printed=printed)


NAMES = ["temperature=0.2_seed=0", "temperature=0.2_seed=1", "temperature=0.5_seed=0", "temperature=0.5_seed=1"]


@pytest.mark.long
def test_a_stopped_sweep_runs_again_without_repeating_finished_runs(swept):
    first, second, third = swept["launches"]
    assert swept["codes"] == (130, 0, 0)
    assert first == NAMES[:2]  # the first run finished; the second got the SIGINT passed on
    assert swept["statuses"][NAMES[0]]["status"] == "finished"
    assert swept["statuses"][NAMES[1]]["status"] == "stopped"
    assert swept["statuses"][NAMES[1]]["exit_code"] != 0
    assert second == NAMES[1:] and swept["kept_unchanged"]
    assert third == []  # all finished: nothing runs, the tables are rebuilt the same
    for name, data in swept["tables"].items():
        assert (swept["out"] / name).read_bytes() == data, name


# the final figures of main.py's CSV that the tables summarise (the online probe's too)
METRICS = ("test_acc@1", "test_acc@5", "probe_acc@1", "probe_acc@5")


@pytest.mark.long
def test_tables_recomputed_from_the_runs_csvs(swept):
    out = swept["out"]
    runs = read_csv(out / "runs.csv")
    assert [r["status"] for r in runs] == ["finished"] * 4
    final = {}
    for r in runs:
        name = f"temperature={r['temperature']}_seed={r['seed']}"
        assert r["folder"] == str(out / name)
        rows = read_csv(out / name / f"{name}_statistics.csv")
        assert len(rows) == 2
        for metric in ("test_acc@1", "test_acc@5"):
            values = [float(row[metric]) for row in rows]
            assert float(r[metric]) == values[-1] and float(r[f"best_{metric}"]) == max(values)
        seconds = [float(row["epoch_seconds"]) for row in rows]
        assert float(r["seconds_per_epoch"]) == pytest.approx(statistics.mean(seconds))
        final[(r["temperature"], int(r["seed"]))] = {m: float(rows[-1][m]) for m in METRICS}

    summary = {r["temperature"]: r for r in read_csv(out / "summary.csv")}
    for temperature in ("0.2", "0.5"):
        row = summary[temperature]
        assert (row["n"], row["missing"]) == ("2", "0")
        for metric in METRICS:
            values = [final[(temperature, s)][metric] for s in (0, 1)]
            mean, sd = statistics.mean(values), statistics.stdev(values)
            half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean)
            assert float(row[f"{metric}_sd"]) == pytest.approx(sd, abs=1e-9)
            assert float(row[f"{metric}_ci95_low"]) == pytest.approx(mean - half, abs=1e-9)
            assert float(row[f"{metric}_ci95_high"]) == pytest.approx(mean + half, abs=1e-9)

    comparison = read_csv(out / "comparison.csv")
    # main.py's online probe adds its columns to the metrics compared
    assert [(r["temperature"], r["metric"]) for r in comparison] == [
        ("0.2", "test_acc@1"), ("0.2", "test_acc@5"), ("0.2", "probe_acc@1"), ("0.2", "probe_acc@5")]
    for row in comparison:
        diffs = [final[("0.2", s)][row["metric"]] - final[("0.5", s)][row["metric"]] for s in (0, 1)]
        mean = statistics.mean(diffs)
        assert int(row["n"]) == 2 and float(row["difference"]) == pytest.approx(mean, abs=1e-9)
        assert int(row["agree"]) == sum(1 for d in diffs if d * mean > 0 or d == mean == 0)
        sd = statistics.stdev(diffs)
        if sd == 0:  # no spread: t, p and the interval are undefined, left empty
            assert row["t"] == row["p"] == row["difference_ci95_low"] == ""
            continue
        t = mean / (sd / math.sqrt(2))
        assert float(row["t"]) == pytest.approx(t)
        assert float(row["p"]) == pytest.approx(2 * stats.t.sf(abs(t), 1))
        half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
        assert float(row["difference_ci95_low"]) == pytest.approx(mean - half)
        assert float(row["difference_ci95_high"]) == pytest.approx(mean + half)

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean = float(summary["0.2"]["test_acc@1_mean"])
    assert "temperature=0.2" in swept["printed"] and f"{mean:.2f} ±" in swept["printed"]
    assert "against the baseline temperature=0.5" in swept["printed"]


@pytest.mark.long
def test_a_failing_run_is_recorded_and_the_others_evaluated(tiny_folder, tmp_path):
    """k above the 8 images of the kNN bank: main.py exits 2 at start; the sweep records it and goes on."""
    out = tmp_path / "out"
    code, printed = run_sweep(["--grid", "k=5,100", "--then", "linear", "--then_args", "--epochs 2",
                               "--out", str(out), "--", *shared_flags(tiny_folder, k=None)])
    assert code == 0
    runs = {r["k"]: r for r in read_csv(out / "runs.csv")}
    assert runs["100"]["status"] == "failed" and runs["100"]["exit_code"] == "2"
    assert "larger than the 8 images of the kNN bank" in runs["100"]["last_line"]
    assert runs["100"]["linear_acc@1"] == ""
    name = "k=5_seed=0"
    linear = read_csv(out / name / f"{name}_linear_statistics.csv")
    assert runs["5"]["status"] == "finished" and runs["5"]["then_exit_code"] == "0"
    assert len(linear) == 2 and float(runs["5"]["linear_acc@1"]) == float(linear[-1]["test_acc@1"])
    summary = {r["k"]: r for r in read_csv(out / "summary.csv")}
    assert (summary["100"]["n"], summary["100"]["missing"], summary["100"]["test_acc@1_mean"]) == ("0", "1", "")
    assert float(summary["5"]["linear_acc@1_mean"]) == float(linear[-1]["test_acc@1"])
    assert "1 of 2 runs are not finished" in printed


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_is_passed_to_the_running_run(tiny_folder, tmp_path, monkeypatch, signum):
    """The run (here a stand-in that waits) gets the signal once from the sweep, which exits 128 + signal."""
    monkeypatch.setattr(sweep_lib, "command", lambda plan, task: [
        sys.executable, "-c", "import time; time.sleep(60)", "--name", task.run.name])
    out = tmp_path / "out"
    code, _ = run_sweep(["--out", str(out), "--", *shared_flags(tiny_folder)], [],
                        lambda count, proc: os.kill(os.getpid(), signum))
    assert code == 128 + signum
    status = sweep_lib.read_status_file(out / "seed=0" / "seed=0_sweep.json")
    assert status["status"] == "stopped" and status["exit_code"] == -signum
    assert read_csv(out / "runs.csv")[0]["status"] == "stopped"


BAD = [
    (["--grid", "temperatur=0.1,0.2"], "not a flag of main.py"),
    (["--grid", "temperature=0,0.2"], "must be positive"),
    (["--grid", "batch_size=256,abc"], "must be a whole number"),
    (["--grid", "temperature=0.1,,0.2"], "empty value"),
    (["--grid", "temperature="], "empty value"),
    (["--seeds", "5-2"], "ends before it starts"),
    (["--grid", "temperature=0.1,0.2", "--baseline", "temperature=0.5"], "not in the grid"),
    (["--grid", "temperature=0.1,0.2", "--baseline", "batch_size=8"], "not a --grid key"),
    (["--gpus", "99"], "no GPU 99"),
    (["--grid", "seed=1,2"], "set by the sweep"),
    (["--then_args", "--epochs 2"], "needs --then"),
    (["--then", "linear", "--then_args", "--epochz 2"], "--then_args"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_anything_runs(tiny_folder, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(sweep_lib, "launch", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "out"
    assert sweep.main([*args, "--out", str(out), "--", *shared_flags(tiny_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--seed", "3"], ["--epochs", "0"], ["--temperature", "0.1"]])
def test_bad_flags_after_the_separator(tiny_folder, tmp_path, capsys, extra):
    out = tmp_path / "out"
    assert sweep.main(["--grid", "temperature=0.2", "--out", str(out), "--", *shared_flags(tiny_folder), *extra]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_dry_run_lists_the_runs_and_starts_none(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_lib, "launch", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "out"
    argv = ["--seeds", "0,1", "--grid", "temperature=0.2,0.5", "--then", "linear", "--out", str(out),
            "--", *shared_flags(tiny_folder)]
    assert sweep.main(["--dry_run", *argv]) == 0
    listed = capsys.readouterr().out
    assert not out.exists()
    assert all(f"{name}: start: " in listed for name in NAMES) and listed.count("main.py") == 4
    assert listed.count("linear.py --model_path") == 4

    # a finished run (its status and a full CSV) and a stopped one (a checkpoint): kept, and resumed
    values = vars(sweep.build_parser(sweep.SWEEP_FLAGS, "").parse_args(argv[:argv.index("--")]))
    runs = sweep_lib.plan(values, argv[argv.index("--") + 1:]).runs
    done, stopped = runs[0], runs[1]
    os.makedirs(done.folder)
    with open(done.path("_statistics.csv"), "w") as f:
        f.write("epoch,train_loss,test_acc@1,test_acc@5\n1,2.0,50.0,90.0\n")
    sweep_lib.atomic_save_json({"args": list(done.args), "exit_code": 0, "status": "finished",
                                "then": {"script": "linear", "args": ["--device", "cpu"], "exit_code": 0}},
                               done.path("_sweep.json"))
    with open(done.path("_linear_statistics.csv"), "w") as f:  # the evaluation is done when its CSV is there
        f.write("epoch,train_loss,test_acc@1\n1,1.0,60.0\n")
    os.makedirs(stopped.folder)
    open(stopped.path("_last.pth"), "wb").close()
    before = sorted(os.listdir(out))
    assert sweep.main(["--dry_run", *argv]) == 0
    listed = capsys.readouterr().out
    assert f"{done.name}: finished" in listed and f"{done.name}: start" not in listed
    assert f"{stopped.name}: resume: " in listed and "--resume auto" in listed
    assert listed.count("linear.py --model_path") == 3
    assert sorted(os.listdir(out)) == before
