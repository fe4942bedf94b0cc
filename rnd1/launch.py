"""torchrun, for this trainer: ``python -m rnd1.launch [torchrun options] -m rnd1.train ...``.

``run_train.sh`` starts training through this module instead of ``python -m torch.distributed.run``
(same options, same behaviour) for one reason: exit code 2. The trainer exits 2 on bad input
(config, data, checkpoint, layout) after printing one line that names the culprit, and that line
is the whole story. torchrun treats it as a crash: a 35-line ``ChildFailedError`` report and exit
1. Here, when every worker that failed on its own exited 2 (the others being stopped by torchrun),
the launcher exits 2 and adds nothing. Any other failure keeps torchrun's report, unchanged.

A signal to the launcher (SIGTERM from a scheduler, SIGINT from Ctrl-C) is forwarded to the workers
by torchrun, which then waits for them; the trainer finishes its step, saves and exits 0. torchrun
itself would then exit 1 with a ``SignalException`` traceback; here, when every worker exited 0,
the launcher prints one line and exits 0 too; otherwise one line and 128 + the signal number.
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing import api as _mp_api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

BAD_INPUT = 2  # rnd1.train's exit code for bad input
# How torchrun stops the remaining workers once one has failed.
_STOPPED_BY_TORCHRUN = {-signal.SIGTERM, -signal.SIGKILL}
# The logger that reports worker exits ("failed (exitcode: 2) ...", "Sending process ... SIGTERM").
_TEARDOWN_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def failed_on_bad_input(err: ChildFailedError) -> bool:
    """True when the workers failed only because of bad input, already reported by the worker."""
    codes = {failure.exitcode for failure in err.failures.values()}
    return BAD_INPUT in codes and codes <= {BAD_INPUT, *_STOPPED_BY_TORCHRUN}


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


def _close_and_record(self, *args, **kwargs):
    try:
        _original_close(self, *args, **kwargs)
    finally:
        _closed_exit_codes.update({rank: h.proc.poll() for rank, h in self.subprocess_handlers.items()})


_mp_api.SubprocessContext._close = _close_and_record


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
        if not failed_on_bad_input(e):
            raise
        quiet = True
        return BAD_INPUT
    finally:
        logger.removeFilter(hold)
        if not quiet:
            for held in hold.held:
                logger.handle(held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
