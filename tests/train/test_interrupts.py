import os
import signal
import time

import pytest

from observatory.train import (
    interrupts_between_steps,
    raise_if_interrupted,
)


def test_ctrl_c_while_training_is_held_until_the_next_step_boundary():
    handler = signal.getsignal(signal.SIGINT)
    with interrupts_between_steps():
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-"step": nothing is raised here
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()  # the boundary raises it
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C interrupts at once
            time.sleep(1)
    raise_if_interrupted()  # cleared on leaving the block
    assert signal.getsignal(signal.SIGINT) is handler
