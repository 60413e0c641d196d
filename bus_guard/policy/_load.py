"""Loading policy bundles: YAML files → validated models → a compiled :class:`PolicySet`.

Loading reports every problem of every file at once, in a :class:`~bus_guard.errors.PolicyError`
whose ``problems`` read ``"<file>: rule <id>: <field path>: <message> (line N)"``, or
``"<file>: <field path>: <message> (line N)"`` for bundle-level problems.

Bundles may name other files: the approvers' JWKS files (``approvers.members``), by paths
relative to the policy file that stay inside the policy directory. :func:`load_policies`
reads them from the directory; :func:`load_policy_sources` takes them as ``files``. They
are part of the policy set: its digest covers their bytes, like the bundles'.

YAML is read with YAML 1.2 booleans: only ``true``/``false`` are booleans, so country codes
like ``NO`` and words like ``yes``/``on`` stay strings. Duplicate keys are errors.

Hostile YAML is refused before anything walks it: a file larger than
:data:`MAX_FILE_BYTES`, and a document whose aliases would expand it past
:data:`MAX_NODES` nodes or into itself (a "billion laughs" document of a few hundred
bytes stands for 10⁹ nodes; PyYAML composes it as a small graph, but every later step
walks it as a tree).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import ErrorDetails, core_schema

from bus_guard.errors import ConfigError, PolicyError
from bus_guard.policy._approvers import KeyFiles
from bus_guard.policy._conditions import ConditionTrace
from bus_guard.policy._evaluator import (
    BundleInfo,
    CompiledRule,
    Explanation,
    PolicySet,
    RuleTrace,
    compile_policy_set,
)
from bus_guard.policy._model import (
    AllOf,
    AnyOf,
    Approval,
    Approvers,
    Bundle,
    ConditionTag,
    Leaf,
    Limit,
    LineageRule,
    NotOf,
    Rule,
    describe,
)
from bus_guard.verify import Jwks, load_jwks

__all__ = (
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "REVISION_MARK",
    "Bundle",
    "BundleInfo",
    "CompiledRule",
    "ConditionTrace",
    "Explanation",
    "PolicySet",
    "Rule",
    "RuleTrace",
    "load_policies",
    "load_policy_sources",
    "load_yaml",
    "policy_json_schema",
)

MAX_FILE_BYTES: Final = 1 << 20
"""The largest policy file, 1 MiB: over 10,000 rules written one a line, and NATS's
default largest message (so also the most a KV bucket entry holds)."""

MAX_NODES: Final = 1 << 20
"""The most YAML nodes (scalars, lists, mappings) a document may stand for once its
aliases are expanded. Without aliases a file within :data:`MAX_FILE_BYTES` holds fewer
(a node takes a byte or more), so aliases cannot make a document more work than the
largest file allowed."""

REVISION_MARK: Final = ";rev="
"""What separates a bundle set's version from its distribution revision in ``version``
(``payments@1.2.0,tools@1.0.0;rev=7``): neither names nor versions contain ``;``."""

Loc = tuple[str | int, ...]
_Found = tuple[str, int, str]  # (file, line, problem text), to sort into source order
_BOOL_TAG: Final = "tag:yaml.org,2002:bool"


try:  # libyaml parses an order of magnitude faster; resolving stays in Python either way
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Loader(_SafeLoader):
    """A safe loader with YAML 1.2 booleans: ``NO``, ``yes``, ``on`` are strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_KNOWN_KEYS: Final = sorted(
    {
        info.alias or name
        for model in (
            Bundle,
            Rule,
            Leaf,
            AllOf,
            AnyOf,
            NotOf,
            Approvers,
            Approval,
            LineageRule,
            Limit,
        )
        for name, info in model.model_fields.items()
    }
)


class _Refused(yaml.YAMLError):
    """A document refused for its size or its aliases; ``line`` 0 when it is the whole."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that, aliases expanded, exceeds :data:`MAX_NODES` nodes or
    contains itself.

    Aliases make the node graph a DAG, or a cycle for an alias inside its own anchor.
    What counts is the size of the tree it stands for, computed here once per distinct
    list or mapping from the sizes of its children (a scalar is one node), without
    expanding anything: a billion-laughs document is refused in microseconds.
    """
    sizes: dict[int, int] = {}  # id(list or mapping node) -> nodes once expanded
    measuring: set[int] = set()  # the lists and mappings on the path being walked
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            measuring.discard(key)
            size = 1 + sum(sizes.get(id(child), 1) for child in _children(node))
            if size > MAX_NODES:
                raise _Refused(
                    f"aliases expand this document to more than {MAX_NODES:,} YAML nodes,"
                    " the most a policy file may hold; write the values out or use fewer aliases"
                )
            sizes[key] = size
        elif key not in sizes:
            if key in measuring:  # reached again from inside itself
                line = node.start_mark.line + 1
                raise _Refused(f"line {line}: an alias refers to the node that contains it", line)
            measuring.add(key)
            stack.append((node, True))
            stack.extend(
                (child, False)
                for child in _children(node)
                if not isinstance(child, yaml.ScalarNode)
            )


def _compose(text: str) -> yaml.Node | None:
    """The document's node graph, within the limits; ``None`` for an empty document.
    Raises ``yaml.YAMLError`` (:class:`_Refused` for a limit)."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _Refused(_too_large())
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None:
        _check_expansion(node)  # 0.1-0.2 s on a 1 MiB file, which takes ~3 s to load
    return node


def _construct(node: yaml.Node) -> Any:
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _too_large() -> str:
    return f"larger than {MAX_FILE_BYTES:,} bytes (1 MiB), the most a policy file may be"


def load_yaml(text: str) -> Any:
    """Parse YAML the way policy files are read (YAML 1.2 booleans, the same limits);
    raises ``yaml.YAMLError``."""
    node = _compose(text)
    return None if node is None else _construct(node)


def load_policies(path: str | os.PathLike[str]) -> PolicySet:
    """Load one file, or every ``*.yaml``/``*.yml`` directly in a directory (sorted)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(f for f in root.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        if not files:
            raise PolicyError([f"{root}: no policy files (*.yaml, *.yml) in this directory"])
    elif root.is_file():
        files = [root]
    else:
        raise PolicyError([f"{root}: no such file or directory"])
    sources: dict[str, bytes] = {}
    for file in files:
        try:
            sources[file.name] = _read(file)
        except OSError as exc:
            raise PolicyError([f"{file}: cannot read: {exc.strerror or exc}"]) from exc
    folder = files[0].parent
    return load_policy_sources(
        sources, base=folder, files=lambda name: _read(folder.joinpath(*name.split("/")))
    )


def _read(file: Path) -> bytes:
    with file.open("rb") as f:  # no more than the limit and a byte to tell
        return f.read(MAX_FILE_BYTES + 1)


def load_policy_sources(
    sources: Mapping[str, bytes],
    *,
    base: str | os.PathLike[str] | None = None,
    files: Mapping[str, bytes] | Callable[[str], bytes] | None = None,
    revision: int | None = None,
    layer: str = "",
) -> PolicySet:
    """Compile in-memory files (relative name → bytes), e.g. from a KV bucket.

    ``base`` only prefixes names in messages; the digest covers the relative names.
    ``files``: the other files bundles name (approver JWKS), by their path relative to
    the policy directory (``approvers/alice.jwks.json``): a mapping, or a function that
    reads one (raising ``OSError``). The digest covers them too.
    ``revision``: the distribution revision of a signed bundle (README, "Policy
    distribution"): the set's ``version``, which every decision names, then ends with
    ``;rev=<revision>``; ``layer`` (``constitution/``) is put before it, so that every
    decision names the layer that made it.
    """
    problems: list[_Found] = []
    bundles: list[tuple[str, Bundle]] = []
    docs: dict[str, tuple[Any, yaml.Node]] = {}
    rule_indexes: dict[str, dict[int, int]] = {}  # file -> compiled index -> index in file
    for name in sorted(sources):
        file = os.path.join(base, name) if base is not None else name
        parsed = _parse(file, sources[name], problems)
        if parsed is None:
            continue
        docs[file] = parsed
        raw = parsed[0]
        if not isinstance(raw, dict):
            message = f"expected a mapping with bundle, version and rules, got {describe(raw)}"
            problems.append((file, 0, f"{file}: {message}"))
            continue
        bundle = _validate(file, raw, parsed[1], problems, rule_indexes)
        if bundle is not None:
            bundles.append((file, bundle))
    if not sources:
        problems.append((str(base or "."), 0, f"{base or '.'}: no policy files"))
    names = {os.path.join(base, n) if base is not None else n: n for n in sources}
    key_files, read = _key_files(bundles, names, files)
    # The set's version names its layer and revision: every decision built from it (some
    # are built while compiling) names them.
    rev = "" if revision is None else f"{REVISION_MARK}{revision}"
    policy_set, compile_problems = compile_policy_set(
        bundles, _digest({**read, **sources}), key_files, version_affixes=(layer, rev)
    )
    for p in compile_problems:
        if p.rule_index is None:
            loc = p.loc
        else:
            index = rule_indexes.get(p.file, {}).get(p.rule_index, p.rule_index)
            loc = ("rules", index, *p.loc)
        problems.append(_format(p.file, *docs[p.file], loc, p.message))
    if problems or policy_set is None:
        # In source order: by file, then line (stable, so one line's problems keep theirs).
        ordered = sorted(dict.fromkeys(problems), key=lambda found: found[:2])
        raise PolicyError([text for _, _, text in ordered], file=ordered[0][0] if ordered else "")
    return policy_set


def _validate(
    file: str,
    raw: dict[str, Any],
    node: yaml.Node,
    problems: list[_Found],
    rule_indexes: dict[str, dict[int, int]],
) -> Bundle | None:
    """Validate one bundle; when only some rules are invalid, return the bundle without
    them so the compiler still reports every other problem in the same run."""
    try:
        return Bundle.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    bad: set[int] = set()
    for error in errors:
        loc, message = _explain_error(error)
        # Point the line at the offending key itself, the path at what holds it.
        line_loc = _clean(error["loc"]) if error["type"] == "extra_forbidden" else loc
        problems.append(_format(file, raw, node, loc, message, line_loc))
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            bad.add(loc[1])
        else:
            bad.add(-1)
    if -1 in bad or not isinstance(raw.get("rules"), list):
        return None
    kept = [i for i in range(len(raw["rules"])) if i not in bad]
    try:
        bundle = Bundle.model_validate({**raw, "rules": [raw["rules"][i] for i in kept]})
    except ValidationError:  # cannot happen: what was wrong has been left out
        return None
    rule_indexes[file] = dict(enumerate(kept))
    return bundle


def _key_files(
    bundles: list[tuple[str, Bundle]],
    names: Mapping[str, str],
    files: Mapping[str, bytes] | Callable[[str], bytes] | None,
) -> tuple[KeyFiles, dict[str, bytes]]:
    """Read and load every JWKS file the bundles name: ``(key files for the compiler,
    the bytes read by path, for the digest)``. A file is read once, however many
    bundles name it; what fails to load is reported by the compiler, against the bundle."""
    out: dict[tuple[str, str], tuple[str, Jwks | str]] = {}
    read: dict[str, bytes] = {}
    loaded: dict[str, Jwks | str] = {}
    for file, bundle in bundles:
        folder = posixpath.dirname(names[file])
        for paths in bundle.approvers.members.values():
            for path in paths:
                where = posixpath.join(folder, path) if folder else path
                if where not in loaded:
                    loaded[where] = _load_key_file(where, files, read)
                out[(file, path)] = (where, loaded[where])
    return out, read


def _load_key_file(
    path: str,
    files: Mapping[str, bytes] | Callable[[str], bytes] | None,
    read: dict[str, bytes],
) -> Jwks | str:
    """The JWKS at *path* (recording its bytes in *read*), or why it cannot be used."""
    try:
        if files is None:
            return "not found: no files were given with the policy sources"
        if callable(files):
            data = files(path)
        elif path in files:
            data = files[path]
        else:
            return "not found among the policy files"
    except FileNotFoundError:
        return "JWKS file not found"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if len(data) > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES:,} bytes"
    read[path] = data
    try:
        return load_jwks(data)
    except ConfigError as exc:
        return str(exc).removeprefix("JWKS: ")


def _digest(sources: Mapping[str, bytes]) -> str:
    """SHA-256 over length-prefixed (name, bytes) pairs in name order: unambiguous."""
    h = hashlib.sha256()
    for name in sorted(sources):
        encoded = name.encode("utf-8")
        data = sources[name]
        h.update(len(encoded).to_bytes(8, "big") + encoded + len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def _parse(file: str, data: bytes, problems: list[_Found]) -> tuple[Any, yaml.Node] | None:
    if len(data) > MAX_FILE_BYTES:
        problems.append((file, 0, f"{file}: {_too_large()}"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append((file, 0, f"{file}: not UTF-8 text"))
        return None
    try:
        node = _compose(text)
        if node is None:
            message = "the file is empty; a bundle needs bundle, version, rules"
            problems.append((file, 0, f"{file}: {message}"))
            return None
        if _duplicate_keys(file, node, problems):
            return None
        return _construct(node), node
    except _Refused as exc:
        problems.append((file, exc.line, f"{file}: {exc}"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        where = f"line {line}: " if line else ""
        problems.append((file, line, f"{file}: {where}invalid YAML: {exc.problem or exc.context}"))
    except yaml.YAMLError as exc:
        problems.append((file, 0, f"{file}: invalid YAML: {exc}"))
    return None


def _duplicate_keys(file: str, node: yaml.Node, problems: list[_Found]) -> bool:
    """Report keys given twice in one mapping (PyYAML would keep the last silently).
    A mapping reached through several aliases is looked at once."""
    found = False
    stack = [node]
    walked: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in walked:
            continue
        walked.add(id(current))
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        line = key.start_mark.line + 1
                        text = f"{file}: line {line}: duplicate key {key.value!r}"
                        problems.append((file, line, text))
                        found = True
                    seen.add(key.value)
                if not isinstance(value, yaml.ScalarNode):  # scalars hold no keys
                    stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(v for v in current.value if not isinstance(v, yaml.ScalarNode))
    return found


def _line(node: yaml.Node, loc: Loc) -> int:
    """The line of the deepest node along ``loc`` (1-based)."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            child = node.value[key] if key < len(node.value) else None
        else:
            child = None
        if child is None:
            break
        node = child
    return int(node.start_mark.line) + 1


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _format(
    file: str, raw: Any, node: yaml.Node, loc: Loc, message: str, line_loc: Loc | None = None
) -> _Found:
    line = _line(node, loc if line_loc is None else line_loc)
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        index = loc[1]
        rules = raw.get("rules") if isinstance(raw, dict) else None
        rule = rules[index] if isinstance(rules, list) and index < len(rules) else None
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        name = rule_id if isinstance(rule_id, str) and rule_id else f"#{index + 1}"
        rest = _path(loc[2:])
        text = f"{file}: rule {name}: {rest + ': ' if rest else ''}{message} (line {line})"
        return file, line, text
    return file, line, f"{file}: {_path(loc) or 'top level'}: {message} (line {line})"


def _clean(loc: Loc) -> Loc:
    """Drop what pydantic adds to locations: union tags and dict-key markers."""
    return tuple(p for p in loc if p not in ConditionTag and p != "[key]")


def _explain_error(error: ErrorDetails) -> tuple[Loc, str]:
    """A pydantic error as (location in the YAML, message a policy author understands)."""
    loc = _clean(error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return loc[:-1], f"missing required key {loc[-1]!r}"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        guess = " or ".join(repr(g) for g in difflib.get_close_matches(key, _KNOWN_KEYS, 2))
        return loc[:-1], f"unknown key {key!r}" + (f" (did you mean {guess}?)" if guess else "")
    expected = {
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "bool_type": "true or false",
    }
    if kind in expected:
        hint = " (quote it)" if kind == "string_type" and isinstance(value, int | float) else ""
        return loc, f"expected {expected[kind]}, got {describe(value)}{hint}"
    if kind == "literal_error":
        return loc, f"expected {error.get('ctx', {}).get('expected')}, got {describe(value)}"
    if kind == "too_short":
        return loc, "must not be empty"
    if kind == "condition":
        return loc, f"{error['msg']}, got {describe(value)}"
    return loc, error["msg"].removeprefix("Value error, ")


class _SchemaGenerator(GenerateJsonSchema):
    """Optional fields are written as absent, never as ``null``, so drop null branches."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        result = super().default_schema(schema)
        if result.get("default", ...) is None:
            del result["default"]
        return result


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one policy file, with descriptions for editors."""
    return Bundle.model_json_schema(schema_generator=_SchemaGenerator)
