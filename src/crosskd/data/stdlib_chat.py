"""The reference instruction set, `python-stdlib-chat`: conversations built offline from the standard library's code.

Every documented function and method of the stdlib corpus (data/stdlib.py's files, in their sorted order) whose body
has more than its docstring becomes one conversation: the user turn asks for the function by its signature and
docstring (the source text from `def` through the docstring, dedented), the assistant turn is the rest of its body
(dedented to the signature's level). A file that does not parse with the running interpreter is left out. Each
conversation is named `<file>:<qualified name>` and grouped by its file, so `data.heldout_documents` holds out whole
modules: the default (the benchmark protocol's held-out files) keeps fractions, textwrap, json.decoder and shlex out
of training. `python-stdlib-chat:<pattern>` keeps only the files whose relative path matches the shell pattern
(`python-stdlib-chat:json/*`: the json package), for small runs.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import textwrap
from collections.abc import Iterator

from crosskd.config import STDLIB_CHAT_SOURCE
from crosskd.data import stdlib
from crosskd.data.chat import ASSISTANT, Conversation, Message
REQUEST = "Complete this function from the Python standard library module `{module}`:\n\n{signature}"


def stdlib_conversations(source: str = STDLIB_CHAT_SOURCE) -> Iterator[Conversation]:
    """The conversations of `source` (`python-stdlib-chat`, or with `:<pattern>` the files matching it)."""
    pattern = source.partition(":")[2] or "*"
    root = stdlib.stdlib_root()
    for path in stdlib.stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        if not fnmatch.fnmatch(relative, pattern):
            continue
        code = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        lines = io.StringIO(code).readlines()  # split at newlines only, as ast counts lines (not at form feeds)
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for qualified_name, function in _documented_functions(tree):
            signature, body = _request_and_answer(lines, function)
            if body.strip():
                yield Conversation(f"{relative}:{qualified_name}", relative, (
                    Message("user", REQUEST.format(module=module, signature=signature)),
                    Message(ASSISTANT, body),
                ), responses=(1,))


def _documented_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function with a docstring and a statement after it, in source order."""
    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if ast.get_docstring(child) is not None and len(child.body) > 1:
                    yield f"{prefix}{child.name}", child
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
    yield from visit(tree, "")


def _request_and_answer(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, str]:
    """The source from `def` through the docstring, and the rest of the body, both dedented (a line indented less
    than the `def`, such as the inside of a string, is kept as it is)."""
    docstring_end = function.body[0].end_lineno
    signature = "".join(lines[function.lineno - 1 : docstring_end])
    indent = function.col_offset
    body = "".join(line[indent:] if not line[:indent].strip() else line
                   for line in lines[docstring_end : function.end_lineno])
    return textwrap.dedent(signature), body
