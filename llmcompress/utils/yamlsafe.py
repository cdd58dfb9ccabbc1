"""YAML for files a user hands us: duplicate keys, deep nesting, alias bombs and binary files are refused with the
place and the fix, before anything is built from them.

PyYAML's ``safe_load`` accepts ``bits: 2`` then ``bits: 8`` (the last wins, silently), recurses once per nesting level
(a file nested thousands deep raises RecursionError) and shares aliased nodes, so a "billion laughs" document loads
fast but expands to billions of values in the first ``json.dumps`` or ``deepcopy`` that walks it (a sweep's ``list:``
hung that way). Here the events are scanned for depth first (no recursion), then the node graph is composed and its
expanded size counted with one visit per distinct node, and only then is the document built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: Nesting deeper than this is refused (recipes nest 4-6 levels; PyYAML's composer recurses per level).
MAX_DEPTH = 64
#: Values (mappings, lists, scalars) a document may expand to, aliases followed. A large sweep has a few thousand.
MAX_NODES = 200_000
#: Characters of scalar text it may expand to, aliases followed.
MAX_CHARS = 20_000_000
#: Largest recipe or sweep file read (a recipe is a few hundred bytes; data goes in files it names).
MAX_FILE_BYTES = 4 * 2**20

MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """The text is not acceptable YAML; ``line`` (1-based) when one place is to blame."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)  # cached: the base class reuses it
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class's own error says so
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                lines = f"lines {first} and {line}" if first != line else f"both on line {line}"
                raise YAMLInputError(f"key `{key}` is given twice ({lines}); the second would silently replace "
                                     "the first. Fix: keep one of them.", line)
            seen[key] = line
        for key_node, value_node in node.value:  # name the key of a value refused below (in lists too)
            bad = _refused_in(value_node)
            if bad is not None:
                raise YAMLInputError(f"`{self.construct_object(key_node, deep=True)}`: {_refusal(bad)}",
                                     bad.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if _huge_int(node):
            raise YAMLInputError(_refusal(node), node.start_mark.line + 1)
        return super().construct_yaml_int(node)

    def construct_yaml_str_timestamp(self, node: yaml.ScalarNode) -> str:
        return self.construct_scalar(node)  # `2001-12-14` stays text: recipes hold JSON-like values only

    def refuse_tag(self, node: yaml.Node) -> None:
        raise YAMLInputError(_refusal(node), node.start_mark.line + 1)


#: YAML types a recipe never holds (it is JSON-like: text, numbers, booleans, null, lists, mappings).
REFUSED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("binary", "set", "omap", "pairs")}
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_str_timestamp)
for _tag in REFUSED_TAGS:
    StrictLoader.add_constructor(_tag, StrictLoader.refuse_tag)


def _refused_in(node: yaml.Node) -> yaml.Node | None:
    """``node``, or a value in the lists it holds, that a recipe may not contain (mappings check their own)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.tag in REFUSED_TAGS or _huge_int(n):
            return n
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return None


def _huge_int(node: yaml.Node) -> bool:
    """An integer literal longer than any setting needs (Python refuses to convert over 4,300 digits)."""
    return node.tag == "tag:yaml.org,2002:int" and isinstance(node, yaml.ScalarNode) and len(node.value) > 100


def _refusal(node: yaml.Node) -> str:
    if _huge_int(node):
        return (f"a {len(node.value):,}-character integer (`{node.value[:12]}...`) is no setting. Fix: write a number "
                "of sensible size.")
    return (f"`{node.tag.rsplit(':', 1)[-1]}` values (`{node.tag}`) are not allowed in a recipe, only text, numbers, "
            "booleans, null, lists and mappings. Fix: write the value as plain YAML.")


def loads(text: str) -> Any:
    """Parse one YAML document strictly. Raises YAMLInputError with the line when it is refused."""
    _check_depth(text)
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _invalid(e, text) from None
    finally:
        loader.dispose()


def _invalid(e: yaml.YAMLError, text: str) -> YAMLInputError:
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):  # a control character: PyYAML gives a position, not a line
        line = text[: e.position].count("\n") + 1
        ch = chr(e.character) if isinstance(e.character, int) else e.character
        return YAMLInputError(f"not valid YAML (the character {ch!r} is not allowed in YAML text). Fix: remove it.",
                              line)
    at = f"column {mark.column + 1}: " if mark else ""
    return YAMLInputError(f"not valid YAML ({at}{getattr(e, 'problem', None) or e}).", mark.line + 1 if mark else None)


def _check_depth(text: str) -> None:
    depth = 0
    try:
        for event in yaml.parse(text, Loader=StrictLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YAMLInputError(f"nested more than {MAX_DEPTH} levels deep. Fix: a recipe nests a few "
                                         "levels; check the brackets and indentation here.",
                                         event.start_mark.line + 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as e:
        raise _invalid(e, text) from None


def _check_expansion(root: yaml.Node) -> None:
    """Count the values and characters ``root`` expands to, each distinct node visited once (no recursion)."""
    sizes: dict[int, tuple[int, int]] = {}  # finished nodes
    open_: set[int] = set()  # nodes whose children are being counted (the path from the root)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        kids = _children(node)
        if not children_done:
            if id(node) in sizes:
                continue
            if id(node) in open_:
                raise YAMLInputError("a value contains itself through an alias (a recursive `*anchor`). Fix: write "
                                     "the value out.", node.start_mark.line + 1)
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
            continue
        nodes = 1 + sum(sizes[id(k)][0] for k in kids)
        chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(sizes[id(k)][1] for k in kids)
        open_.discard(id(node))
        sizes[id(node)] = (nodes, chars)
        if nodes > MAX_NODES or chars > MAX_CHARS:
            raise YAMLInputError(
                f"anchors and aliases (`&x` / `*x`) here expand to {nodes:,} values ({chars:,} characters): an "
                f"alias bomb, or far more than a recipe needs (limit {MAX_NODES:,} values). Fix: write the values "
                "out, without nested aliases.", node.start_mark.line + 1)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_text(path: Path, what: str = "recipe") -> str:
    """A small UTF-8 text file's content; YAMLInputError when it is a folder, a device, huge or binary."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise YAMLInputError(f"is {kind}. Fix: pass a {what} YAML file.")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise YAMLInputError(f"is larger than {MAX_FILE_BYTES // 2**20} MiB; a {what} is a small YAML file. Fix: "
                             "check that this is the file you meant.")
    if b"\0" in data:
        raise YAMLInputError(f"is a binary file (it holds NUL bytes), not a {what} YAML file. Fix: pass the YAML "
                             "file.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise YAMLInputError(f"is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}). Fix: save the file as "
                             "UTF-8.", line) from None
