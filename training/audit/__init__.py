"""The reward-hacking audit (``apex-reward audit``): what a reward model pays for things that are
not music, and how fast a gradient finds them.

* :mod:`.guarded`: the one source of rewards and flags under a guard policy;
* :mod:`.probes`: reference clips and the static probes (silence, noise, tones, loops, ladders);
* :mod:`.attack`: Adam on the waveform against the guarded reward;
* :mod:`.config`: the options (:class:`AuditConfig`);
* :mod:`.job`: the audit as named steps (:func:`run_audit`);
* :mod:`.records`: what the steps produce (a clip's scores, the reference set, scored probes, the
  attack's result);
* :mod:`.report`: percentiles, the SNR-ladder check, ``report.md`` and the plots;
* :mod:`.command`: the ``apex-reward audit`` command line.

See ``docs/integrity.md``.
"""

from __future__ import annotations

from .config import AuditConfig
from .job import run_audit

__all__ = ["AuditConfig", "run_audit"]
