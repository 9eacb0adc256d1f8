"""Ingest: files and records in, `Document`s out (text plus where it came from).

Formats: plain text, Markdown, HTML (tags stripped with the stdlib parser, scripts and
styles dropped), Python source, PDF (through `pypdf`, imported only when a PDF is met)
and JSONL in the BEIR shape (`_id`/`id`, `title`, `text`; every other field becomes
metadata). A file that cannot be read or parsed is reported in `errors` and skipped.

With no inputs the corpus is the documentation of this interpreter's standard library:
module, class and function docstrings read with `ast` from the source files — the same
text `pydoc` shows, without importing (and so running) every stdlib module.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ember.data import stdlib_files
from ember.errors import EmberError

KINDS = {".md": "markdown", ".markdown": "markdown", ".rst": "text", ".txt": "text", ".text": "text",
         ".html": "html", ".htm": "html", ".py": "python", ".pdf": "pdf", ".jsonl": "jsonl"}
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache"}
STDLIB_SOURCE = "stdlib"


@dataclass
class Document:
    doc_id: str
    text: str
    source: str  # file path (or "stdlib", or "records"); the unit of incremental re-indexing
    title: str = ""
    kind: str = "text"  # how to chunk: "markdown", "python" or "text"
    metadata: dict[str, Any] = field(default_factory=dict)


def content_hash(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "h1", "h2", "h3", "h4",
             "h5", "h6", "pre", "blockquote", "header", "footer", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "noscript"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag.startswith("h") or tag == "p" else "\n")
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data.strip()
        if not self.skip:
            self.parts.append(data)


def html_to_text(source: str) -> tuple[str, str]:
    """(title, visible text) of an HTML page, blocks separated by blank lines."""
    p = _HTMLText()
    p.feed(source)
    p.close()
    lines = [" ".join(line.split()) for line in "".join(p.parts).splitlines()]
    text, blank = [], False
    for line in lines:
        if line or not blank:
            text.append(line)
        blank = not line
    return p.title, "\n".join(text).strip()


def pdf_to_text(path: Path) -> tuple[str, list[int]]:
    """Text of a PDF's pages joined by form feeds, and where each page starts."""
    try:  # an optional extra: only PDF files need it
        import pypdf
    except ImportError as e:
        raise EmberError("PDF files need the pypdf package (pip install pypdf).") from e
    reader = pypdf.PdfReader(str(path))
    parts, starts, pos = [], [], 0
    for page in reader.pages:
        starts.append(pos)
        t = page.extract_text() or ""
        parts.append(t)
        pos += len(t) + 1
    return "\f".join(parts), starts


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def record_document(rec: dict[str, Any], source: str, fallback_id: str) -> Document:
    """A BEIR-shaped record: `_id`/`id`, `title`, `text`; other fields become metadata."""
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise EmberError(f"record {fallback_id} has no string 'text' field")
    meta = {k: v for k, v in rec.items() if k not in ("_id", "id", "title", "text", "metadata")}
    if isinstance(rec.get("metadata"), dict):
        meta.update(rec["metadata"])
    doc_id = str(rec.get("_id", rec.get("id", fallback_id)))
    return Document(doc_id, rec["text"], source, str(rec.get("title") or ""), "text", meta)


def read_file(path: Path) -> list[Document]:
    """Documents in one file; raises (OSError, ValueError, EmberError...) when it is unreadable."""
    kind = KINDS.get(path.suffix.lower(), "text")
    src = str(path)
    if kind == "pdf":
        text, starts = pdf_to_text(path)
        return [Document(src, text, src, path.stem, "text", {"page_starts": starts, "format": "pdf"})]
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise EmberError("binary file (NUL bytes), not text")
    text = _decode(raw)
    if kind == "jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                docs.append(record_document(json.loads(line), src, f"{src}:{n}"))
        return docs
    if kind == "html":
        title, body = html_to_text(text)
        return [Document(src, body, src, title or path.stem, "markdown", {"format": "html"})]
    if kind == "python":
        ast.parse(text)  # a corrupt .py file is reported rather than indexed as prose
    return [Document(src, text, src, path.name, kind, {"format": path.suffix.lstrip(".") or "text"})]


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
                out += [Path(dirpath, f) for f in sorted(filenames)
                        if Path(f).suffix.lower() in KINDS and not f.startswith(".")]
        else:
            out.append(p)
    return out


# --- the default corpus: standard-library documentation ---------------------------------------
def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # very old syntax in odd files: the name alone is enough
        return "(...)"


def module_doc(source: str, module: str) -> str:
    """Markdown of a module's public docstrings: `# module`, `## name(signature)` per definition."""
    tree = ast.parse(source)
    parts = [f"# {module}\n\n{ast.get_docstring(tree) or ''}".rstrip()]

    def visit(body: list[ast.stmt], prefix: str, depth: int) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                doc = ast.get_docstring(node)
                name = f"{prefix}{node.name}"
                if doc:
                    sig = "" if isinstance(node, ast.ClassDef) else _signature(node)
                    kind = "class " if isinstance(node, ast.ClassDef) else ""
                    parts.append(f"{'#' * (depth + 2)} {kind}{name}{sig}\n\n{doc}")
                if isinstance(node, ast.ClassDef) and depth == 0:
                    visit(node.body, name + ".", 1)

    visit(tree.body, f"{module}.", 0)
    return "\n\n".join(parts) + "\n"


def stdlib_documents(max_modules: int | None = None) -> Iterator[Document]:
    """One Markdown document per public stdlib module that has docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for f in stdlib_files():
        rel = f.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts) or parts[0] in ("test", "idlelib"):
            continue
        name = ".".join(parts)
        try:
            text = module_doc(f.read_text(encoding="utf-8"), name)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if len(text) < 200:  # modules without documentation add noise, not answers
            continue
        yield Document(f"stdlib:{name}", text, STDLIB_SOURCE, name, "markdown", {"module": name, "path": str(f)})
        n += 1
        if max_modules is not None and n >= max_modules:
            return
