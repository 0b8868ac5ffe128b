"""Contrast datasets: loading, validating, saving, splitting and chat formatting."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SteerdeskError
from .fileio import atomic_write_text

FIELDS = ("prompt", "base", "target")


@dataclass(frozen=True)
class Example:
    """One contrast pair: an optional user prompt and two assistant replies."""

    prompt: str = ""
    base: str = ""
    target: str = ""

    def problem(self, paired: bool = True) -> str | None:
        """Why this row cannot be used, or ``None`` when it is fine."""
        if not self.base.strip() and not self.target.strip():
            return "base and target are both empty"
        if paired and not self.base.strip():
            return "base is empty"
        if paired and not self.target.strip():
            return "target is empty"
        return None


@dataclass
class Dataset:
    """An ordered list of examples.

    ``paired`` is False for two unpaired plain-text lists, where a row may hold only
    one side (mean difference still works; PCA of paired differences does not).
    """

    examples: list[Example] = field(default_factory=list)
    name: str = "untitled"
    paired: bool = True

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def base_texts(self) -> list[tuple[str, str]]:
        """(prompt, base) of every row with a base reply."""
        return [(e.prompt, e.base) for e in self.examples if e.base.strip()]

    @property
    def target_texts(self) -> list[tuple[str, str]]:
        """(prompt, target) of every row with a target reply."""
        return [(e.prompt, e.target) for e in self.examples if e.target.strip()]

    def problems(self) -> list[tuple[int, str]]:
        """``(row, reason)`` for every unusable row."""
        out = []
        for i, e in enumerate(self.examples):
            reason = e.problem(self.paired)
            if reason:
                out.append((i, reason))
        return out

    def validate(self) -> None:
        """Raise ``SteerdeskError`` unless the dataset can produce a vector."""
        if not self.examples:
            raise SteerdeskError(f"Dataset {self.name!r} is empty: add at least one base and one target example.")
        bad = self.problems()
        if bad and self.paired:
            row, reason = bad[0]
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            raise SteerdeskError(f"Dataset {self.name!r} row {row + 1}: {reason}{more}.")
        if not self.base_texts:
            raise SteerdeskError(f"Dataset {self.name!r} has no base examples.")
        if not self.target_texts:
            raise SteerdeskError(f"Dataset {self.name!r} has no target examples.")

    def sha256(self) -> str:
        """Content hash (recorded in vector files and run records)."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(json.dumps([e.prompt, e.base, e.target], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def split(self, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Deterministic shuffled split into (train, held-out); each keeps at least one row."""
        if not 0.0 <= heldout_fraction < 1.0:
            raise SteerdeskError("The held-out fraction must be in [0, 1).")
        idx = list(range(len(self.examples)))
        random.Random(seed).shuffle(idx)
        n_held = int(round(len(idx) * heldout_fraction))
        if heldout_fraction > 0 and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held = sorted(idx[:n_held])
        train = sorted(idx[n_held:])
        return (
            replace(self, examples=[self.examples[i] for i in train], name=f"{self.name} (train)"),
            replace(self, examples=[self.examples[i] for i in held], name=f"{self.name} (held-out)"),
        )


# ---------------------------------------------------------------------------- loading

def read_text(path: Path) -> str:
    """A text file as UTF-8 (a BOM tolerated); ``SteerdeskError`` naming the file when it cannot be read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SteerdeskError(f"Dataset file not found: {path}") from None
    except IsADirectoryError:
        raise SteerdeskError(f"{path} is a folder, not a dataset file.") from None
    except OSError as exc:
        raise SteerdeskError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    offset = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a BOM is tolerated
    try:
        text = raw[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = exc.start + offset
        line = raw[:pos].count(b"\n") + 1
        raise SteerdeskError(f"{path}, line {line}: not valid UTF-8 text (byte {pos}).") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _row_from_mapping(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise SteerdeskError(f"{where}: expected an object with \"base\" and \"target\", got {type(obj).__name__}.")
    values = {}
    for key in FIELDS:
        value = obj.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise SteerdeskError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
        values[key] = value
    missing = [k for k in ("base", "target") if k not in obj]
    if missing:
        raise SteerdeskError(f"{where}: missing field {' and '.join(repr(m) for m in missing)}.")
    return Example(**values)


def parse_jsonl(text: str, name: str = "<text>") -> Dataset:
    """Parse JSONL: one ``{"prompt","base","target"}`` object a line; blank lines skipped."""
    examples = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SteerdeskError(f"{name}, line {lineno}: invalid JSON ({exc.msg}, column {exc.colno}).") from None
        except RecursionError:
            raise SteerdeskError(f"{name}, line {lineno}: JSON nested too deeply.") from None
        examples.append(_row_from_mapping(obj, f"{name}, line {lineno}"))
    return Dataset(examples, name=Path(name).stem)


def parse_csv(text: str, name: str = "<text>") -> Dataset:
    """Parse CSV with a header naming ``base`` and ``target`` (``prompt`` optional)."""
    rows_numbered: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text))
    start_line = 1
    try:
        for row in reader:  # number rows by the physical line they start on
            if any(c.strip() for c in row):
                rows_numbered.append((start_line, row))
            start_line = reader.line_num + 1
    except csv.Error as exc:
        raise SteerdeskError(f"{name}, line {reader.line_num}: malformed CSV ({exc}).") from None
    if not rows_numbered:
        return Dataset([], name=Path(name).stem)
    header_line, header = rows_numbered[0]
    cols = [h.strip().lower() for h in header]
    if "base" not in cols or "target" not in cols:
        raise SteerdeskError(
            f"{name}, line {header_line}: the header must name the columns prompt, base and target "
            f"(found {', '.join(repr(c) for c in cols) or 'nothing'})."
        )
    unknown = [c for c in cols if c not in FIELDS]
    if unknown:
        raise SteerdeskError(
            f"{name}, line {header_line}: unknown column {unknown[0]!r}; expected prompt, base, target.")
    examples = []
    for lineno, row in rows_numbered[1:]:
        if len(row) > len(cols):
            raise SteerdeskError(f"{name}, line {lineno}: {len(row)} fields, but the header has {len(cols)}.")
        values = {c: (row[i] if i < len(row) else "") for i, c in enumerate(cols)}
        examples.append(Example(**{k: values.get(k, "") for k in FIELDS}))
    return Dataset(examples, name=Path(name).stem)


def parse_lines(text: str) -> list[str]:
    """One example per non-blank line."""
    return [line for line in text.split("\n") if line.strip()]


def load_dataset(path: str | Path, target_path: str | Path | None = None) -> Dataset:
    """Load ``.jsonl``/``.json`` or ``.csv``; with ``target_path``, two plain-text lists.

    Errors name the file and line.
    """
    path = Path(path)
    if target_path is not None:
        base = parse_lines(read_text(path))
        target = parse_lines(read_text(Path(target_path)))
        n = max(len(base), len(target))
        examples = [Example("", base[i] if i < len(base) else "", target[i] if i < len(target) else "")
                    for i in range(n)]
        return Dataset(examples, name=path.stem, paired=len(base) == len(target))
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        ds = parse_csv(text, str(path))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        ds = parse_jsonl(text, str(path))
    elif suffix == ".txt":
        raise SteerdeskError(
            f"{path}: a plain-text list holds one side only; give the base and target files together."
        )
    else:
        raise SteerdeskError(
            f"{path}: unknown dataset format {suffix or '(no extension)'}; use .jsonl, .csv or two .txt files.")
    ds.name = path.stem
    return ds


def to_jsonl(ds: Dataset) -> str:
    """The dataset as JSON Lines text (one object per pair)."""
    lines = [json.dumps({"prompt": e.prompt, "base": e.base, "target": e.target}, ensure_ascii=False)
             for e in ds.examples]
    return "\n".join(lines) + ("\n" if lines else "")


def to_csv(ds: Dataset) -> str:
    """The dataset as CSV text with a prompt,base,target header."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for e in ds.examples:
        writer.writerow([e.prompt, e.base, e.target])
    return buf.getvalue()


def save_dataset(ds: Dataset, path: str | Path, target_path: str | Path | None = None) -> None:
    """Save atomically as JSONL or CSV (by extension), or as two text files."""
    path = Path(path)
    if target_path is not None:
        atomic_write_text(path, "".join(e.base.replace("\n", " ") + "\n" for e in ds.examples if e.base.strip()))
        atomic_write_text(target_path,
                          "".join(e.target.replace("\n", " ") + "\n" for e in ds.examples if e.target.strip()))
        return
    if path.suffix.lower() == ".csv":
        atomic_write_text(path, to_csv(ds))
    else:
        atomic_write_text(path, to_jsonl(ds))


# ---------------------------------------------------------------------------- bundled

def bundled_datasets() -> dict[str, str]:
    """Name -> file name of the datasets shipped as package data."""
    folder = resources.files("steerdesk") / "assets" / "datasets"
    return {p.name.rsplit(".", 1)[0]: p.name for p in folder.iterdir() if p.name.endswith(".jsonl")}


def bundled_path(name: str) -> Path:
    """Filesystem path of a bundled dataset (works frozen and unfrozen)."""
    names = bundled_datasets()
    if name not in names:
        raise SteerdeskError(f"No bundled dataset {name!r}; available: {', '.join(sorted(names))}.")
    return Path(str(resources.files("steerdesk") / "assets" / "datasets" / names[name]))


def load_bundled(name: str) -> Dataset:
    """Load a bundled dataset by name (e.g. ``neutral_rude``)."""
    ds = load_dataset(bundled_path(name))
    ds.name = name
    return ds


def resolve_dataset(spec: str, target_path: str | None = None) -> Dataset:
    """A path, or ``bundled:NAME`` / a bare bundled name.

    Raises ``SteerdeskError`` for a file that cannot be read or parsed; a spec that is neither a
    file nor a bundled name says so and lists the bundled names.
    """
    if spec.startswith("bundled:"):
        return load_bundled(spec.split(":", 1)[1])
    if not Path(spec).exists() and spec in bundled_datasets():
        return load_bundled(spec)
    if not Path(spec).exists() and not Path(spec).suffix and "/" not in spec:  # meant as a bundled name
        raise SteerdeskError(f"No dataset file or bundled dataset named {spec!r}; bundled: "
                             f"{', '.join(sorted(bundled_datasets()))}.")
    return load_dataset(spec, target_path)


# ---------------------------------------------------------------------------- formatting

def uses_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer has a chat template (else plain ``prompt\\n`` + reply)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_pair(tokenizer: Any, prompt: str, reply: str, system: str | None = None) -> tuple[str, str]:
    """Return ``(prefix, full)`` texts for a prompt + assistant reply.

    With a chat template, ``full`` ends in the reply's content (``continue_final_message``),
    so the last token is content, not an end-of-turn tag; ``prefix`` is the same chat up
    to the start of the reply. Without a template: ``prompt\\n`` + reply.
    """
    if uses_chat_template(tokenizer):
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        if prompt:
            messages.append({"role": "user", "content": prompt})
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                             tokenize=False, continue_final_message=True)
        # The template may strip the reply's outer whitespace; find where the content starts.
        stripped = reply.strip()
        cut = full.rfind(stripped) if stripped else len(full)
        prefix = full[:cut] if cut >= 0 else full
        return prefix, full
    prefix = f"{prompt}\n" if prompt else ""
    return prefix, prefix + reply


def format_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The generation prompt: one user message (+ optional system), generation prompt added."""
    if uses_chat_template(tokenizer):
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n{user}\n" if system else f"{user}\n"
