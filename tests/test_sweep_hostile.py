"""sweep.py against hostile input: every count bounded before anything is made, every NAME_sweep.json checked
field by field, what an evaluation lost redone, every file name checked while planning, a repeated key refused,
messages that say what is true, and the running run ending with the sweep (kill -9 included)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import sweep
from conftest import ROOT
from simclr import sweep as sweep_lib
from simclr.files import RunLock, atomic_save_json
from simclr.flags import Flag

# planning reads no data: these are main.py's flags of every run
SHARED = ["--arch", "tiny", "--epochs", "1", "--device", "cpu"]
LONG = "x" * 250


def refused(argv, out, capsys, monkeypatch, dry_run=True) -> str:
    """sweep.main(argv) exits 2 with one `error:` line before any run starts; that line."""
    monkeypatch.setattr(sweep_lib, "launch", lambda *a: pytest.fail("a run started"))
    code = sweep.main([*(["--dry_run"] if dry_run else []), *argv, "--out", str(out), "--", *SHARED])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


BOUNDED = [
    (["--seeds", "0-9223372036854775807"], "names 9,223,372,036,854,775,808 seeds; a sweep runs at most 10,000"),
    (["--seeds", "0-4611686018427387904"], "names 4,611,686,018,427,387,905 seeds"),
    (["--seeds", "0-100000"], "names 100,001 seeds; a sweep runs at most 10,000"),
    (["--seeds", "0-9223372036854775808"], "must be >= 0 and <= 9223372036854775807, got 9223372036854775808"),
    (["--seeds", "9" * 5000], "got a number of 5,000 digits"),
    (["--seeds", "-1"], "has a negative seed; seeds are >= 0"),
    (["--seeds", "1--2"], "has a negative seed"),
    (["--seeds", "4-2"], "the range 4-2 ends before it starts; write 2-4"),
    (["--seeds", "0-3,2"], "names seed 2 twice"),
    (["--seeds", "7,007"], "names seed 7 twice"),
    (["--seeds", "0,,1"], "'' is not a seed"),
    (["--seeds", "٣"], "is not a seed"),
    (["--grid", "k=" + ",".join(map(str, range(1, 10_002)))], "--grid k has 10,001 values"),
    (["--seeds", "0-4999", "--grid", "k=1,2,3"], "3 configurations x 5,000 seeds = 15,000 runs; a sweep runs at "
                                                  "most 10,000"),
    (["--grid", "k=" + ",".join(map(str, range(1, 101))), "--grid", "batch_size=" + ",".join(map(str, range(2, 103)))],
     "the grid has 100 x 101 = 10,100 configurations x 1 seeds = 10,100 runs"),
    (["--grid", "temperature=0.1,0.5", "--baseline", "temperature=0.1,temperature=0.5"],
     "--baseline 'temperature=0.1,temperature=0.5' gives temperature twice"),
    (["--grid", "temperature=0.1,0.5", "--grid=--temperature=0.2"], "--grid temperature is given twice"),
    (["--grid", "temperature=0.1,.1"], "gives the value .1 twice (as 0.1 and .1)"),
    (["--grid", "temperature=0.1, ,0.5"], "empty value"),
    (["--grid", "data_root=a\udcffb"], "--grid data_root: 'a\\udcffb' is not valid UTF-8 text"),
    (["--name", "a\udcff"], "--name: 'a\\udcff' is not valid UTF-8"),
    (["--then", "linear", "--then_args", "--epochs 1 \udcff"], "--then_args: '--epochs 1 \\udcff' is not valid"),
    (["--grid", f"data_root=a,{LONG}"], "--grid value: the file name data_root="),
    (["--grid", f"name={'y' * 400}"], "(405 characters): --name is set by the sweep itself"),
]


@pytest.mark.parametrize("argv,message", BOUNDED, ids=[" ".join(a)[:60] for a, _ in BOUNDED])
def test_every_count_and_value_is_checked_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    """Seeds and grid sizes counted before any list is made (no OverflowError, MemoryError or minutes of silence),
    integers said exactly, a key given twice refused, names that cannot be files refused while planning."""
    out = tmp_path / "out"
    assert message in refused(argv, out, capsys, monkeypatch)
    assert not out.exists()


def test_a_flag_after_the_separator_that_is_not_utf8_is_refused(tmp_path, capsys, monkeypatch):
    """Printed in the dry run's commands (a UnicodeEncodeError on a strict terminal): refused while planning."""
    monkeypatch.setattr(sweep_lib, "launch", lambda *a: pytest.fail("a run started"))
    assert sweep.main(["--dry_run", "--out", str(tmp_path), "--", *SHARED, "--data_root", "/d\udcff"]) == 2
    assert "error: a flag after --: '/d\\udcff' is not valid UTF-8 text" in capsys.readouterr().err


def test_a_long_name_is_refused_before_the_first_run_trains(tmp_path, capsys, monkeypatch):
    """A grid whose first value makes a fine name and whose second does not: refused before anything starts."""
    out = tmp_path / "out"
    refused(["--grid", f"data_root=a,{LONG}"], out, capsys, monkeypatch, dry_run=False)
    assert not out.exists()


def test_a_name_that_only_the_evaluations_files_make_too_long_is_refused(tmp_path, capsys, monkeypatch):
    """NAME_stdout.txt fits, NAME_finetune_0.1_statistics.csv (with its temporary) does not: only --then finetune
    is refused, while planning."""
    value = "z" * (255 - len(".data_root=_seed=0_statistics.csv.00000000.tmp"))
    out = tmp_path / "out"
    monkeypatch.setattr(sweep_lib, "launch", lambda *a: pytest.fail("a run started"))
    assert sweep.main(["--dry_run", "--grid", f"data_root={value}", "--out", str(out), "--", *SHARED]) == 0
    capsys.readouterr()
    err = refused(["--grid", f"data_root={value}", "--then", "finetune"], out, capsys, monkeypatch)
    assert "the file name data_root=zzz" in err and "use a shorter --grid value" in err


def test_a_path_longer_than_path_max_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path.joinpath(*["d" * 200] * 20)
    assert "longer than the 4096 bytes a path may have" in refused([], out, capsys, monkeypatch)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.write_text("mine")
    assert "is there but is not a folder" in refused([], out, capsys, monkeypatch, dry_run=False)
    assert out.read_text() == "mine"


def test_the_names_checked_are_every_file_main_py_writes():
    from simclr.names import LINEAR_FILES, RUN_FILES
    assert set(RUN_FILES) | set(LINEAR_FILES) <= set(sweep_lib.FILE_KINDS)


def test_planning_many_seeds_and_values_is_linear():
    """10,000 seeds and 10,000 grid values, each checked against all others through a set (a list's count made
    20,001 seeds take 17 s)."""
    assert sweep_lib.parse_seeds("0-9999") == list(range(10_000))
    values = ",".join(map(str, range(1, 10_001)))
    assert len(sweep_lib.parse_grid([f"k={values}"])["k"]) == 10_000


EXACT = [(int, 2 ** 63 - 1, 2 ** 63, "must be >= 0 and <= 9223372036854775807, got 9223372036854775808"),
         (int, 2 ** 20, 2 ** 20 + 1, "must be >= 0 and <= 1048576, got 1048577"),
         (float, 2.5, 3.0, "must be >= 0 and <= 2.5, got 3"),
         (float, 2.5, 2.5000001, "must be >= 0 and <= 2.5, got 2.5000001")]


@pytest.mark.parametrize("kind,bound,value,text", EXACT)
def test_bound_messages_print_numbers_exactly(kind, bound, value, text):
    """Integers in full (not 9.22337e+18), floats short where that is exact (not 2.5 for 2.5000001)."""
    with pytest.raises(sweep_lib.UserError) as e:
        Flag("x", 0, "", type=kind, ge=0, le=bound).check(value)
    assert str(e.value) == f"--x {text}"


# ----------------------------------------------------------------------------- the files a sweep reads back

def planned(out, *argv):
    """The plan of a sweep into `out` (its flags and SHARED after --)."""
    own = [*argv, "--out", str(out)]
    return sweep_lib.plan(vars(sweep.build_parser(sweep.SWEEP_FLAGS, "").parse_args(own)), SHARED)


def finished(run, then=None, epochs=1) -> dict:
    """Make `run` look finished: its statistics CSV and the status the sweep writes (with an evaluation's record)."""
    os.makedirs(run.folder, exist_ok=True)
    with open(run.path("_statistics.csv"), "w") as f:
        f.write("epoch,train_loss,test_acc@1,test_acc@5\n")
        f.writelines(f"{e},2.0,50.0,90.0\n" for e in range(1, epochs + 1))
    status = dict(name=run.name, args=list(run.args), status="finished", exit_code=0, last_line="")
    if then is not None:
        status["then"] = dict(script=then.script, args=list(then.args), exit_code=0, last_line="", seconds=1.0)
    atomic_save_json(status, run.path("_sweep.json"))
    return status


DAMAGED = [
    ("[" * 200_000 + "]" * 200_000, "not JSON (nested too deep)"),
    ('{"args": [], "status": "finished", "exit_code": 0, "last_line": "", "then": []}',
     "'then' is a list, not an object"),
    ('{"args": [], "status": "finished", "exit_code": 0, "last_line": "", "then": "linear"}', "'then' is a text"),
    ('{"args": [], "status": "finished", "exit_code": 0, "last_line": "", "then": {"script": "linear", "args": "x", '
     '"exit_code": 0, "last_line": ""}}', "then's 'args' is a text, not a list of texts"),
    ('{"args": [], "status": "finished", "exit_code": 0, "last_line": "", "then": {"script": "linear", "args": [], '
     '"exit_code": true, "last_line": ""}}', "then's 'exit_code' is the value true, not an exit code"),
    ('["args"]', "a list, not an object"),
    ('{"args": "--epochs 1", "status": "finished", "exit_code": 0, "last_line": ""}', "'args' is a text"),
    ('{"args": [1], "status": "finished", "exit_code": 0, "last_line": ""}',
     "'args' holds the value 1, not only texts"),
    ('{"status": "finished", "exit_code": 0, "last_line": ""}', "'args' is missing"),
    ('{"args": [], "status": "done", "exit_code": 0, "last_line": ""}', "'status' is a text, not one of finished"),
    ('{"args": [], "exit_code": 0, "last_line": ""}', "'status' is missing, not one of"),
    ('{"args": [], "status": "failed", "exit_code": 0.5, "last_line": ""}', "'exit_code' is the value 0.5"),
    ('{"args": [], "status": "failed", "exit_code": NaN, "last_line": ""}', "'exit_code' is the value NaN"),
    ('{"args": [], "status": "failed", "exit_code": 2, "last_line": 7}', "'last_line' is the value 7"),
    ('{"args": [', "not JSON (Expecting value"),
    (b"\xff\xfe{}", "not JSON ('utf-8' codec can't decode"),
    ("fifo", "not a regular file"),
    ("folder", "not a regular file"),
    (" " * ((1 << 20) + 1), "1,048,577 bytes, more than the 1,048,576 of any status"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("content,message", DAMAGED,
                         ids=[c if c in ("fifo", "folder") else f"{i}:{m[:30]}" for i, (c, m) in enumerate(DAMAGED)])
def test_a_damaged_status_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, content, message, dry_run):
    """A NAME_sweep.json that is not one the sweep wrote (200,000-deep nesting, a 'then' that is a list or a
    text, a field of the wrong type, not JSON, not a file): one line naming it and what is wrong, nothing written."""
    out = tmp_path / "out"
    run = planned(out, "--then", "linear").runs[0]
    finished(run)
    status = run.path("_sweep.json")
    os.unlink(status)
    if content == "fifo":
        os.mkfifo(status)
    elif content == "folder":
        os.mkdir(status)
    else:
        with open(status, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())
    before = sorted(os.listdir(out)), sorted(os.listdir(run.folder))
    err = refused(["--then", "linear"], out, capsys, monkeypatch, dry_run=dry_run)
    assert err.startswith(f"error: {status}: {message}"), err
    assert "delete it and run the same command again" in err
    assert (sorted(os.listdir(out)), sorted(os.listdir(run.folder))) == before


def test_a_non_finite_epoch_in_a_runs_csv_is_no_epoch(tmp_path, capsys):
    """An epoch 'inf' (or 'nan') in NAME_statistics.csv: the run is not finished, no OverflowError."""
    out = tmp_path / "out"
    run = planned(out).runs[0]
    finished(run)
    with open(run.path("_statistics.csv"), "w") as f:
        f.write("epoch,train_loss,test_acc@1,test_acc@5\ninf,2.0,50.0,90.0\nnan,2.0,inf,90.0\n")
    assert sweep.main(["--dry_run", "--out", str(out), "--", *SHARED]) == 0
    assert f"{run.name}: start: " in capsys.readouterr().out


def test_a_fifo_for_a_runs_csv_is_no_csv(tmp_path, capsys):
    """A FIFO where a statistics CSV belongs would block the sweep forever: it is read as no file."""
    out = tmp_path / "out"
    run = planned(out).runs[0]
    finished(run)
    os.unlink(run.path("_statistics.csv"))
    os.mkfifo(run.path("_statistics.csv"))
    assert sweep.main(["--dry_run", "--out", str(out), "--", *SHARED]) == 0
    assert f"{run.name}: start: " in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_a_lost_evaluation_csv_is_redone(tmp_path, capsys, loss):
    """A finished --then linear run whose NAME_linear_statistics.csv was deleted (or holds no row): the sweep
    runs linear.py again (its record alone does not make it done), and the tables leave its accuracy empty
    until then; with the file there, nothing is redone and the tables read it."""
    out = tmp_path / "out"
    the_plan = planned(out, "--seeds", "0-1", "--then", "linear")
    for run in the_plan.runs:
        finished(run, the_plan.then)
        with open(run.path("_linear_statistics.csv"), "w") as f:
            f.write("epoch,train_loss,test_acc@1\n1,1.0,61.5\n")
    lost = the_plan.runs[1]
    if loss == "deleted":
        os.unlink(lost.path("_linear_statistics.csv"))
    else:
        open(lost.path("_linear_statistics.csv"), "w").close()
    tasks = sweep_lib.Sweep(the_plan).tasks()
    assert [(t.run.name, t.step) for t in tasks] == [(lost.name, "then")]
    rows, _ = sweep_lib.collect(the_plan)
    assert [r["linear_acc@1"] for r in rows] == [61.5, None]
    assert sweep.main(["--dry_run", "--seeds", "0-1", "--then", "linear", "--out", str(out), "--", *SHARED]) == 0
    listed = capsys.readouterr().out
    assert listed.count("then: ") == 1 and f"{lost.name}: finished\n    then: " in listed


def test_a_second_sweep_into_one_out_names_the_holder_and_another_out(tmp_path, capsys, monkeypatch):
    """The lock is OUT's: the message says which process holds it and to wait or give another --out (sweep.py
    has no --results_dir)."""
    out = tmp_path / "out"
    lock = RunLock(str(out), "sweep").acquire()
    try:
        err = refused([], out, capsys, monkeypatch, dry_run=False)
    finally:
        lock.release()
    assert f"another sweep (process {os.getpid()}) is running into {out}; wait for it to end, or give this one " \
           f"another --out" in err
    assert "--results_dir" not in err and "--name" not in err


# ----------------------------------------------------------------------------- the run ends with the sweep

# A stand-in for main.py: writes its pid, and on SIGTERM (what main.py turns into "save a checkpoint, then
# stop") writes `saved` and exits; it would otherwise wait for ever.
CHILD = """
import os, signal, sys, time
folder = sys.argv[1]
def save(signum, frame):
    with open(os.path.join(folder, "saved"), "w") as f:
        f.write(str(signum))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, save)
with open(os.path.join(folder, "pid.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(folder, "pid.tmp"), os.path.join(folder, "pid"))
while True:
    time.sleep(0.05)
"""
# The sweep as its own process, its runs the stand-in
DRIVER = """
import sys
import sweep
from simclr import sweep as sweep_lib
child, folder, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sweep_lib.command = lambda plan, task: [sys.executable, "-c", child, folder]
sys.exit(sweep.main(argv))
"""


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for its new parent to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(condition, limit_s: float = 60.0) -> bool:
    """Poll `condition` until it holds or `limit_s` passes (a generous bound on a busy machine, not a timing)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_sweep_ends_its_running_run(tmp_path):
    """kill -9 of the sweep: the running run gets SIGTERM from the kernel (it may save its checkpoint) and ends,
    instead of training on unseen."""
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, CHILD, str(tmp_path), "--out", str(tmp_path / "out"),
                             "--", *SHARED], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child = None
    try:
        assert wait_until(lambda: pid_file.exists() or proc.poll() is not None), "the run never started"
        assert proc.poll() is None, proc.stderr.read().decode()
        child = int(pid_file.read_text())
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not alive(child)), "the run outlived the sweep"
        assert (tmp_path / "saved").read_text() == str(int(signal.SIGTERM))
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_an_error_of_the_sweep_stops_and_waits_for_the_runs_still_going(tmp_path, monkeypatch, capsys):
    """Two runs at once; the sweep fails recording the first that ends: the other is sent SIGTERM and waited for
    (it saves), not left training after the sweep has exited 2."""
    monkeypatch.setattr(sweep_lib, "device_slots", lambda gpus, per_run: ({}, {}))
    folders = {0: tmp_path / "quick", 1: tmp_path / "slow"}
    for folder in folders.values():
        folder.mkdir()
    procs = []

    def launched(cmd, env, stdout, stderr):
        seed = int(cmd[cmd.index("--seed") + 1])
        code = "pass" if seed == 0 else CHILD
        proc = subprocess.Popen([sys.executable, "-c", code, str(folders[seed])], stdout=stdout, stderr=stderr)
        procs.append(proc)
        if seed == 1:
            assert wait_until(lambda: (folders[1] / "pid").exists())
        return proc

    def record(self, active, code):
        raise sweep_lib.UserError("recording failed")

    monkeypatch.setattr(sweep_lib, "launch", launched)
    monkeypatch.setattr(sweep_lib.Sweep, "_record", record)
    try:
        assert sweep.main(["--seeds", "0-1", "--out", str(tmp_path / "out"), "--", *SHARED]) == 2
        assert all(p.poll() is not None for p in procs)
        assert (folders[1] / "saved").read_text() == str(int(signal.SIGTERM))
        assert "stopping the 1 running run; each saves a checkpoint" in capsys.readouterr().err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_redone_evaluation_replaces_the_sweeps_own_files_and_augment_has_its_prefix(tmp_path):
    """linear.py refuses to write over an earlier probe's files unless --overwrite: the sweep, which redoes only
    what is not done, passes it; --then_args --augment reads linear.py's NAME_linear_augment_* files."""
    out = tmp_path / "out"
    the_plan = planned(out, "--seeds", "0", "--then", "linear")
    task = sweep_lib.Task(the_plan.runs[0], "then", 1)
    assert sweep_lib.command(the_plan, task)[-1] == "--overwrite"
    augmented = planned(out, "--seeds", "0", "--then", "linear", "--then_args=--augment")
    assert augmented.then.prefix == "_linear_augment"
