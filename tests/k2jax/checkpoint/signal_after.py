"""convert_checkpoint.py that signals itself once it has recorded a number of tensors as done: a crash (SIGKILL) or a
Ctrl-C (SIGINT) part-way through a conversion at a point fixed in advance, however fast or loaded the machine is (a
test that watches the progress log and signals from outside can find the conversion already finished).

    python tests/k2jax/checkpoint/signal_after.py KILL 200 --hf_dir=... --out_dir=... --sync_gb=0  # its flags

The signal is sent once, right after the record of the N-th tensor is written: with --sync_gb=0 each tensor is
recorded on its own
(the conversion waits for a record to be durable before the next tensor lands, where it would otherwise batch the
tensors that landed meanwhile, as many as a loaded machine lets pile up). KILL ends the process there, INT raises
KeyboardInterrupt in its main thread as Ctrl-C does."""

import os
import runpy
import signal
import sys

from k2jax.checkpoint import convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def signal_after(records: int, sig: signal.Signals) -> None:
    """Wraps convert._ProgressLog to record one tensor at a time and send `sig` to this process once `records`
    tensors were recorded."""
    real_record, real_landed = convert._ProgressLog._record, convert._ProgressLog.landed
    recorded = [0]

    def landed(self, name, nbytes):
        real_landed(self, name, nbytes)
        if self.syncing is not None:
            self.syncing.result()  # this tensor's record written before the next tensor lands

    def _record(self, names):
        real_record(self, names)
        before, recorded[0] = recorded[0], recorded[0] + len(names)
        if before < records <= recorded[0]:
            os.kill(os.getpid(), sig)

    convert._ProgressLog._record, convert._ProgressLog.landed = _record, landed


if __name__ == "__main__":
    signal_after(int(sys.argv[2]), signal.Signals["SIG" + sys.argv[1]])
    script = os.path.join(ROOT, "convert_checkpoint.py")
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
