"""The command-line shell every script shares: its errors, its parser, its signals and its exit codes.

    exit 0    done
    exit 1    the run's result is not valid (a non-finite loss; a frozen encoder that moved)
    exit 2    a problem the user can fix: one line that says what was wrong and what to do
    exit 130  Ctrl-C (SIGINT), 143 SIGTERM: files on disk are whole, a checkpoint says where to resume

A script's `main(argv)` is `run_cli(lambda: its_run(argv))`: the script raises, this module
decides what the user reads and which code the shell sees. Importing it does nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import shlex
import signal
import sys
from typing import Callable, Iterator


class UserError(Exception):
    """Something the user can fix (a flag, a file, a folder): printed as one line, exit code 2."""


class DataError(UserError):
    """A data set that cannot be read as asked (missing offline, bad layout): one line, exit code 2."""


class InvalidResult(Exception):
    """The run finished or stopped, but its numbers must not be used: one line, exit code 1."""


class NonFiniteLoss(InvalidResult):
    """The training loss became NaN or infinite."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: under run_cli a bad flag is one line and exit code 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 200 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one stops at once.

    `exit_code` is 128 + the number of the first signal, also when a second one cut the wait short.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self.evaluating: str | None = None   # None while steps run; "stop" / "finish" during an evaluation

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @contextlib.contextmanager
    def evaluation(self, interruptible: bool) -> Iterator[None]:
        """The end-of-epoch evaluation: a signal then stops it at once (EvaluationStopped) when interruptible,
        else it is finished first (under torchrun every rank must take part in it)."""
        self.evaluating = "stop" if interruptible else "finish"
        try:
            if interruptible and self.requested:
                raise EvaluationStopped(self.signum)
            yield
        finally:
            self.evaluating = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)
        self.signum = signum
        name = signal.Signals(signum).name
        if self.evaluating == "stop":
            print(f"\n{name}: stopping this epoch's evaluation and saving a checkpoint (the evaluation runs "
                  f"again on resume)", file=sys.stderr, flush=True)
            raise EvaluationStopped(signum)
        doing = "this epoch's evaluation" if self.evaluating == "finish" else "this step"
        print(f"\n{name}: finishing {doing}, then saving a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)


def resume_command(script: str) -> str:
    """The command line that continues a stopped run: this one, with `--resume auto` instead of any --resume."""
    args = list(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(script) else []
    if "--resume" in args:
        i = args.index("--resume")
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    return shlex.join(["python", script, *args, "--resume", "auto"])  # quoted: a name with a space pastes back


class Interrupted(KeyboardInterrupt):
    """A second signal during a StopRequest: leave now, with the code of the first one."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


class EvaluationStopped(BaseException):
    """A signal during an interruptible end-of-epoch evaluation: the epoch's steps are saved, its evaluation
    is left for the resumed run. A BaseException, so no `except Exception` inside the evaluation takes it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def _is_out_of_memory(e: BaseException) -> bool:
    """True for torch's out-of-memory error; torch is not imported for this (a script may fail before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def is_write_failure(e: BaseException) -> bool:
    """True for the RuntimeError of torch.save's zip writer when a write fails (a full disk: 'unexpected pos')."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "unexpected pos" in text
                                            or "PytorchStreamWriter failed" in text)


DEFAULT_OOM_ADVICE = "use a smaller batch (--batch_size, --eval_batch_size) or --precision bf16"


def run_cli(job: Callable[[], int], oom_advice: str = DEFAULT_OOM_ADVICE,
            prefix: Callable[[], str] = lambda: "", cleanup: Callable[[], None] | None = None) -> int:
    """Run a script's job and turn what it raises into the documented message and exit code.

    prefix() is put before each message (under torchrun: the rank); cleanup() runs at the end either way.
    """
    def say(message: str) -> None:
        print(f"{prefix()}error: {message}", file=sys.stderr, flush=True)

    # SIGTERM, where nothing else handles it, stops like Ctrl-C: one line and exit 143, not a silent death
    # (main.py and finetune.py put their StopRequest over this while they train)
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return job()
    except UserError as e:
        say(str(e))
        return 2
    except InvalidResult as e:
        say(str(e))
        return 1
    except OSError as e:  # a full disk, a read-only or missing folder: the environment, not a bug
        where = f"{e.filename}: " if e.filename else ""
        say(f"{where}{e.strerror or first_line(e)}; {os_error_advice(e)}")
        return 2
    except Exception as e:
        if is_write_failure(e):
            say("a file could not be written (no space left on device?); free space or choose another folder, "
                "then run again")
            return 2
        if not _is_out_of_memory(e):
            raise
        say(f"out of GPU memory; {oom_advice}")
        return 2
    except KeyboardInterrupt as e:
        print("interrupted; files on disk are complete (each is written whole or not at all)", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)
        if cleanup is not None:
            cleanup()


# What to do about an OSError, by its errno; the advice names the real cause, never a full disk by default.
_OS_ADVICE = {
    errno.ENOSPC: "free space or choose another folder, then run again",
    errno.EDQUOT: "free space (your disk quota is full) or choose another folder, then run again",
    errno.EROFS: "the file system is read-only; choose another folder (--results_dir, --out)",
    errno.EACCES: "you may not write or read there; fix its permissions or choose another folder",
    errno.EPERM: "you may not write or read there; fix its permissions or choose another folder",
    errno.EEXIST: "something of that name is already there; move it away or choose another name",
    errno.EISDIR: "that is a folder, where a file was expected; choose a file path",
    errno.ENOTDIR: "a part of that path is a file, where a folder was expected; choose another path",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter name",
    errno.EIO: "the disk reported an I/O error; check the disk, or choose another folder",
}


def os_error_advice(e: OSError) -> str:
    """What a user can do about `e`: advice for its errno, else to check the path and run again."""
    return _OS_ADVICE.get(e.errno, "check that path (it could not be read or written), then run again")


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)
