"""Reading, validating and converting raw examples to TRL's standard formats.

Every row carries where it came from (`file:line`, or `file: row N` where a format has no lines),
so a bad example is reported as `data/raw/pairs.jsonl:17: 'chosen': empty text (...)`.
Formats accepted (converted with TRL's data utilities):
- SFT: prompt/completion (strings or message lists) or `messages` (split before the last
  assistant turn); ShareGPT `conversations` with from/value.
- preference: explicit prompt/chosen/rejected; implicit prompt inside chosen/rejected, as message
  lists (UltraFeedback-binarized) or as Anthropic HH-RLHF `\\n\\nHuman: …\\n\\nAssistant: …`
  strings.
- prompts: prompt (string or message list).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from tasks.config import DataSourceConfig
from tasks.errors import DataError

FIELDS = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
Row = tuple[str, dict[str, Any]]  # (where it came from, the example)
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
# Fields that may hold message lists (before conversion: ShareGPT's `conversations` too).
MESSAGE_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # published ShareGPT's speaker names


def read_local(path: Path) -> list[Row]:
    """Rows of a .jsonl/.json/.parquet/.csv file, or of every such file below a directory."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (check the data.*.path keys)")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
    rows: list[Row] = []
    for file in files:
        if file.suffix not in SUFFIXES:
            raise DataError(f"{file}: unsupported file type (use one of {', '.join(SUFFIXES)})")
        if file.stat().st_size == 0:
            raise DataError(f"{file}:1: empty file (no examples)")
        if file.suffix in (".jsonl", ".json"):
            file_rows = _read_json(file)
        else:
            file_rows = _read_csv(file) if file.suffix == ".csv" else _read_parquet(file)
        if not file_rows:
            raise DataError(f"{file}:1: empty file (no examples)")
        rows += file_rows
    return rows


def read_hub(src: DataSourceConfig) -> list[Row]:
    """Rows of `datasets.load_dataset(name, config, split)`: a hub dataset or a local one."""
    import datasets

    try:
        dataset = datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as exc:  # datasets raises many types; all mean "could not load it"
        raise DataError(
            f"hub dataset '{src.name}' (config {src.config}, split {src.split}): "
            f"cannot load it: {str(exc).splitlines()[0]}"
        ) from None
    return [(f"{src.name}[{src.split}]: row {i}", row) for i, row in enumerate(dataset)]


def _read_json(file: Path) -> list[Row]:
    text = _decode(file)
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            examples = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        return [
            (f"{file}: row {i}", _as_object(f"{file}: row {i}", ex))
            for i, ex in enumerate(examples)
        ]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{file}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        rows.append((f"{file}:{number}", _as_object(f"{file}:{number}", example)))
    return rows


def _read_csv(file: Path) -> list[Row]:
    """Every cell stays text (pandas would turn `4` into an int and empty cells into NaN), and
    each row is named by the line it starts on (a quoted cell may span lines)."""
    reader = csv.reader(io.StringIO(_decode(file), newline=""))
    header = next((cells for cells in reader if cells), None)  # skip leading blank lines
    rows, start = [], reader.line_num + 1
    for cells in reader:
        if cells:  # a blank line is no example
            if len(cells) != len(header):
                raise DataError(
                    f"{file}:{start}: {len(cells)} cells but the header has {len(header)} "
                    "(quote cells that contain commas)"
                )
            rows.append((f"{file}:{start}", dict(zip(header, cells, strict=True))))
        start = reader.line_num + 1
    return rows


def _read_parquet(file: Path) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset("parquet", data_files=str(file), split="train")
    except Exception as exc:
        raise DataError(f"{file}: cannot read it as parquet: {str(exc).splitlines()[0]}") from None
    return [(f"{file}: row {i}", row) for i, row in enumerate(dataset)]


def _decode(file: Path) -> str:
    # Windows editors start UTF-8 files with a BOM; drop it before decoding so line counts hold.
    data = file.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{file}:{line}: undecodable bytes, not UTF-8 (re-encode the file as UTF-8)"
        ) from None


def _as_object(where: str, example: Any) -> dict[str, Any]:
    if not isinstance(example, dict):
        raise DataError(
            f"{where}: expected a JSON object per example, got {type(example).__name__}"
        )
    return example


def to_trl(kind: str, rows: list[Row], columns: dict[str, str]) -> list[Row]:
    """Rename columns, convert to TRL's explicit-prompt format for `kind` and validate each row."""
    # Imported here: trl pulls in torch and transformers, seconds that reading data does not need.
    from trl.data_utils import is_conversational, maybe_convert_to_chatml, maybe_extract_prompt

    converted = []
    for where, row in rows:
        missing = [source for source in columns.values() if source not in row]
        if missing:
            raise DataError(
                f"{where}: missing column '{missing[0]}' (named in data.{kind}.columns)"
            )
        # A mapped column wins over a column that already has the target name.
        row = {key: value for key, value in row.items() if key not in columns.values()} | {
            name: row[source] for name, source in columns.items()
        }
        _no_empty_lists(where, row)
        sharegpt = "conversations" in row
        row = maybe_convert_to_chatml(row)  # from/value → role/content, but keeps the role names
        if sharegpt and isinstance(row["messages"], list):
            for message in row["messages"]:
                if isinstance(message, dict) and message.get("role") in ("human", "gpt"):
                    message["role"] = SHAREGPT_ROLES[message["role"]]
        if kind == "preference":
            row = maybe_extract_prompt(_hh_to_messages(row))
        elif kind == "sft" and "messages" in row and "completion" not in row:
            row = _split_last_turn(where, row["messages"])
        converted.append((where, _validated(kind, where, row)))
    conversational = {is_conversational(row) for _, row in converted}
    if len(conversational) > 1:
        first = next(
            where
            for where, row in converted
            if is_conversational(row) != is_conversational(converted[0][1])
        )
        raise DataError(
            f"{first}: mixes conversational and plain-text examples in one dataset "
            "(convert all rows to one format)"
        )
    return converted


def _no_empty_lists(where: str, row: dict[str, Any]) -> None:
    """TRL's converters index the first message of a list: an empty one would crash them."""
    for field in MESSAGE_FIELDS:
        if row.get(field) == []:
            raise DataError(f"{where}: field '{field}': no messages (fix or remove this example)")


def _hh_to_messages(row: dict[str, Any]) -> dict[str, Any]:
    """Anthropic HH-RLHF strings → message lists, so the prompt is cut at a turn boundary
    (a character-level common prefix would eat the first shared letters of both answers)."""
    if not all(
        isinstance(row.get(k), str) and row[k].startswith("\n\nHuman: ")
        for k in ("chosen", "rejected")
    ):
        return row
    roles = {"Human": "user", "Assistant": "assistant"}
    for key in ("chosen", "rejected"):
        parts = _HH_TURN.split(row[key])[1:]  # ['Human', text, 'Assistant', text, ...]
        row[key] = [
            {"role": roles[who], "content": text.strip()}
            for who, text in zip(parts[::2], parts[1::2], strict=True)
        ]
    return row


def _split_last_turn(where: str, messages: Any) -> dict[str, Any]:
    if not (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "assistant"
    ):
        raise DataError(
            f"{where}: field 'messages': must be a list of messages ending with an assistant turn"
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _validated(kind: str, where: str, row: dict[str, Any]) -> dict[str, Any]:
    fields = FIELDS[kind]
    hint = f"map your column names with data.{kind}.columns"
    for field in fields:
        if field not in row:
            raise DataError(
                f"{where}: missing field '{field}' ({kind} rows need {'/'.join(fields)}; {hint})"
            )
        value = row[field]
        if isinstance(value, list):
            for message in value:
                if not (
                    isinstance(message, dict)
                    and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)
                ):
                    raise DataError(
                        f"{where}: field '{field}': each message needs string 'role' and 'content'"
                    )
            text = "".join(message["content"] for message in value)
        elif isinstance(value, str):
            text = value
        else:
            raise DataError(
                f"{where}: field '{field}': expected text or a list of messages, got "
                f"{type(value).__name__}"
            )
        if not text.strip():
            raise DataError(f"{where}: field '{field}': empty text (fix or remove this example)")
    if kind == "preference" and row["chosen"] == row["rejected"]:
        raise DataError(
            f"{where}: chosen and rejected are identical (a pair needs two different answers)"
        )
    return {field: row[field] for field in fields}


def text_length(row: dict[str, Any]) -> int:
    """Characters of the longest field of a converted row (for data.max_chars)."""
    return max(
        len(v) if isinstance(v, str) else sum(len(m["content"]) for m in v) for v in row.values()
    )


def prompt_key(prompt: str | list[dict[str, str]], seed: int) -> float:
    """A stable number in [0, 1) from the prompt: rows with the same prompt share a split."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
