"""sweep.py's job: a grid of main.py runs over seeds, each an ordinary subprocess, and tables with error bars.

Under OUT, each run has its folder OUT/NAME/ (NAME says its values: `temperature=0.1_seed=0`) holding
main.py's NAME_* files, the evaluation's when asked, the process's NAME_stdout.txt and
NAME_stderr.txt, and NAME_sweep.json: the status the sweep writes (whole) after the process exits.
A run is finished when that status says exit 0 for today's flags and its NAME_statistics.csv has
every epoch; everything else is started again (`--resume auto` when a NAME_last.pth is there). Its
evaluation is done when its record says exit 0 for today's flags and its own statistics CSV is there.
A status the sweep did not write (a field missing or of another type, not JSON) stops the sweep in one
line before anything runs. Every count (seeds, values, runs: MAX_RUNS) and every file name is checked
while planning. Each run gets SIGTERM when the sweep's process ends in any way (Linux), so it saves its
checkpoint and stops instead of training on unseen.
The tables (runs.csv, summary.csv, comparison.csv, curves.png) are rebuilt from the runs' own CSVs
at the end of every sweep, so a sweep stopped and run again ends with the same tables.

Nothing here imports torch, except to count GPUs when --gpus or --gpus_per_run ask for them.
"""
from __future__ import annotations

import csv
import difflib
import itertools
import json
import math
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from .cli import OneLineParser, UserError, first_line
from .files import RunLock, RunNameInUse, atomic_save_json, atomic_write_csv, check_name_fits
from .flags import (FINETUNE_FLAGS, LINEAR_FLAGS, SWEEP_OWNED, TRAIN, TRAIN_FLAGS, build_parser, check_name,
                    parse_text, train_values)
from .names import PRETRAIN_COLUMNS, RUN_FILES, TENSORBOARD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"main": "main.py", "linear": "linear.py", "finetune": "finetune.py"}
# the kNN columns of NAME_statistics.csv, then the online probe's (present only in runs that have one)
CSV_METRICS = tuple(c for c in PRETRAIN_COLUMNS if c.startswith(("test_acc", "probe_acc")))
ALWAYS_METRICS = CSV_METRICS[:2]
STOP_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
# flags of the evaluation scripts that the sweep sets itself: where the weights and files are, the seed
THEN_OWNED = ("model_path", "config", "results_dir", "name", "seed", "resume", "untrained", "overwrite")
POLL_S = 0.2
# the runs one sweep plans at most: far above any grid a researcher runs (and its tables stay readable), far
# below what would make planning slow or its memory large
MAX_RUNS = 10_000
# what stands after NAME in the files of a sweep's run: main.py's (names.RUN_FILES and its TensorBoard folder),
# an evaluation's (after its prefix) and the sweep's own
FILE_KINDS = RUN_FILES + (TENSORBOARD, "stdout.txt", "stderr.txt", "sweep.json")
# NAME_sweep.json is a few kB; a larger one was not written by the sweep
MAX_STATUS_BYTES = 1 << 20
PATH_MAX = 4096  # Linux's limit on a path's length (bytes, with its terminating NUL)
STATES = ("finished", "stopped", "failed")


# ----------------------------------------------------------------------------- the plan (validated before anything runs)

@dataclass(frozen=True)
class Run:
    """One main.py run of the sweep: its grid values, seed, folder and flags."""
    values: tuple[tuple[str, str], ...]   # (key, value as written) in grid order
    seed: int
    name: str                             # the run's NAME and its folder's name
    folder: str
    args: tuple[str, ...]                 # main.py's flags, without --resume
    epochs: int

    @property
    def config(self) -> tuple[str, ...]:
        return tuple(text for _, text in self.values)

    def path(self, suffix: str) -> str:
        return os.path.join(self.folder, self.name + suffix)


@dataclass(frozen=True)
class Then:
    """The evaluation of each finished run: linear.py or finetune.py, its flags and the files it writes."""
    script: str
    args: tuple[str, ...]
    prefix: str                           # what stands after NAME in its files: _linear, _finetune_0.1
    metric: str                           # its column in the tables: linear_acc@1, finetune_acc@1


@dataclass(frozen=True)
class Plan:
    name: str
    out: str
    keys: tuple[str, ...]
    configs: tuple[tuple[str, ...], ...]  # the grid's combinations, values as written
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]
    baseline: tuple[str, ...] | None
    then: Then | None
    slots: tuple[dict, ...]               # one per run that may go at once: the environment it adds
    gpus_per_run: int


def plan(values: dict, main_args: list[str]) -> Plan:
    """sweep.py's flags and the main.py flags after `--` -> the checked plan; a UserError (one line) for
    anything main.py or the sweep would refuse, before a file is written or a process started."""
    seeds = parse_seeds(values["seeds"])
    grid = parse_grid(values["grid"] or [])
    keys = tuple(grid)
    parser = build_parser(TRAIN_FLAGS, "main.py", explicit_only=True)
    for arg in main_args:  # printed in the dry run's commands and kept in each run's status
        require_text(arg, "a flag after --")
    shared = parse_main_args(parser, main_args, "after --")
    owned = [k for k in SWEEP_OWNED if k in shared]
    if owned:
        raise UserError(f"--{owned[0]} after -- is set by the sweep for each run (seeds: --seeds; "
                        f"folders: --out); leave it out")
    both = [k for k in keys if k in shared]
    if both:
        raise UserError(f"--{both[0]} is both a --grid key and a flag after --; give it in one place")
    name = values["name"] or ("_".join(keys) if keys else "seeds")
    check_name(name)
    for flag in ("name", "out", "then_args"):  # in the tables' text, the messages and the commands printed
        if values[flag] is not None:
            require_text(values[flag], f"--{flag}")
    if values["out"] is None:
        check_name_fits("results", [f"sweep_{name}"])
    out = values["out"] or os.path.join("results", f"sweep_{name}")
    check_size(grid, seeds)
    configs = tuple(itertools.product(*[[text for text, _ in grid[k]] for k in keys]))
    runs, names = [], set()
    for config, seed in itertools.product(configs, seeds):
        pairs = tuple(zip(keys, config))
        run_name = "_".join([*(f"{k}={safe(v)}" for k, v in pairs), f"seed={seed}"])
        if run_name in names:
            raise UserError(f"two runs of the grid would both be named {run_name}; write the values differently")
        names.add(run_name)
        folder = os.path.join(out, run_name)
        args = [*main_args, *(arg for k, v in pairs for arg in as_args(k, dict(grid[k])[v])),
                "--seed", str(seed), "--name", run_name, "--results_dir", folder]
        resolved = train_values(parse_main_args(parser, args, f"run {run_name}"))
        runs.append(Run(pairs, seed=seed, name=run_name, folder=folder, args=tuple(args), epochs=resolved["epochs"]))
    baseline = parse_baseline(values["baseline"], grid) if values["baseline"] is not None else None
    then = parse_then(values, shared)
    check_files(out, runs, then)
    slots = device_slots(values["gpus"], values["gpus_per_run"])
    return Plan(name, out=out, keys=keys, configs=configs, seeds=tuple(seeds), runs=tuple(runs), baseline=baseline,
                then=then, slots=slots, gpus_per_run=values["gpus_per_run"])


SEED_ITEM = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,7' and '0-2,7' too; each seed checked as main.py's --seed, at most
    MAX_RUNS of them, counted before any list is made."""
    shown = brief(text)
    spans = []
    for item in text.split(","):
        match = SEED_ITEM.fullmatch(item)
        if match is None:
            if re.match(r"\s*-|.*-\s*-", item):
                raise UserError(f"--seeds {shown}: {brief(item.strip())} has a negative seed; seeds are "
                                f"{TRAIN['seed'].describe_bounds()}")
            raise UserError(f"--seeds {shown}: {brief(item.strip())} is not a seed or a range like 0-4")
        first, last = (seed_number(digits, shown) for digits in (match[1], match[2] or match[1]))
        if last < first:
            raise UserError(f"--seeds {shown}: the range {first}-{last} ends before it starts; write {last}-{first}")
        spans.append((first, last))
    count = sum(last - first + 1 for first, last in spans)
    if count > MAX_RUNS:
        raise UserError(f"--seeds {shown} names {count:,} seeds; a sweep runs at most {MAX_RUNS:,} runs in all: "
                        f"give fewer seeds")
    seeds, seen = [], set()
    for first, last in spans:
        for seed in range(first, last + 1):
            if seed in seen:
                raise UserError(f"--seeds {shown} names seed {seed} twice")
            seen.add(seed)
            seeds.append(seed)
    return seeds


def seed_number(digits: str, shown: str) -> int:
    """One seed written in digits, checked as main.py checks --seed (before int() meets thousands of digits)."""
    flag = TRAIN["seed"]
    if len(digits.lstrip("0")) > len(str(flag.le)):
        raise UserError(f"--seed in --seeds {shown} must be {flag.describe_bounds()}, got a number of "
                        f"{len(digits.lstrip('0')):,} digits")
    return flag.check(int(digits), f"--seeds {shown}")


def brief(text: str, limit: int = 60) -> str:
    """A value the user gave, quoted for a message and cut short when long (a message stays one short line)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def check_size(grid: dict, seeds: list[int]) -> None:
    """At most MAX_RUNS runs, counted before the combinations are made."""
    configs = math.prod(len(values) for values in grid.values())
    if configs * len(seeds) > MAX_RUNS:
        sizes = " x ".join(f"{len(values):,}" for values in grid.values())
        sizes = f"{sizes} = " if len(grid) > 1 else ""
        raise UserError(f"the grid has {sizes}{configs:,} configurations x {len(seeds):,} seeds = "
                        f"{configs * len(seeds):,} runs; a sweep runs at most {MAX_RUNS:,}: split it into "
                        f"smaller sweeps (each its own --out)")


def parse_grid(items: list[str]) -> dict[str, list[tuple[str, object]]]:
    """['temperature=0.1,0.5', ...] -> {'temperature': [('0.1', 0.1), ('0.5', 0.5)], ...}, each value checked
    by main.py's declaration of that flag."""
    grid: dict[str, list[tuple[str, object]]] = {}
    for item in items:
        key, equals, texts = item.partition("=")
        key = key.strip().removeprefix("--")
        if not equals or not key:
            raise UserError(f"--grid {brief(item)}: write KEY=V1,V2 (a flag of main.py and its values)")
        if key not in TRAIN:
            close = difflib.get_close_matches(key, list(TRAIN), n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (python main.py --help lists them)"
            raise UserError(f"--grid {brief(item)}: {key} is not a flag of main.py{hint}")
        if key in SWEEP_OWNED:
            raise UserError(f"--grid {brief(item)}: --{key} is set by the sweep itself"
                            + (" (use --seeds)" if key == "seed" else ""))
        if key in grid:
            raise UserError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2")
        texts = texts.split(",")
        if len(texts) > MAX_RUNS:
            raise UserError(f"--grid {key} has {len(texts):,} values; a sweep runs at most {MAX_RUNS:,} runs in all")
        values, seen = [], {}
        for text in texts:
            if not text.strip():
                raise UserError(f"--grid {brief(item)} has an empty value; write {key}=V1,V2 without empty entries")
            text = text.strip()
            require_text(text, f"--grid {key}")
            value = parse_text(TRAIN[key], text, "--grid")
            if value in seen:  # 0.5 and .5 are one value: a set keeps the check linear in the values
                raise UserError(f"--grid {key} gives the value {text} twice" +
                                (f" (as {seen[value]} and {text})" if seen[value] != text else ""))
            seen[value] = text
            values.append((text, value))
        grid[key] = values
    return grid


def require_text(text: str, where: str) -> None:
    """A value that becomes part of run names, logs and the tables' text must be valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: {ascii(text)} is not valid UTF-8 text; run names, logs and tables "
                        f"hold it, so write it in UTF-8") from None


def as_args(key: str, value) -> list[str]:
    """A grid value as main.py flags: ['--temperature', '0.1'], ['--blur'], ['--no-blur'], [] for none."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}" if value else f"--no-{key}"]
    return [f"--{key}", str(value)]


def safe(text: str) -> str:
    """A value as part of a file name: no path separators."""
    return text.replace(os.sep, "-").replace("\0", "")


def parse_main_args(parser: OneLineParser, args: list[str], where: str) -> dict:
    """main.py's explicit flags, judged by main.py's own parser; its complaint prefixed with where it came from."""
    try:
        return vars(parser.parse_args(args))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def parse_baseline(text: str, grid: dict) -> tuple[str, ...]:
    """'temperature=0.5,batch_size=256' -> the configuration's values as written in the grid."""
    given: dict[str, str] = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not equals or not value.strip():
            raise UserError(f"--baseline {brief(text)}: write KEY=VALUE,KEY=VALUE with the grid's keys")
        if key not in grid:
            raise UserError(f"--baseline {brief(text)}: {key} is not a --grid key (the grid's keys: "
                            f"{', '.join(grid) or 'none'})")
        if key in given:
            raise UserError(f"--baseline {brief(text)} gives {key} twice; name one value of each --grid key")
        given[key] = value.strip()
    missing = [k for k in grid if k not in given]
    if missing:
        raise UserError(f"--baseline {brief(text)} gives no value of {missing[0]}; name one configuration of the grid")
    chosen = []
    for key, options in grid.items():
        value = parse_text(TRAIN[key], given[key], "--baseline")
        match = [written for written, v in options if v == value]
        if not match:
            raise UserError(f"--baseline {key}={given[key]} is not in the grid ({key}: "
                            f"{', '.join(w for w, _ in options)})")
        chosen.append(match[0])
    return tuple(chosen)


def parse_then(values: dict, shared: dict) -> Then | None:
    """--then, --label_fraction and --then_args -> the evaluation of each finished run, its flags checked."""
    script = values["then"]
    if script != "finetune" and values["label_fraction"] is not None:
        raise UserError("--label_fraction is a flag of --then finetune")
    if script is None:
        if values["then_args"] is not None:
            raise UserError("--then_args needs --then linear or --then finetune")
        return None
    try:
        extra = shlex.split(values["then_args"] or "")
    except ValueError as e:
        raise UserError(f"--then_args {values['then_args']!r}: {e}") from None
    if values["label_fraction"] is not None:
        extra = ["--label_fraction", str(values["label_fraction"]), *extra]
    flags = LINEAR_FLAGS if script == "linear" else FINETUNE_FLAGS
    given = parse_main_args(build_parser(flags, f"{script}.py", explicit_only=True), extra, "--then_args")
    owned = [k for k in THEN_OWNED if k in given]
    if owned:
        raise UserError(f"--then_args: --{owned[0]} is set by the sweep for each run; leave it out")
    if "device" in shared and "device" not in given:  # the evaluation goes where its run went
        extra = ["--device", shared["device"], *extra]
    if script == "linear":
        prefix = "_linear_augment" if given.get("augment") else "_linear"  # linear.py's own file names
        return Then("linear", args=tuple(extra), prefix=prefix, metric="linear_acc@1")
    if given.get("labels_per_class") is not None:
        tag = f"{given['labels_per_class']}perclass"
    else:
        tag = f"{given.get('label_fraction') or 0.1:g}"
    return Then("finetune", args=tuple(extra), prefix=f"_finetune_{tag}", metric="finetune_acc@1")


def check_files(out: str, runs: list[Run], then: Then | None) -> None:
    """Every file every run will write fits the file system (NAME_MAX for its temporary, PATH_MAX for its
    path), and no folder the sweep makes is taken by a file: refused now, before any run starts."""
    if not runs:
        return
    longest = max(runs, key=lambda r: len(os.fsencode(r.name)))  # names differ only in the runs' values
    prefixes = ["", *([then.prefix] if then is not None else [])]
    names = [f"{longest.name}{prefix}_{kind}" for prefix in prefixes for kind in FILE_KINDS]
    check_name_fits(out, names, "--grid value")
    # every run's folder is OUT/NAME: the longest name has the longest path, with its temporary's name
    deepest = os.path.join(os.path.abspath(longest.folder), f".{max(names, key=len)}.00000000.tmp")
    if len(os.fsencode(deepest)) >= PATH_MAX:
        raise UserError(f"--out: the path {deepest[:40]}... of a run's file is longer than the {PATH_MAX} bytes "
                        f"a path may have; use a shorter --out or shorter --grid values")
    for folder in (out, *(r.folder for r in runs)):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder} is there but is not a folder; the sweep puts its runs there: move it away "
                            f"or use another --out")


def device_slots(gpus: str | None, per_run: int) -> tuple[dict, ...]:
    """The environments of the runs that may go at once: one, unchanged, without --gpus; else one per group
    of per_run GPUs, each process seeing only its own (CUDA_VISIBLE_DEVICES)."""
    if gpus is None and per_run == 1:
        return ({},)
    import torch  # only here: counting GPUs needs CUDA, the rest of the sweep does not
    count = torch.cuda.device_count()
    if gpus is None:
        ids = list(range(count))
    else:
        try:
            ids = [int(part) for part in gpus.split(",")]
        except ValueError:
            raise UserError(f"--gpus {gpus!r}: write GPU indices like 0,1,2,3") from None
        for i in ids:
            if not 0 <= i < count:
                there = f"GPUs 0-{count - 1}" if count > 1 else "GPU 0" if count == 1 else "no CUDA GPU"
                raise UserError(f"--gpus {gpus}: there is no GPU {i} (this machine has {there})")
        if len(set(ids)) < len(ids):
            raise UserError(f"--gpus {gpus} names a GPU twice")
    if per_run > len(ids):
        raise UserError(f"--gpus_per_run {per_run}: only {len(ids)} GPU{'s' * (len(ids) != 1)} "
                        f"{'given' if gpus is not None else 'on this machine'}")
    # indices count within what this process sees: map them through CUDA_VISIBLE_DEVICES when it is set
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [part.strip() for part in visible.split(",")] if visible else [str(i) for i in range(count)]
    groups = [ids[i:i + per_run] for i in range(0, len(ids) - per_run + 1, per_run)]
    return tuple({"CUDA_VISIBLE_DEVICES": ",".join(names[i] for i in group)} for group in groups)


# ----------------------------------------------------------------------------- the state of each run, from its files

def read_rows(path: str) -> list[dict]:
    """Rows of a statistics CSV as numbers (None for an empty cell); [] when it is missing, unreadable or not a
    regular file (a FIFO would block the sweep)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return []
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    return [{k: number(v) for k, v in row.items() if k is not None} for row in rows]


def number(text):
    """A cell as a finite number; None for an empty, non-numeric or non-finite one (an epoch 'inf' is no epoch)."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_status(run: Run) -> dict | None:
    """The run's NAME_sweep.json: what the sweep recorded when its process exited (None: never)."""
    return read_status_file(run.path("_sweep.json"))


def read_status_file(path) -> dict | None:
    """A NAME_sweep.json as the sweep wrote it, every field the sweep reads checked; None when there is none;
    a UserError naming the file and what is wrong when it is damaged or not the sweep's."""
    def damaged(what: str) -> UserError:
        return UserError(f"{path}: {what}; it is not a status the sweep wrote: delete it and run the same command "
                         f"again (that run is checked again from its own files: kept when finished, else continued)")

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the sweep forever
            raise damaged("not a regular file")
        if info.st_size > MAX_STATUS_BYTES:
            raise damaged(f"{info.st_size:,} bytes, more than the {MAX_STATUS_BYTES:,} of any status")
        with open(path, "rb") as f:
            data = f.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); make it readable or delete it") from None
    try:
        status = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise damaged(f"not JSON ({'nested too deep' if isinstance(e, RecursionError) else first_line(e)})") from None
    problem = status_problem(status)
    if problem:
        raise damaged(problem)
    return status


def status_problem(status) -> str | None:
    """What is wrong with a parsed NAME_sweep.json (None: nothing): the fields the sweep reads, their types."""
    def bad(record, key: str, kind: type, what: str, where: str = "", optional: bool = False) -> str | None:
        value = record.get(key)
        if (isinstance(value, kind) and not isinstance(value, bool)) or (optional and key not in record):
            return None  # JSON true is no exit code; a missing last_line is no message
        return f"{where}{key!r} is {describe_json(value) if key in record else 'missing'}, not {what}"

    def text_list(record, key: str, where: str = "") -> str | None:
        args = record.get(key)
        if not isinstance(args, list):
            return f"{where}{key!r} is {describe_json(args) if key in record else 'missing'}, not a list of texts"
        others = [a for a in args if not isinstance(a, str)]
        return f"{where}{key!r} holds {describe_json(others[0])}, not only texts" if others else None

    if not isinstance(status, dict):
        return f"{describe_json(status)}, not an object"
    problem = (text_list(status, "args") or bad(status, "exit_code", kind=int, what="an exit code")
               or bad(status, "last_line", kind=str, what="a text", optional=True))
    if problem is None and status.get("status") not in STATES:
        state = describe_json(status["status"]) if "status" in status else "missing"
        problem = f"'status' is {state}, not one of {', '.join(STATES)}"
    then = status.get("then")
    if problem is None and then is not None:
        problem = bad(status, "then", kind=dict, what="an object") or (
            bad(then, "script", kind=str, what="a text", where="then's ") or text_list(then, "args", "then's ")
            or bad(then, "exit_code", kind=int, what="an exit code", where="then's ")
            or bad(then, "last_line", kind=str, what="a text", where="then's ", optional=True))
    return problem


def describe_json(value) -> str:
    """A JSON value in a few words, for a message: a list, a text, the number 3, null."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return f"the value {json.dumps(value)}"
    kinds = {str: "a text", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def epochs_done(rows: list[dict]) -> int:
    return int(max((r["epoch"] for r in rows if r.get("epoch") is not None), default=0))


def is_finished(run: Run, status: dict | None, rows: list[dict]) -> bool:
    """Exited 0 with today's flags, and every epoch in its CSV."""
    return (status is not None and status.get("exit_code") == 0 and status.get("args") == list(run.args)
            and epochs_done(rows) >= run.epochs)


def then_done(run: Run, then: Then, status: dict | None) -> bool:
    """The evaluation exited 0 with today's flags, and its statistics CSV is still there with a test top-1."""
    record = (status or {}).get("then") or {}
    return (record.get("script") == then.script and record.get("args") == list(then.args)
            and record.get("exit_code") == 0 and then_accuracy(run, then) is not None)


def then_accuracy(run: Run, then: Then):
    """The evaluation's final test top-1, from its own CSV (None when the file is missing or has none)."""
    return final(read_rows(run.path(then.prefix + "_statistics.csv")), "test_acc@1")


def final(rows: list[dict], key: str):
    """The last value of a column (the final evaluation), None when it has none."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def best(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def seconds_per_epoch(rows: list[dict]):
    values = [r["epoch_seconds"] for r in rows if r.get("epoch_seconds") is not None and (r.get("epoch") or 0) >= 1]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- running

@dataclass
class Task:
    run: Run
    step: str                   # "main" or "then"
    index: int                  # 1-based, for the progress lines


@dataclass
class Active:
    task: Task
    slot: int
    proc: subprocess.Popen
    err_path: str
    err_offset: int
    started: float
    files: list = field(default_factory=list)
    signalled: bool = False


def command(plan: Plan, task: Task) -> list[str]:
    """The process of a task: main.py (under torchrun with --gpus_per_run > 1) or the evaluation script."""
    run = task.run
    if task.step == "then":
        then = plan.then
        args = ["--model_path", run.path("_model.pth"), "--seed", str(run.seed), *then.args]
        if then.script == "finetune" and os.path.exists(run.path(then.prefix + "_last.pth")):
            args += ["--resume", "auto"]
        else:  # an evaluation not done (or its CSV lost): the sweep's own files of it are redone whole
            args += ["--overwrite"]
        return [sys.executable, os.path.join(ROOT, SCRIPTS[then.script]), *args]
    args = list(run.args)
    if os.path.exists(run.path("_last.pth")):
        args += ["--resume", "auto"]
    script = os.path.join(ROOT, SCRIPTS["main"])
    if plan.gpus_per_run > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={plan.gpus_per_run}", script, *args]
    return [sys.executable, script, *args]


def launch(cmd: list[str], env: dict, stdout, stderr) -> subprocess.Popen:
    """Start a run in its own session: a Ctrl-C in the terminal reaches the sweep only, which passes it on
    once (a second signal would make the run stop at once instead of saving its checkpoint). On Linux the
    run also gets a SIGTERM when the sweep dies in any way, kill -9 included: it saves and ends with it."""
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=stdout, stderr=stderr,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=ended_with(os.getpid()))


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def ended_with(parent: int):
    """A preexec_fn that makes the child get SIGTERM when `parent` (the sweep) ends (Linux's PR_SET_PDEATHSIG,
    through ctypes: no compiled code); None where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child between fork and exec loads nothing
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the line above could arm it: end as it would have
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def last_line(path: str, offset: int) -> str:
    """The last line that process wrote on stderr: its `error:` line when it has one (progress bars aside)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":", 1)[0]]
    return (errors or lines or [""])[-1][:300]


class Sweep:
    """Runs the plan's pending tasks, up to one per slot at once, and records each as it exits."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.signum: int | None = None
        self.running: dict[int, Active] = {}
        self.failed = 0

    def tasks(self) -> list[Task]:
        """What is left: main.py for every unfinished run, the evaluation for finished runs that lack it."""
        tasks = []
        for i, run in enumerate(self.plan.runs, 1):
            status = read_status(run)
            if not is_finished(run, status, read_rows(run.path("_statistics.csv"))):
                tasks.append(Task(run, "main", i))
            elif self.plan.then is not None and not then_done(run, self.plan.then, status):
                tasks.append(Task(run, "then", i))
        return tasks

    def execute(self, tasks: list[Task]) -> None:
        pending = deque(tasks)
        handlers = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while pending or self.running:
                free = [s for s in range(len(self.plan.slots)) if s not in self.running]
                while self.signum is None and pending and free:
                    self._start(pending.popleft(), free.pop(0))
                if not self.running:
                    break
                time.sleep(POLL_S)
                for slot, active in list(self.running.items()):
                    code = active.proc.poll()
                    if code is not None:
                        del self.running[slot]
                        follow = self._record(active, code)
                        if follow is not None:
                            pending.appendleft(follow)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            self._stop_running()

    def _stop_running(self) -> None:
        """Runs still going when the loop ends by an error of the sweep itself: each is asked to save and stop,
        and waited for, so that none goes on training unseen."""
        if not self.running:
            return
        count = len(self.running)
        print(f"stopping the {count} running run{'s' * (count != 1)}; each saves a checkpoint", file=sys.stderr,
              flush=True)
        for active in self.running.values():
            if not active.signalled:
                self._forward(active, signal.SIGTERM)
        for active in self.running.values():
            active.proc.wait()
            for f in active.files:
                f.close()
        self.running.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: passing it to the running runs (they save a checkpoint); "
                  f"no new run starts", file=sys.stderr, flush=True)
        for active in list(self.running.values()):
            self._forward(active, signum)

    @staticmethod
    def _forward(active: Active, signum: int) -> None:
        active.signalled = True
        try:
            active.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def _start(self, task: Task, slot: int) -> None:
        run = task.run
        prefix = run.name + (self.plan.then.prefix if task.step == "then" else "")
        os.makedirs(run.folder, exist_ok=True)
        out = open(os.path.join(run.folder, f"{prefix}_stdout.txt"), "ab")
        err_path = os.path.join(run.folder, f"{prefix}_stderr.txt")
        err = open(err_path, "ab")
        offset = err.tell()
        cmd = command(self.plan, task)
        what = f"{self.plan.then.script}.py" if task.step == "then" else \
            "resumed" if "--resume" in cmd[-2:] else "started"
        print(f"[{task.index}/{len(self.plan.runs)}] {run.name}: {what} (log {err_path})", flush=True)
        try:
            proc = launch(cmd, env=self.plan.slots[slot], stdout=out, stderr=err)
        except BaseException:
            out.close()
            err.close()
            raise
        active = self.running[slot] = Active(task, slot=slot, proc=proc, err_path=err_path, err_offset=offset,
                                             started=time.monotonic(), files=[out, err])
        if self.signum is not None and not active.signalled:  # the signal came while it was being started
            self._forward(active, self.signum)

    def _record(self, active: Active, code: int) -> Task | None:
        """Write the run's status whole; the evaluation task that follows a finished run, if asked."""
        for f in active.files:
            f.close()
        task, run = active.task, active.task.run
        line = last_line(active.err_path, active.err_offset) if code != 0 else ""
        seconds = time.monotonic() - active.started
        status = read_status(run) or {}
        stopped = code != 0 and (self.signum is not None or code in STOP_CODES)
        if task.step == "main":
            rows = read_rows(run.path("_statistics.csv"))
            done = epochs_done(rows)
            state = "finished" if code == 0 and done >= run.epochs else "stopped" if stopped else "failed"
            if code == 0 and done < run.epochs:
                line = f"exited 0 with {done} of {run.epochs} epochs in its statistics CSV"
            status = dict(name=run.name, values=dict(run.values), seed=run.seed, args=list(run.args),
                          status=state, exit_code=code, last_line=line, epochs=run.epochs, epochs_done=done,
                          seconds=round(seconds, 1))
            acc = final(rows, "test_acc@1")
            detail = f"{done} epochs, {seconds:.0f} s" + (f", kNN top-1 {acc:.2f}%" if acc is not None else "")
        else:
            state = "finished" if code == 0 else "stopped" if stopped else "failed"
            status["then"] = dict(script=self.plan.then.script, args=list(self.plan.then.args), exit_code=code,
                                  last_line=line, seconds=round(seconds, 1))
            acc = then_accuracy(run, self.plan.then)
            detail = f"{seconds:.0f} s" + (f", test top-1 {acc:.2f}%" if acc is not None and code == 0 else "")
        atomic_save_json(status, run.path("_sweep.json"))
        step = f"{self.plan.then.script}.py " if task.step == "then" else ""
        if state == "failed":
            self.failed += 1
            print(f"[{task.index}/{len(self.plan.runs)}] {run.name}: {step}failed (exit {code}): {line}",
                  file=sys.stderr, flush=True)
        else:
            print(f"[{task.index}/{len(self.plan.runs)}] {run.name}: {step}{state} ({detail})", flush=True)
        if task.step == "main" and state == "finished" and self.plan.then is not None and self.signum is None:
            return Task(run, "then", task.index)
        return None


# ----------------------------------------------------------------------------- the tables

def collect(plan: Plan) -> tuple[list[dict], list[str]]:
    """runs.csv's rows (one per run of the plan, from its status and CSVs) and the metrics of the tables."""
    rows, histories = [], []
    for run in plan.runs:
        status = read_status(run)
        history = read_rows(run.path("_statistics.csv"))
        done = is_finished(run, status, history)
        current = status is not None and status.get("args") == list(run.args)
        state = "finished" if done else status["status"] if current and status["status"] != "finished" else \
            "stopped" if history else "pending"
        row = {**dict(run.values), "seed": run.seed, "status": state,
               "exit_code": status.get("exit_code") if current else None,
               "epochs_done": epochs_done(history), "epochs": run.epochs}
        for key in CSV_METRICS:
            row[key], row[f"best_{key}"] = final(history, key), best(history, key)
        if plan.then is not None:
            record = (status or {}).get("then") or {}
            row[plan.then.metric] = then_accuracy(run, plan.then) if done and then_done(run, plan.then, status) \
                else None
            row["then_exit_code"] = record.get("exit_code") if done and record.get("args") == list(plan.then.args) \
                else None
            if done and record.get("exit_code") not in (0, None):
                row["last_line"] = record.get("last_line")
        row["seconds_per_epoch"] = seconds_per_epoch(history)
        row.setdefault("last_line", status.get("last_line") if current and state != "finished" else None)
        row["folder"] = run.folder
        rows.append(row)
        histories.append(history)
    finished = [r for r in rows if r["status"] == "finished"]
    metrics = [m for m in CSV_METRICS if m in ALWAYS_METRICS or any(r[m] is not None for r in finished)]
    if plan.then is not None:
        metrics.append(plan.then.metric)
    return rows, metrics


def runs_columns(plan: Plan, metrics: list[str]) -> list[str]:
    columns = [*plan.keys, "seed", "status", "exit_code", "epochs_done", "epochs"]
    for m in metrics:
        columns += [m] if plan.then is not None and m == plan.then.metric else [m, f"best_{m}"]
    if plan.then is not None:
        columns.append("then_exit_code")
    return columns + ["seconds_per_epoch", "last_line", "folder"]


def describe(values: list[float]) -> dict:
    """n, mean, sample sd and the 95% t interval of the mean (sd and interval need two values)."""
    from scipy import stats
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return dict(n=n, mean=mean, sd=None, low=None, high=None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n)) if sd > 0 else (mean, mean)
    return dict(n=n, mean=mean, sd=sd, low=float(low), high=float(high))


def summarize(plan: Plan, rows: list[dict], metrics: list[str]) -> list[dict]:
    """summary.csv: per configuration, the finished seeds' mean, sd and 95% interval of every metric."""
    table, by_config = [], {}
    for r in rows:  # grouped once: the tables stay linear in the runs
        if r["status"] == "finished":
            by_config.setdefault(tuple(r[k] for k in plan.keys), []).append(r)
    for config in plan.configs:
        done = by_config.get(config, [])
        row = {**dict(zip(plan.keys, config)), "n": len(done), "missing": len(plan.seeds) - len(done)}
        for m in metrics:
            d = describe([r[m] for r in done if r[m] is not None])
            row.update({f"{m}_mean": d["mean"], f"{m}_sd": d["sd"], f"{m}_ci95_low": d["low"],
                        f"{m}_ci95_high": d["high"]})
        row["seconds_per_epoch"] = describe([r["seconds_per_epoch"] for r in done
                                             if r["seconds_per_epoch"] is not None])["mean"]
        table.append(row)
    return table


def summary_columns(plan: Plan, metrics: list[str]) -> list[str]:
    return [*plan.keys, "n", "missing",
            *(f"{m}_{s}" for m in metrics for s in ("mean", "sd", "ci95_low", "ci95_high")), "seconds_per_epoch"]


COMPARISON_STATS = ("metric", "n", "baseline_mean", "mean", "difference", "difference_ci95_low",
                    "difference_ci95_high", "t", "p", "agree")


def compare(plan: Plan, rows: list[dict], metrics: list[str]) -> list[dict]:
    """comparison.csv: every configuration against the baseline, paired by seed (scipy's paired t-test)."""
    import warnings
    from scipy import stats
    by = {(tuple(r[k] for k in plan.keys), r["seed"]): r for r in rows if r["status"] == "finished"}
    table = []
    for config in plan.configs:
        if config == plan.baseline:
            continue
        for m in metrics:
            pairs = [(by[(config, s)][m], by[(plan.baseline, s)][m]) for s in plan.seeds
                     if (config, s) in by and (plan.baseline, s) in by
                     and by[(config, s)][m] is not None and by[(plan.baseline, s)][m] is not None]
            n = len(pairs)
            a, b = [p[0] for p in pairs], [p[1] for p in pairs]
            diffs = [x - y for x, y in pairs]
            mean_diff = sum(diffs) / n if n else None
            row = {**dict(zip(plan.keys, config)), "metric": m, "n": n,
                   "baseline_mean": sum(b) / n if n else None, "mean": sum(a) / n if n else None,
                   "difference": mean_diff, "difference_ci95_low": None, "difference_ci95_high": None,
                   "t": None, "p": None,
                   "agree": sum(1 for d in diffs if d * (mean_diff or 0) > 0 or d == mean_diff == 0) if n else None}
            if n >= 2 and len(set(diffs)) > 1:  # identical differences have no spread: t and p are undefined
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    result = stats.ttest_rel(a, b)
                    interval = result.confidence_interval(0.95)
                row.update(t=float(result.statistic), p=float(result.pvalue),
                           difference_ci95_low=float(interval.low), difference_ci95_high=float(interval.high))
            table.append(row)
    return table


def draw_curves(plan: Plan, path: str) -> None:
    """curves.png: kNN top-1 against epoch per configuration, the finished seeds' mean and a band of one sd."""
    from .curves import epoch_axes, pyplot, save
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn, done = 0, {}
    for r in plan.runs:
        history = read_rows(r.path("_statistics.csv"))
        if is_finished(r, read_status(r), history):
            done.setdefault(r.config, []).append(history)
    for config in plan.configs:
        histories = done.get(config, [])
        per_epoch: dict[float, list[float]] = {}
        for history in histories:
            for row in history:
                if row.get("epoch") is not None and row.get("test_acc@1") is not None:
                    per_epoch.setdefault(row["epoch"], []).append(row["test_acc@1"])
        epochs = sorted(per_epoch)
        if not epochs:
            continue
        stats = [describe(per_epoch[e]) for e in epochs]
        mean = [s["mean"] for s in stats]
        sd = [s["sd"] or 0.0 for s in stats]
        label = ", ".join(f"{k}={v}" for k, v in zip(plan.keys, config)) or "runs"
        line, = ax.plot(epochs, mean, marker=".", label=f"{label} (n={len(histories)})")
        ax.fill_between(epochs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title=f"sweep {plan.name}: mean and one sd over seeds")
    epoch_axes(ax)
    if drawn:
        ax.legend(fontsize="small")
    fig.tight_layout()
    save(fig, path)


def write_tables(plan: Plan) -> tuple[list[dict], list[dict], list[str]]:
    """runs.csv, summary.csv, comparison.csv (with a baseline) and curves.png under OUT, each written whole."""
    rows, metrics = collect(plan)
    atomic_write_csv(os.path.join(plan.out, "runs.csv"), runs_columns(plan, metrics), rows)
    summary = summarize(plan, rows, metrics)
    atomic_write_csv(os.path.join(plan.out, "summary.csv"), summary_columns(plan, metrics), summary)
    comparison = []
    if plan.baseline is not None:
        comparison = compare(plan, rows, metrics)
        atomic_write_csv(os.path.join(plan.out, "comparison.csv"), [*plan.keys, *COMPARISON_STATS], comparison)
    try:
        draw_curves(plan, os.path.join(plan.out, "curves.png"))
    except Exception as e:  # noqa: BLE001 - a drawing problem must not hide the tables
        print(f"warning: could not draw curves.png: {e}", file=sys.stderr)
    return summary, comparison, metrics


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def print_tables(plan: Plan, summary: list[dict], comparison: list[dict], metrics: list[str]) -> None:
    """The summary (and the comparison) as aligned text."""
    def config_text(row):
        return " ".join(f"{k}={row[k]}" for k in plan.keys) or "runs"

    def table(header, lines):
        widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
        for line in (header, *lines):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())

    print(f"\nsweep {plan.name}: {len(plan.runs)} runs, tables in {plan.out}; mean ± sd [95% interval] "
          f"over the finished seeds")
    table(["configuration", "n", "missing", *metrics, "s/epoch"],
          [[config_text(r), r["n"], r["missing"],
            *(f"{fmt(r[f'{m}_mean'])} ± {fmt(r[f'{m}_sd'])} [{fmt(r[f'{m}_ci95_low'])}, {fmt(r[f'{m}_ci95_high'])}]"
              for m in metrics), fmt(r["seconds_per_epoch"], 1)] for r in summary])
    if plan.baseline is not None:
        base = " ".join(f"{k}={v}" for k, v in zip(plan.keys, plan.baseline))
        print(f"\nagainst the baseline {base}, paired by seed (difference [95% interval], paired t-test)")
        table(["configuration", "metric", "n", "difference", "t", "p", "agree"],
              [[config_text(r), r["metric"], r["n"],
                f"{fmt(r['difference'])} [{fmt(r['difference_ci95_low'])}, {fmt(r['difference_ci95_high'])}]",
                fmt(r["t"]), fmt(r["p"], 4), f"{r['agree'] if r['agree'] is not None else '-'}/{r['n']}"]
               for r in comparison])
    missing = sum(r["missing"] for r in summary)
    if missing:
        print(f"{missing} of {len(plan.runs)} runs are not finished (runs.csv says which and why); "
              f"run the same command again to continue them")


# ----------------------------------------------------------------------------- the job

def dry_run(plan: Plan, tasks: list[Task]) -> int:
    """List every run, what a sweep would do with it, and its command; start nothing, write nothing."""
    todo = {(t.run.name, t.step): t for t in tasks}
    print(f"sweep {plan.name}: {len(plan.runs)} runs ({len(plan.configs)} configurations x {len(plan.seeds)} "
          f"seeds) in {plan.out}, {len(plan.slots)} at a time; dry run, nothing started")
    for i, run in enumerate(plan.runs, 1):
        main, then = todo.get((run.name, "main")), todo.get((run.name, "then"))
        if main is not None:
            cmd = command(plan, main)
            print(f"[{i}/{len(plan.runs)}] {run.name}: {'resume' if '--resume' in cmd[-2:] else 'start'}: "
                  f"{shlex.join(cmd)}")
        else:
            print(f"[{i}/{len(plan.runs)}] {run.name}: finished")
        if plan.then is not None and (main is not None or then is not None):
            print(f"    then: {shlex.join(command(plan, Task(run, 'then', i)))}")
    return 0


def lock_out(out: str) -> RunLock:
    """The lock of OUT for this sweep: a second sweep into the same folder would fight this one."""
    lock = RunLock(out, "sweep")
    try:
        return lock.acquire()
    except RunNameInUse:
        try:
            with open(lock.path, encoding="utf-8", errors="replace") as f:
                holder = f.read(64).strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise UserError(f"another sweep (process {holder}) is running into {out}; wait for it to end, or give "
                        f"this one another --out") from None


def run(values: dict, main_args: list[str]) -> int:
    """sweep.py's job: plan (every check first), run what is left, write and print the tables."""
    the_plan = plan(values, main_args)
    sweep = Sweep(the_plan)
    tasks = sweep.tasks()  # every run's status read and checked before the lock makes OUT
    if values["dry_run"]:
        return dry_run(the_plan, tasks)
    lock = lock_out(the_plan.out)
    try:
        tasks = sweep.tasks()  # again under the lock: a sweep that held it may have finished runs since
        skipped = len(the_plan.runs) - len({t.run.name for t in tasks if t.step == "main"})
        if skipped:
            print(f"{skipped} of {len(the_plan.runs)} runs finished before: kept")
        sweep.execute(tasks)
        summary, comparison, metrics = write_tables(the_plan)
    finally:
        lock.release()
    print_tables(the_plan, summary=summary, comparison=comparison, metrics=metrics)
    if sweep.failed:
        print(f"{sweep.failed} run{'s' * (sweep.failed != 1)} failed: runs.csv has the exit code and last line "
              f"of each; NAME_stderr.txt in its folder the whole output", file=sys.stderr)
    if sweep.signum is not None:
        print(f"stopped by {signal.Signals(sweep.signum).name}; run the same command again to continue",
              file=sys.stderr)
        return 128 + sweep.signum
    return 0
