"""Policies: the YAML model, loading, compilation and the evaluator, and policy tests.

    >>> policies = load_policies("policies")     # PolicySet: compiled, immutable
    >>> policies.evaluate(request)         # a Decision

Modules, read top to bottom as a bundle flows: ``_types`` and ``_model`` (what a bundle
may say, validated by pydantic), ``_load`` (files → validated bundles, with file, rule
and line in every error), ``_patterns``, ``_conditions`` and ``_rules`` (compiling each
part), ``_evaluator`` (the compiled :class:`PolicySet` and how it decides), ``_testing``
(``bus-guard policy test | explain | check``).
"""

from bus_guard.policy._evaluator import (
    BundleInfo,
    Explanation,
    PolicySet,
    RuleTrace,
    compile_policy_set,
)
from bus_guard.policy._load import (
    load_policies,
    load_policy_sources,
    load_yaml,
    policy_json_schema,
)
from bus_guard.policy._model import Bundle, Rule
from bus_guard.policy._testing import check_policies, explain, run_policy_tests

__all__ = (
    "Bundle",
    "BundleInfo",
    "Explanation",
    "PolicySet",
    "Rule",
    "RuleTrace",
    "check_policies",
    "compile_policy_set",
    "explain",
    "load_policies",
    "load_policy_sources",
    "load_yaml",
    "policy_json_schema",
    "run_policy_tests",
)
