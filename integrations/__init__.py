"""apex_reward.integrations: TRL reward functions and preference pairs, PEFT adapters, reward server.

Needs the ``trl`` and/or ``serve`` extras: ``pip install 'apex-reward[trl,serve]'``.
"""
