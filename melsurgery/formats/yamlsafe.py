"""YAML read with limits, for manifests and model-card metadata (both a few lines long).

`yaml.safe_load` alone accepts a billion-laughs file (aliases that expand to ~10^9 values: whatever walks
the data afterwards hangs), nesting deep enough to overflow the parser's stack, and a key given twice (the
last one silently wins; the Hub's parser refuses such a card). Each is refused here, with one message.
"""

from __future__ import annotations

import yaml

from melsurgery.errors import quote

MAX_NODES = 100_000  # values after alias expansion (a billion-laughs file expands to ~10^9)
_MERGE = "tag:yaml.org,2002:merge"


class YAMLRefused(ValueError):
    """YAML that does not parse or breaks a limit; the message completes "the YAML ..."."""


class _UniqueKeys(yaml.SafeLoader):
    """SafeLoader that refuses a mapping giving the same key twice (keys brought in by `<<` merges may be
    overridden, as YAML allows)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise YAMLRefused(f"gives the key {quote(key)} twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(text: str) -> object:
    """The data of a YAML text; YAMLRefused when it does not parse, repeats a key, nests too deeply, holds a
    recursive alias or expands to more than MAX_NODES values."""
    try:
        data = yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
        if _expanded_size(data, {}, set()) > MAX_NODES:
            raise YAMLRefused(f"expands to more than {MAX_NODES:,} values (YAML aliases)")
    except yaml.YAMLError as exc:
        raise YAMLRefused(f"does not parse ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise YAMLRefused("is nested too deeply") from None
    return data


def _expanded_size(obj: object, memo: dict[int, int], active: set[int]) -> int:
    """How many values `obj` holds once aliases are expanded; shared sub-structures are counted once each
    time they are referenced but measured once (memo), so this is linear in the file, not in the expansion."""
    if not isinstance(obj, dict | list):
        return 1
    key = id(obj)
    if key in memo:
        return memo[key]
    if key in active:
        raise YAMLRefused("holds a recursive YAML alias")
    active.add(key)
    children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
    total = 1
    for child in children:
        total += _expanded_size(child, memo, active)
        if total > MAX_NODES:
            break
    active.discard(key)
    memo[key] = total
    return total
