"""APEX reward function for OpenRLHF: pass this file's path as ``--reward.remote_url``.

    export APEX_OPENRLHF_MODEL=/path/to/apex-checkpoint       # score in the trainer's process
    export APEX_OPENRLHF_DECODER=my_codec:text_to_audio       # response text -> (waveform, rate)
    python -m openrlhf.cli.train_ppo_ray ... \\
        --reward.remote_url "$(python -m apex_reward.integrations.openrlhf_reward)"

or ``APEX_OPENRLHF_URL=http://127.0.0.1:8000`` to score through ``apex-reward serve``. OpenRLHF
loads this file on its own (not as part of the package) and calls
``reward_func(queries, prompts, labels)``; everything lives in
:mod:`apex_reward.integrations.openrlhf`, imported by its absolute name. Running the file prints
its own path.
"""

import sys

from apex_reward.integrations.openrlhf import reward_func

__all__ = ["reward_func"]

if __name__ == "__main__":
    sys.stdout.write(__file__ + "\n")
