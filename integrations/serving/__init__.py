"""``apex_reward.integrations.serving``: the HTTP reward server and its client.

::

    from apex_reward.integrations.serving import ApexRewardClient, ServeConfig, create_app

A FastAPI app served by uvicorn (``apex-reward serve``). Every clip a request carries is decoded
and checked on its own (a few decode threads), then queued for a :class:`DynamicBatcher` that
scores concurrent requests' clips together in one forward pass on a single worker thread, so the
event loop keeps answering (health checks, metrics, uploads) while the model runs.

The package reads as the architecture:

* :mod:`.config`: :class:`ServeConfig`, the options (flags) of ``apex-reward serve``;
* :mod:`.app`: :func:`create_app`, the routes; :mod:`.bodies`: reading request bodies, with
  :mod:`.schemas`, the JSON request bodies as pydantic models;
* :mod:`.middleware`: API key, body limit and request metrics; :mod:`.metrics`: Prometheus;
* :mod:`.errors`: the typed errors and the one mapping from error type to HTTP status;
* :mod:`.decoding`: base64, ``--allow-dir`` paths, decoding and input limits; :mod:`.limits`:
  the decoded-size budget (samples x channels per clip, request and queue); :mod:`.admission`:
  headers first, then the budget, then decoding;
* :mod:`.hosts`: the ``Host`` and ``Origin`` checks; :mod:`.transport`: uvicorn's HTTP protocol
  with JSON 400s and header timeouts, and access-log key redaction;
* :mod:`.state`: what the endpoints share, and the scoring of clips;
* :mod:`.batcher`: the dynamic batcher; :mod:`.protocols.openrlhf`: ``POST /get_reward``;
* :mod:`.command`: ``apex-reward serve``; :mod:`.client`: :class:`ApexRewardClient`, with
  :mod:`.wire`, what it sends and reads back.

Security: binds 127.0.0.1 unless ``--host`` says otherwise; with ``--api-key-env VAR`` every
endpoint but ``/health`` and ``/ready`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``
(compared in constant time); server-side paths are off unless ``--allow-dir`` names a directory,
and never resolve outside it (symlinks included); request bodies, clip counts, audio length,
channels, sample rates and decoded size are bounded before audio is decoded; slow clients are
timed out; foreign ``Host`` and ``Origin`` headers are refused.

fastapi, uvicorn, python-multipart, prometheus-client and httpx come with
``pip install 'apex-reward[serve]'``; importing this package imports none of them (they are
imported when an app is built, served, or a client connects).
"""

from .app import create_app
from .batcher import BatcherStoppedError, DynamicBatcher, OverloadedError
from .client import API_KEY_ENV, ApexRewardClient, Comparison, RemoteError
from .command import serve
from .config import STANDARD_SAMPLE_RATES, ServeConfig
from .errors import ClipError, RequestError, status_of
from .protocols.openrlhf import find_audio_reference
from .state import preference_logit

__all__ = [
    "ServeConfig",
    "STANDARD_SAMPLE_RATES",
    "create_app",
    "serve",
    "ApexRewardClient",
    "Comparison",
    "RemoteError",
    "API_KEY_ENV",
    "DynamicBatcher",
    "OverloadedError",
    "BatcherStoppedError",
    "ClipError",
    "RequestError",
    "status_of",
    "find_audio_reference",
    "preference_logit",
]
