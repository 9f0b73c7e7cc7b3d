"""TensorBoard logs of main.py and linear.py, read back with TensorBoard's own reader, also across a resume."""
import os
import sys

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import linear
import main
from conftest import TINY_ARCH, tiny_run_args
from simclr import loop, pretrain, tblog
from simclr.names import PRETRAIN_COLUMNS
from simclr.cli import UserError

# 24 training images at batch 8: 3 steps per epoch
STEPS = 3
STEP_TAGS = {"step/loss", "step/loss_epoch_mean", "step/lr", "step/images_per_second"}
EPOCH_TAGS = {f"epoch/{c}" for c in PRETRAIN_COLUMNS if c != "epoch"}


def args(data, results, name, *extra, **overrides):
    """A tiny run on 24 training images, logged to TensorBoard."""
    return tiny_run_args(data, results, name, *extra, **{"train_subset": STEPS * 8, "tensorboard": True, **overrides})


def read(logdir, purge=True) -> EventAccumulator:
    events = EventAccumulator(str(logdir), purge_orphaned_data=purge)
    events.Reload()
    return events


def steps(events, tag) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def values(events, tag) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


@pytest.fixture(autouse=True)
def every_step(monkeypatch):
    """Read (and log) the loss after every step instead of twice a second, so the steps are known."""
    monkeypatch.setattr(loop, "READ_EVERY_S", 0.0)


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """Two epochs in one go, logged at every step: the reference."""
    results = tmp_path_factory.mktemp("tb")
    saved, loop.READ_EVERY_S = loop.READ_EVERY_S, 0.0
    try:
        assert main.main(args(tiny_folder, results, "run", epochs=2)) == 0
    finally:
        loop.READ_EVERY_S = saved
    return results


def test_main_logs_every_tag_at_its_step(straight):
    events = read(straight / "run_tb")
    assert STEP_TAGS | EPOCH_TAGS <= set(events.Tags()["scalars"])
    for tag in STEP_TAGS:
        assert steps(events, tag) == list(range(2 * STEPS)), tag  # global step = epoch * steps + step
    for tag in EPOCH_TAGS:
        assert steps(events, tag) == [STEPS - 1, 2 * STEPS - 1], tag  # at the epoch's last step
    frame = pd.read_csv(straight / "run_statistics.csv")
    for column in ("train_loss", "test_acc@1", "test_acc@5", "lr", "epoch_seconds"):
        assert values(events, f"epoch/{column}") == pytest.approx(frame[column].tolist(), rel=1e-6), column
    # the running mean the bar shows, read at an epoch's last step, is that epoch's mean loss of the CSV
    running = dict(zip(steps(events, "step/loss_epoch_mean"), values(events, "step/loss_epoch_mean")))
    assert [running[STEPS - 1], running[2 * STEPS - 1]] == pytest.approx(frame["train_loss"].tolist(), rel=1e-6)
    # ... and the mean of the logged per-step losses of the epoch
    losses = values(events, "step/loss")
    assert sum(losses[:STEPS]) / STEPS == pytest.approx(frame["train_loss"][0], rel=1e-5)
    assert all(v > 0 for v in values(events, "step/images_per_second"))
    assert "config/text_summary" in events.Tags()["tensors"]
    assert f"| arch | {TINY_ARCH} |".encode() in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


def test_resume_after_a_kill_continues_the_log_without_duplicates(tiny_folder, tmp_path, straight, monkeypatch):
    real_step = pretrain.train_step
    count = [0]

    def dies_mid_epoch_2(*a, **kw):
        count[0] += 1
        if count[0] == STEPS + 3:  # steps 0-4 done and logged; the checkpoint is the one after epoch 1
            raise KeyboardInterrupt
        return real_step(*a, **kw)
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_step", dies_mid_epoch_2)
        assert main.main(args(tiny_folder, tmp_path, "run", epochs=2)) == 130
    # what the killed run left: steps past its checkpoint (3, 4) that the resumed run will log again
    assert steps(read(tmp_path / "run_tb"), "step/loss") == list(range(STEPS + 2))
    assert main.main(args(tiny_folder, tmp_path, "run", "--resume", "auto", epochs=2)) == 0

    events, reference = read(tmp_path / "run_tb"), read(straight / "run_tb")
    for tag in STEP_TAGS | EPOCH_TAGS:
        seen = steps(events, tag)
        assert seen == sorted(set(seen)) == steps(reference, tag), tag  # increasing, unique, all there
    for tag in ("step/loss", "step/loss_epoch_mean", "step/lr", "epoch/train_loss", "epoch/test_acc@1"):
        assert values(events, tag) == values(reference, tag), tag  # the resume is exact, so is its log
    # without TensorBoard's purge the re-logged steps would be there twice: the test would notice
    raw = steps(read(tmp_path / "run_tb", purge=False), "step/loss")
    assert sorted(raw) != sorted(set(raw))
    # the config of each start, at the step it started from
    assert [e.step for e in events.Tensors("config/text_summary")] == [0, STEPS]


def test_a_new_run_of_the_same_name_replaces_the_log(tiny_folder, tmp_path):
    assert main.main(args(tiny_folder, tmp_path, "again", epochs=2)) == 0
    assert main.main([*args(tiny_folder, tmp_path, "again", epochs=1), "--overwrite"]) == 0  # afresh
    events = read(tmp_path / "again_tb")
    assert steps(events, "step/loss") == list(range(STEPS))
    assert steps(events, "epoch/test_acc@1") == [STEPS - 1]


def test_linear_logs_its_csv_columns_per_epoch(straight, tmp_path):
    argv = ["--model_path", str(straight / "run_model.pth"), "--epochs", "3", "--device", "cpu", "--results_dir",
            str(tmp_path), "--tensorboard"]
    assert linear.main(argv) == 0
    events = read(tmp_path / "run_linear_tb")
    frame = pd.read_csv(tmp_path / "run_linear_statistics.csv")
    for column in linear.CSV_COLUMNS[1:]:
        assert steps(events, f"linear/{column}") == [1, 2, 3], column
        assert values(events, f"linear/{column}") == pytest.approx(frame[column].tolist(), rel=1e-6), column
    assert linear.main([*argv[:3], "2", *argv[4:], "--overwrite"]) == 0  # run again: the log starts afresh
    assert steps(read(tmp_path / "run_linear_tb"), "linear/test_acc@1") == [1, 2]


def test_without_the_flag_nothing_is_written(tiny_folder, tmp_path):
    assert main.main(args(tiny_folder, tmp_path, "plain", epochs=1, tensorboard=None)) == 0
    assert (tmp_path / "plain_statistics.csv").is_file()  # the run itself happened
    assert not (tmp_path / "plain_tb").exists() and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_row_skips_missing_values_and_the_epoch(tmp_path):
    log = tblog.open_log(str(tmp_path))
    log.row("x", {"epoch": 3, "a": 1.5, "b": None, "c": float("nan"), "d": 2, "name": "text", "flag": True}, 7)
    log.close()
    events = read(tmp_path)
    assert set(events.Tags()["scalars"]) == {"x/a", "x/d"}
    assert [(e.step, e.value) for e in events.Scalars("x/a")] == [(7, 1.5)]
    assert isinstance(tblog.open_log(None), tblog.NoLog) and not isinstance(tblog.open_log(None), tblog.TBLog)


def test_missing_tensorboard_is_one_line_exit_2(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        tblog.open_log(str(tmp_path / "tb"))
    assert main.main(args(tiny_folder, tmp_path, "none", epochs=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --tensorboard needs the tensorboard package"), err


def test_finetune_logs_each_epoch_and_a_resume_does_not_repeat_steps(trained, tmp_path, monkeypatch):
    import pandas as pd
    import finetune
    common = ["--model_path", str(trained / "run_model.pth"), "--batch_size", "4", "--device", "cpu",
              "--label_fraction", "0.25", "--results_dir", str(tmp_path), "--tensorboard", "--epochs", "2"]
    real_end = loop.end_epoch

    def end_then_die(state, job, epoch, row):
        real_end(state, job, epoch, row)
        raise KeyboardInterrupt  # killed right after epoch 1 was written and logged
    with monkeypatch.context() as patch:
        patch.setattr(loop, "end_epoch", end_then_die)
        assert finetune.main(common) == 130
    assert finetune.main([*common, "--resume", "auto"]) == 0
    events = read(tmp_path / "run_finetune_0.25_tb")
    assert steps(events, "finetune/test_acc@1") == [1, 2]  # once each, in order, across the resume
    frame = pd.read_csv(tmp_path / "run_finetune_0.25_statistics.csv")
    assert values(events, "finetune/test_acc@1") == pytest.approx(frame["test_acc@1"].tolist(), abs=1e-4)


def test_a_log_reopened_within_the_same_second_sorts_after_the_old_file(tmp_path):
    """TensorBoard reads event files in name order; the name starts with the second it was made in.

    A file made in this second whose counter has more digits than the next one's would sort after
    the new file (".10" < ".9"), so the new run's purge of repeated steps would be read first.
    """
    import socket
    import time
    old = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.999999"
    old.write_bytes(b"")
    log = tblog.open_log(str(tmp_path), purge_step=2)
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == old.name, names
