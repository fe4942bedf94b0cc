"""torchrun, for this trainer: ``python -m rnd1.launch [torchrun options] -m rnd1.train ...``.

``run_train.sh`` starts training through this module instead of ``python -m torch.distributed.run``
(same options, same behaviour) for one reason: exit code 2. The trainer exits 2 on bad input
(config, data, checkpoint, layout) after printing one line that names the culprit, and that line
is the whole story. torchrun treats it as a crash: a 35-line ``ChildFailedError`` report and exit
1. Here, when every worker that failed on its own exited 2 (the others being stopped by torchrun),
the launcher exits 2 and adds nothing. Any other failure keeps torchrun's report, unchanged.

A stop signal to the launcher (SIGTERM, SIGUSR1, SIGHUP or SIGQUIT from a scheduler, SIGINT from
Ctrl-C) is forwarded to the workers, and the launcher waits for them: the trainer finishes its
step, saves and exits 0. Three things differ from plain torchrun:

- SIGUSR1 (Slurm's usual ``--signal``) is handled like SIGTERM; torchrun would die of it at once
  and leave the workers saving as orphans of a job the scheduler thinks has ended.
- torchrun SIGKILLs the workers 30 s after forwarding the signal, which ends any save longer than
  that (a 30B-A3B DCP save takes minutes) with no checkpoint. Here the launcher waits as long as
  the workers take: the scheduler's own deadline (Slurm's ``--signal`` lead time and KillWait,
  Kubernetes' ``terminationGracePeriodSeconds``) is the limit. ``RND1_STOP_GRACE_S`` (seconds)
  sets a limit of the launcher's own. A second signal while the workers save is passed on to them
  (the trainer then exits at once, without a checkpoint).
- torchrun would exit 1 with a ``SignalException`` traceback; here, when every worker exited 0,
  the launcher prints one line and exits 0; otherwise one line and 128 + the signal number.

A rank that dies (kill -9, the OOM killer) makes the others' collectives fail; they name it in one
line and exit 3 (``rnd1.parallel.env.collective_timeout_message``), and the launcher adds nothing,
where torchrun would print its report of every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing import api as _mp_api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

BAD_INPUT = 2  # rnd1.train's exit code for bad input
LOST_PEER = 3  # rnd1.train's exit code when a peer rank died or froze (its one line printed)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT)
# How torchrun stops the remaining workers once one has failed.
_STOPPED_BY_TORCHRUN = {-signal.SIGTERM, -signal.SIGKILL}
# The logger that reports worker exits ("failed (exitcode: 2) ...", "Sending process ... SIGTERM").
_TEARDOWN_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def failed_on_bad_input(err: ChildFailedError) -> bool:
    """True when the workers failed only because of bad input, already reported by the worker."""
    codes = {failure.exitcode for failure in err.failures.values()}
    return BAD_INPUT in codes and codes <= {BAD_INPUT, *_STOPPED_BY_TORCHRUN}


def failed_on_lost_peer(err: ChildFailedError) -> bool:
    """True when a rank was killed by a signal (or froze) and the others stopped on that, having
    named it in one line (exit 3): the line is the story, not torchrun's report."""
    codes = {failure.exitcode for failure in err.failures.values()}
    return LOST_PEER in codes and all(c == LOST_PEER or c < 0 for c in codes)


def stop_grace_s() -> float | None:
    """``RND1_STOP_GRACE_S``: how long the launcher waits for signalled workers before SIGKILL
    (unset or empty: as long as they take)."""
    raw = os.environ.get("RND1_STOP_GRACE_S", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise SystemExit(f"RND1_STOP_GRACE_S={raw!r}: expected seconds >= 0 (or unset: wait for the workers)")
    return value

class _HoldBack(logging.Filter):
    """Keeps torchrun's worker-exit log lines until the outcome is known: they are noise after a
    one-line bad-input message, and part of the story after a crash."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False


# Exit codes of the workers torchrun stopped (local rank -> code), recorded when it closes them.
_closed_exit_codes: dict[int, int | None] = {}
_original_close = _mp_api.SubprocessContext._close
_signalled: list[int] = []  # the stop signal this launcher got, once it got one
_closing: list = []  # the worker context being closed (a second signal is passed on to it)
_torch_signal_handler = _mp_api._terminate_process_handler


def _on_signal(signum, frame):
    """torchrun's handler (raise SignalException: torchrun forwards the signal and waits), for the
    first stop signal; a later one goes to the workers, which then exit without saving."""
    if _signalled:
        for handle in (_closing[0].subprocess_handlers.values() if _closing else ()):
            if handle.proc.poll() is None:
                handle.proc.send_signal(signum)
        return
    _signalled.append(signum)
    _torch_signal_handler(signum, frame)


def _close_and_record(self, death_sig=None, timeout=30):
    """torchrun's close, with the wait after a stop signal set by ``stop_grace_s`` (unbounded by
    default) instead of 30 s, and the workers' exit codes recorded."""
    if _signalled:
        grace = stop_grace_s()
        timeout = 10 ** 9 if grace is None else grace
    _closing[:] = [self]
    try:
        _original_close(self, death_sig=death_sig, timeout=timeout)
    finally:
        _closing.clear()
        _closed_exit_codes.update({rank: h.proc.poll() for rank, h in self.subprocess_handlers.items()})


_mp_api.SubprocessContext._close = _close_and_record
_mp_api._terminate_process_handler = _on_signal  # what torchrun installs for the signals it handles


def _after_signal(sig: signal.Signals) -> int:
    codes = dict(_closed_exit_codes)
    if codes and all(code == 0 for code in codes.values()):
        print(f"[rnd1] launcher: {sig.name}: every worker saved and exited 0", file=sys.stderr, flush=True)
        return 0
    print(f"[rnd1] launcher: {sig.name}: workers stopped (exit codes by local rank: {codes or 'unknown'})",
          file=sys.stderr, flush=True)
    return 128 + int(sig)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop_grace_s()  # a bad value fails now, not when the scheduler signals
    for sig in STOP_SIGNALS:  # torchrun installs its own for those it handles; SIGUSR1 is ours
        signal.signal(sig, _on_signal)
    logger = logging.getLogger(_TEARDOWN_LOGGER)
    hold = _HoldBack()
    logger.addFilter(hold)
    quiet = False
    try:
        run(args)
    except SignalException as e:
        quiet = True  # the signal and the workers' outcome are the story, in one line
        return _after_signal(signal.Signals(e.sigval))
    except ChildFailedError as e:
        if failed_on_bad_input(e):
            quiet = True
            return BAD_INPUT
        if failed_on_lost_peer(e):
            quiet = True
            return LOST_PEER
        raise
    finally:
        logger.removeFilter(hold)
        if not quiet:
            for held in hold.held:
                logger.handle(held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
