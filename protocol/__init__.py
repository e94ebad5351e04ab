"""Typed messages, validation, kudos costs and signing shared by every idlegrid part.

Pure: no I/O, no torch; every other package imports it and it imports none of them. (The
exceptions, documented where they are: a command's settings read the environment and its
`--config` file while its flags are parsed, and services install signal handlers.)

    params.py      ImageParams: what to generate, with its hard limits
    control.py     ControlNet: AI Horde's control types, what serving one needs, its checks
    postprocess.py AI Horde's post-processors (names, prices, sizes) and the hires fix's
                   first-pass size
    samplers.py    sampler names as AUTOMATIC1111 users know them, and cost factors
    messages.py    request/response models of the HTTP API
    engine.py      EngineCall: the typed calls between a worker and its sandboxed engine
    validation.py  pydantic errors -> (field, fix) messages
    cost.py        kudos cost formulas
    priority.py    queue order: kudos head start, aging, owner first
    signing.py     Ed25519 identities, canonical JSON, what gets signed
    peer_ids.py    libp2p peer ids: the key behind one, and checking its signature
    infotext.py    the AUTOMATIC1111 `parameters` text stored in PNGs
    refiner.py     which jobs an SDXL refiner finishes; a worker's refiner setup
    loras.py       CivitAI LoRAs and textual inversions of a job; baselines
    image_models.py  an image model of the operator's reference (hash, limits, baseline)
    adapted.py     the engine call of a job with them; what a result signs about them
    preview.py     live previews: their bounds, formats and the `preview` event
    settings.py    one declaration per setting: a command's flags, environment variables
                   and config-file keys from a pydantic model (no I/O: see its docstring)
    config_file.py `--config FILE`: a command's flags from a TOML file (the one file
                   protocol reads: see its docstring)
    signals.py     SIGINT/SIGTERM -> stop, for every service (installs handlers only)
    errors.py      ProtocolError and its subclasses
"""

from protocol.cost import image_cost
from protocol.errors import ProtocolError, SignatureInvalid, ValidationFailed
from protocol.params import ImageParams
from protocol.samplers import SAMPLERS
from protocol.signing import Identity, canonical_json, params_hash, verify
from protocol.validation import parse

__all__ = [
    "SAMPLERS",
    "Identity",
    "ImageParams",
    "ProtocolError",
    "SignatureInvalid",
    "ValidationFailed",
    "canonical_json",
    "image_cost",
    "params_hash",
    "parse",
    "verify",
]
