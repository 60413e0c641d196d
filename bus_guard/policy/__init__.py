"""Policies: the YAML model, loading, compilation and the evaluator.

    >>> policies = load_policies("policies")     # PolicySet: compiled, immutable
    >>> policies.evaluate(request)               # a Decision

Modules, read top to bottom as a bundle flows: ``_types`` and ``_model`` (what a bundle
may say, validated by pydantic), ``_load`` (files → validated bundles, with file, rule
and line in every error), ``_patterns``, ``_regex`` (RE2), ``_conditions``, ``_lineage``
(lineage constraints), ``_approvers`` (hold terms and approver keys) and ``_rules``
(compiling each part), ``_evaluator`` (the compiled :class:`PolicySet` and how it
decides), ``_limits`` (what an intent counts against and costs under a limit:
:func:`limit_key`, :func:`limit_amount`, for the intake that spends limits). The policy
tests and ``explain`` (``bus-guard policy test | explain | check``) are in
:mod:`bus_guard.cli`.
"""

from bus_guard.policy._evaluator import (
    BundleInfo,
    Explanation,
    PolicySet,
    RuleTrace,
    compile_policy_set,
)
from bus_guard.policy._limits import limit_amount, limit_key
from bus_guard.policy._load import (
    load_policies,
    load_policy_sources,
    load_yaml,
    policy_json_schema,
)
from bus_guard.policy._model import Bundle, Rule

__all__ = (
    "Bundle",
    "BundleInfo",
    "Explanation",
    "PolicySet",
    "Rule",
    "RuleTrace",
    "compile_policy_set",
    "limit_amount",
    "limit_key",
    "load_policies",
    "load_policy_sources",
    "load_yaml",
    "policy_json_schema",
)
