"""Deterministic document-level splits.

A document's part depends only on its id (a salted SHA-256), never on the other
documents or on the order they were read in, so a corpus that grows keeps every
existing document in the part it was in.
"""

import hashlib

TRAIN, CALIBRATION, EVALUATION = "train", "calibration", "evaluation"

# Fractions of documents per part. Builtin corpora also feed the reference
# model's training, so they keep a train part; user data is only calibrated on
# and evaluated on.
BUILTIN_FRACTIONS = {TRAIN: 0.8, CALIBRATION: 0.1, EVALUATION: 0.1}
USER_FRACTIONS = {CALIBRATION: 0.5, EVALUATION: 0.5}

_SALT = b"copal-split-v1\0"


def doc_hash(doc_id: str) -> float:
    """A number in [0, 1) derived from the document id alone."""
    digest = hashlib.sha256(_SALT + doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, fractions: dict[str, float]) -> str:
    """The part ('train', 'calibration' or 'evaluation') a document belongs to."""
    u = doc_hash(doc_id)
    edge = 0.0
    for part, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return part
    return list(fractions)[-1]
