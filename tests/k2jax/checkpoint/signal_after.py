"""convert_checkpoint.py that signals itself once it has recorded a number of tensors as done: a crash (SIGKILL) or a
Ctrl-C (SIGINT) part-way through a conversion at a point fixed in advance, however fast or loaded the machine is (a
test that watches the progress log and signals from outside can find the conversion already finished).

    python tests/k2jax/checkpoint/signal_after.py KILL 200 --hf_dir=... --out_dir=...   # convert_checkpoint.py's flags

The signal is sent once, after the write of the record that takes this run's count to K2JAX_SIGNAL_AFTER or past
it (records are written in batches, so a few more tensors may be recorded): KILL ends the process there, INT raises
KeyboardInterrupt in its main thread as Ctrl-C does."""

import os
import runpy
import signal
import sys

from k2jax.checkpoint import convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def signal_after(records: int, sig: signal.Signals) -> None:
    """Wraps convert._ProgressLog._record to send `sig` to this process once `records` tensors were recorded."""
    real_record = convert._ProgressLog._record
    recorded = [0]

    def _record(self, names):
        real_record(self, names)
        before, recorded[0] = recorded[0], recorded[0] + len(names)
        if before < records <= recorded[0]:
            os.kill(os.getpid(), sig)

    convert._ProgressLog._record = _record


if __name__ == "__main__":
    signal_after(int(sys.argv[2]), signal.Signals["SIG" + sys.argv[1]])
    script = os.path.join(ROOT, "convert_checkpoint.py")
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
