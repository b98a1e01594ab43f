"""Checkpoints as lazy tensor dicts: ``Checkpoint`` reads one tensor at a time, ``CheckpointWriter`` streams shards.

Reading never maps a whole file: each tensor is one positioned read into fresh memory, so the resident set stays at
about one tensor however large the checkpoint (mapped pages of a 70B file would count toward RSS as they are
touched). Writing streams tensor data straight into shard files and fills in their headers at commit, inside a
temporary sibling directory that is renamed into place only when everything succeeded.
"""

from weightsmith.checkpoint.files import DEFAULT_SHARD_SIZE, TensorInfo
from weightsmith.checkpoint.reader import Checkpoint, open
from weightsmith.checkpoint.source import TensorSource
from weightsmith.checkpoint.view import CheckpointView
from weightsmith.checkpoint.writer import CheckpointWriter, check_destination, provenance_step, save, set_config_dtype
from weightsmith.digests import file_sha256

__all__ = [
    "Checkpoint",
    "CheckpointView",
    "CheckpointWriter",
    "DEFAULT_SHARD_SIZE",
    "TensorInfo",
    "TensorSource",
    "check_destination",
    "file_sha256",
    "open",
    "provenance_step",
    "save",
    "set_config_dtype",
]
