"""The ledger, pure: records and their chain, decision ids, the audit, lineage.

``_records`` (a gateway's hash chain of decision records and signed checkpoints),
``_audit`` (checks a whole ledger as an auditor would), ``_witness`` (countersigned chain
heads kept apart from the gateways), ``_lineage`` (an intent's place
among the decisions that caused it; the tree printer). Reading and writing the ledger
stream is :mod:`bus_guard.intake`'s (the gateway) and :mod:`bus_guard.cli`'s (the audit).
"""

from bus_guard.ledger._audit import Auditor, AuditReport, ChainSummary, Problem, audit
from bus_guard.ledger._lineage import lineage_of, render_tree
from bus_guard.ledger._records import (
    CHECKPOINT_TYP,
    ChainBatch,
    ChainHead,
    CheckpointSigner,
    LedgerRecord,
    LedgerSubjects,
    Stored,
    check_signature,
    decode_record,
    encode_record,
    record_hash,
)
from bus_guard.ledger._witness import Witness, Witnessed, check_against_witness, load_witnessed

__all__ = (
    "CHECKPOINT_TYP",
    "AuditReport",
    "Auditor",
    "ChainBatch",
    "ChainHead",
    "ChainSummary",
    "CheckpointSigner",
    "LedgerRecord",
    "LedgerSubjects",
    "Problem",
    "Stored",
    "Witness",
    "Witnessed",
    "audit",
    "check_against_witness",
    "check_signature",
    "decode_record",
    "encode_record",
    "lineage_of",
    "load_witnessed",
    "record_hash",
    "render_tree",
)
