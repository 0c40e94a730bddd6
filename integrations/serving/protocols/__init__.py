"""Protocol adapters of the reward server: request and reply shapes of other frameworks.

* :mod:`~apex_reward.integrations.serving.protocols.openrlhf`: OpenRLHF's remote reward
  (``POST /get_reward``).
"""
