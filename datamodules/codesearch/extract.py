"""(docstring summary, code without docstring) pairs from Python source: the CodeSearchNet recipe.

Every function or method (``def`` / ``async def``, nested ones included) that has a docstring gives one
:class:`RawPair`:

- **query** = the docstring's summary: its first paragraph, cut before any section header
  (``Args:``, ``Parameters``, ``:param x:``, ``>>>`` ...), whitespace-normalised to single spaces.
- **document** = the function's source from its ``def`` line (decorators excluded, as in CodeSearchNet)
  to its last line, dedented, with the docstring statement removed.

Nothing here imports torch: the extractor runs in worker processes while the corpus is built.

Duplicate keys (:func:`code_key`, :func:`query_key`) are deliberately conservative, because a duplicate
is treated downstream as a *known false negative* (its document answers the other's query too):

- code: comments removed, whitespace collapsed (and dropped around punctuation), the function's own
  name replaced by a placeholder. This catches exact copies and copies that differ only in layout,
  comments or the function name (type-1 clones plus renames); it does *not* abstract other
  identifiers or literals, since e.g. two one-line getters of different attributes are not answers to
  each other's query. Comment stripping is regex-based (string-aware for ordinary and triple-quoted
  literals) — approximate, but applied identically to every function so exact copies always match.
- query: the summary lower-cased, whitespace-collapsed, trailing punctuation stripped.
"""
from __future__ import annotations

import ast
import hashlib
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass

__all__ = [
    "RawPair", "FileResult", "summarize_docstring", "strip_docstring", "extract_pairs_from_text",
    "extract_file", "decode_source", "code_key", "query_key", "count_code_lines",
]


@dataclass
class RawPair:
    """One extracted pair before ids, splits and duplicate groups are assigned.

    ``line`` is the 1-based line of the ``def`` in its file; ``name`` the qualified function name
    (``Class.method``, ``outer.<locals>.inner``); ``code_hash`` is :func:`code_key` of ``document``
    (computed here so that it runs in the extraction worker processes).
    """

    query: str
    document: str
    line: int
    name: str
    code_hash: str = ""


@dataclass
class FileResult:
    """What one source file gave: its pairs, an error ``(reason, line, message)`` if it could not be
    read/decoded/parsed, and counts of functions skipped by the filters (``reason -> n``)."""

    pairs: list[RawPair]
    error: tuple[str, int, str] | None
    skipped: dict[str, int]


# ----------------------------------------------------------------------------------------- summaries

_SECTION = re.compile(
    r"^(args|arguments|parameters|params|returns?|yields?|raises|examples?|notes?|see also|attributes|"
    r"keyword arguments|kwargs|other parameters|warnings?|todo|references|methods|usage)\s*:?\s*$",
    re.IGNORECASE,
)
_FIELD = re.compile(r"^(:\w|@\w|>>>|\.\. |-{3,}|={3,})")


def summarize_docstring(docstring: str) -> str:
    """The first paragraph of a (cleaned) docstring, whitespace-normalised.

    The paragraph ends at the first blank line, section header (``Args:``, ``Returns``, numpy-style
    underlines), reST/epytext field (``:param x:``, ``@return``), doctest (``>>>``) or directive.
    Returns ``""`` for an empty docstring.
    """
    out: list[str] = []
    for line in docstring.strip().splitlines():
        s = line.strip()
        if not s:
            if out:
                break
            continue
        if out and (_SECTION.match(s) or _FIELD.match(s)):
            break
        if not out and _FIELD.match(s):  # docstring that starts with a field list: no summary
            break
        out.append(s)
    return " ".join(" ".join(out).split())


def query_key(summary: str) -> str:
    """Normalised summary used to find identical docstrings (case, spacing, final punctuation)."""
    return " ".join(summary.lower().split()).rstrip(" .:;!")


# ---------------------------------------------------------------------------------------- code keys

_STR_OR_COMMENT = re.compile(
    r"""(\"\"\"[\s\S]*?\"\"\"|'\'\'[\s\S]*?'\'\'|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|\#[^\n]*"""
)
_DEF_NAME = re.compile(r"^(\s*(?:async\s+)?def\s+)[A-Za-z_]\w*")
_SPACE_AT_PUNCT = re.compile(r" (?=[^\w ])|(?<=[^\w ]) ")


def _keep_string(m: re.Match) -> str:
    return m.group(1) or ""


def code_key(code: str) -> str:
    """sha1 of the normalised code (comments and layout removed, own name replaced); see module doc."""
    s = _STR_OR_COMMENT.sub(_keep_string, code)
    s = _DEF_NAME.sub(r"\1_", s, count=1)
    s = _SPACE_AT_PUNCT.sub("", " ".join(s.split()))
    return hashlib.sha1(s.encode("utf-8", "surrogatepass")).hexdigest()


def count_code_lines(code: str) -> int:
    """Number of non-blank lines."""
    return sum(1 for line in code.split("\n") if line.strip())


# ------------------------------------------------------------------------------- docstring removal

def _docstring_node(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _is_trivial_body(stmts: list[ast.stmt]) -> bool:
    """No statement, or only ``pass`` / ``...`` / ``raise NotImplementedError``."""
    for s in stmts:
        if isinstance(s, ast.Pass):
            continue
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value is Ellipsis:
            continue
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def _cut(line: str, col: int) -> tuple[str, str]:
    """Split ``line`` at a UTF-8 byte offset ``col`` (ast column offsets are byte offsets)."""
    b = line.encode("utf-8", "surrogatepass")
    return b[:col].decode("utf-8", "surrogatepass"), b[col:].decode("utf-8", "surrogatepass")


def strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """Source text of ``node`` (``def`` line to last line) with its docstring statement removed.

    Args:
        lines: the whole file split on ``"\\n"`` (no line endings), so ``lines[node.lineno - 1]`` is the
            ``def`` line.
        node: a function node from ``ast.parse`` of ``"\\n".join(lines)``.

    Returns:
        The dedented code. A docstring on its own lines is dropped together with one blank line that
        follows it; one sharing a line with code (``def f(): "doc"; return 1``) is cut out of the line.
    """
    start, end = node.lineno, node.end_lineno or node.lineno
    seg = list(lines[start - 1:end])
    ds = _docstring_node(node)
    if ds is not None and ds.end_lineno is not None and ds.end_col_offset is not None:
        i0, i1 = ds.lineno - start, ds.end_lineno - start
        prefix, _ = _cut(seg[i0], ds.col_offset)
        _, suffix = _cut(seg[i1], ds.end_col_offset)
        suffix = suffix.lstrip()
        if suffix.startswith(";"):
            suffix = suffix[1:].lstrip()
        if not prefix.strip() and not suffix:
            repl: list[str] = []
            if i1 + 1 < len(seg) and not seg[i1 + 1].strip():
                i1 += 1  # the blank line that usually separates the docstring from the body
        elif not prefix.strip():
            repl = [prefix + suffix]
        else:
            repl = [prefix.rstrip() + " " + suffix if suffix else prefix.rstrip()]
        seg[i0:i1 + 1] = repl
    code = textwrap.dedent("\n".join(seg))
    return "\n".join(line.rstrip() for line in code.split("\n")).strip("\n")


# ------------------------------------------------------------------------------------- extraction

def decode_source(data: bytes) -> str:
    """Decode Python source bytes honouring a PEP 263 coding cookie / BOM (default UTF-8), with newlines
    normalised to ``\\n``. Raises ``SyntaxError`` (bad cookie), ``LookupError`` (unknown codec) or
    ``UnicodeDecodeError``."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    text = data.decode(encoding)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _qualified_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """``(qualname, node)`` for every function in ``tree`` in source order.

    Only statement lists are walked (bodies, ``else``/``finally`` blocks, ``except`` handlers, ``match``
    cases): a ``def`` can only appear there, and skipping expressions makes this ~10x cheaper than
    ``ast.walk``.
    """
    out: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(stmts: list[ast.stmt], prefix: str) -> None:
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = prefix + s.name
                out.append((q, s))
                visit(s.body, q + ".<locals>.")
            elif isinstance(s, ast.ClassDef):
                visit(s.body, prefix + s.name + ".")
            else:
                for attr in ("body", "orelse", "finalbody"):
                    block = getattr(s, attr, None)
                    if isinstance(block, list):
                        visit(block, prefix)
                for h in getattr(s, "handlers", ()) or ():
                    visit(h.body, prefix)
                for c in getattr(s, "cases", ()) or ():
                    visit(c.body, prefix)

    visit(tree.body, "")
    out.sort(key=lambda t: (t[1].lineno, t[1].col_offset))
    return out


def extract_pairs_from_text(text: str, min_query_words: int = 3, min_code_lines: int = 3,
                            skipped: dict[str, int] | None = None, filename: str = "<string>") -> list[RawPair]:
    """All pairs of one decoded source text (``\\n`` newlines). Raises ``SyntaxError``/``ValueError`` if
    it does not parse. Functions left out are counted in ``skipped`` by reason: ``no_docstring``,
    ``short_query`` (fewer than ``min_query_words`` words), ``trivial_body`` (only pass/.../raise
    NotImplementedError besides the docstring) and ``short_code`` (fewer than ``min_code_lines``
    non-blank lines once the docstring is removed)."""
    skipped = {} if skipped is None else skipped
    tree = ast.parse(text, filename=filename)
    lines = text.split("\n")
    pairs: list[RawPair] = []
    for qualname, node in _qualified_functions(tree):
        doc = ast.get_docstring(node, clean=True)
        if not doc or not doc.strip():
            skipped["no_docstring"] = skipped.get("no_docstring", 0) + 1
            continue
        summary = summarize_docstring(doc)
        if len(summary.split()) < max(min_query_words, 1):
            skipped["short_query"] = skipped.get("short_query", 0) + 1
            continue
        if _is_trivial_body(node.body[1:]):
            skipped["trivial_body"] = skipped.get("trivial_body", 0) + 1
            continue
        code = strip_docstring(lines, node)
        if count_code_lines(code) < min_code_lines:
            skipped["short_code"] = skipped.get("short_code", 0) + 1
            continue
        pairs.append(RawPair(query=summary, document=code, line=node.lineno, name=qualname, code_hash=code_key(code)))
    return pairs


def extract_file(path: str, min_query_words: int = 3, min_code_lines: int = 3,
                 max_file_bytes: int | None = None) -> FileResult:
    """Read, decode and parse one file; never raises for bad input (the error is returned instead).

    Error reasons: ``read_error`` (OSError), ``decode_error`` (bad coding cookie or undecodable bytes;
    the line is that of the first bad byte where known), ``syntax_error`` (with the parser's line),
    ``parse_error`` (recursion/memory limits while parsing). A file larger than ``max_file_bytes`` is a
    filter, not an error (``skipped['too_large']``).
    """
    skipped: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return FileResult([], ("read_error", 0, f"{type(e).__name__}: {e}"), skipped)
    if max_file_bytes is not None and len(data) > max_file_bytes:
        return FileResult([], None, {"too_large_file": 1})
    try:
        text = decode_source(data)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return FileResult([], ("decode_error", line, f"{e.encoding} cannot decode byte(s) at offset {e.start}: {e.reason}"), skipped)
    except (SyntaxError, LookupError) as e:
        return FileResult([], ("decode_error", getattr(e, "lineno", 0) or 1, f"{type(e).__name__}: {e}"), skipped)
    try:
        pairs = extract_pairs_from_text(text, min_query_words, min_code_lines, skipped, filename=path)
    except SyntaxError as e:
        return FileResult([], ("syntax_error", e.lineno or 0, f"{type(e).__name__}: {e.msg}"), skipped)
    except (ValueError, RecursionError, MemoryError) as e:
        return FileResult([], ("parse_error", 0, f"{type(e).__name__}: {e}"), skipped)
    return FileResult(pairs, None, skipped)
