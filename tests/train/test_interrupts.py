import os
import signal
import time

import pytest

from observatory.train import (
    Interrupted,
    interrupts_between_steps,
    raise_if_interrupted,
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_training_is_held_until_the_next_step_boundary(sig):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts_between_steps():
        os.kill(os.getpid(), sig)  # arrives mid-"step": nothing is raised here
        time.sleep(0.05)
        with pytest.raises(Interrupted) as stopped:
            raise_if_interrupted()  # the boundary raises it
        assert stopped.value.signum == sig
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)  # a second signal interrupts at once
            time.sleep(1)
    raise_if_interrupted()  # cleared on leaving the block
    assert {s: signal.getsignal(s) for s in handlers} == handlers
