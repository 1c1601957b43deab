"""Unit tests for tasks/data.py (read, validate, convert) and the prepare_data task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks import data
from tasks.config import DataSourceConfig
from tasks.data import read_hub, read_local, to_trl
from tasks.errors import DataError
from tasks.params import load_params
from tasks.prepare import prepare_data

pytestmark = pytest.mark.filterwarnings("ignore:Logger 'tasks.prepare' attempted to send logs")

GOOD = {"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."}
PREF_HINT = (
    "preference rows need prompt/chosen/rejected; "
    "map your column names with data.preference.columns"
)


def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def load(kind: str, path: Path, columns: dict[str, str] | None = None) -> list[data.Row]:
    return to_trl(kind, read_local(path), columns or {})


def data_error(kind: str, path: Path, columns: dict[str, str] | None = None) -> str:
    with pytest.raises(DataError) as info:
        load(kind, path, columns)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def convert(kind: str, row: dict[str, Any], columns: dict[str, str] | None = None) -> dict:
    [(where, converted)] = to_trl(kind, [("raw.jsonl:1", row)], columns or {})
    assert where == "raw.jsonl:1"
    return converted


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("name", "content", "kind", "expected"),
    [
        (
            "a.jsonl",
            jsonl(GOOD, GOOD) + '{"prompt": "p", chosen}\n',
            "preference",
            ":3: malformed JSON (Expecting property name enclosed in double quotes at column 17)",
        ),
        (
            "a.json",
            "[\n" + json.dumps(GOOD) + ",\n" + '{"prompt": "p" "chosen": "c"}\n]\n',
            "preference",
            ":3: malformed JSON (Expecting ',' delimiter)",
        ),
        (
            "a.json",
            "[\n" + json.dumps(GOOD) + ",\n 5\n]\n",
            "preference",
            ": row 1: expected a JSON object per example, got int",
        ),
        (
            "a.jsonl",
            jsonl(GOOD) + "[1, 2]\n",
            "preference",
            ":2: expected a JSON object per example, got list",
        ),
        (
            "a.jsonl",
            jsonl(GOOD, {"prompt": "p", "chosen": "c"}),
            "preference",
            f":2: missing field 'rejected' ({PREF_HINT})",
        ),
        (
            "a.jsonl",
            jsonl({"question": "q", "answer": "a"}),
            "sft",
            ":1: missing field 'prompt' (sft rows need prompt/completion; map your column names "
            "with data.sft.columns)",
        ),
        (
            "a.jsonl",
            jsonl(GOOD, {"prompt": "p", "chosen": 4, "rejected": "r"}),
            "preference",
            ":2: field 'chosen': expected text or a list of messages, got int",
        ),
        (
            "a.jsonl",
            jsonl(GOOD, GOOD, {"prompt": "p", "chosen": "c", "rejected": "  \n"}),
            "preference",
            ":3: field 'rejected': empty text (fix or remove this example)",
        ),
        (
            "a.jsonl",
            jsonl({"prompt": "  "}),
            "prompts",
            ":1: field 'prompt': empty text (fix or remove this example)",
        ),
        (
            "a.jsonl",
            jsonl({"prompt": [user("hi")], "completion": [{"role": "assistant"}]}),
            "sft",
            ":1: field 'completion': each message needs string 'role' and 'content'",
        ),
        (
            "a.jsonl",
            jsonl(
                GOOD,
                {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            ),
            "preference",
            ":2: mixes conversational and plain-text examples in one dataset "
            "(convert all rows to one format)",
        ),
        (
            "a.jsonl",
            jsonl({"messages": [user("hi"), assistant("yo")]}, {"messages": [user("hi")]}),
            "sft",
            ":2: field 'messages': must be a list of messages ending with an assistant turn",
        ),
        (
            "a.jsonl",
            jsonl({"messages": "hi there"}),
            "sft",
            ":1: field 'messages': must be a list of messages ending with an assistant turn",
        ),
        (
            "a.csv",
            "prompt,chosen\nWhat?,Yes\nWhy?,Because\n",
            "preference",
            f":2: missing field 'rejected' ({PREF_HINT})",
        ),
        (
            "a.csv",  # line numbers count the header: the third data row is line 4
            "prompt,chosen,rejected\na,b,c\nd,e,f\ng, ,i\n",
            "preference",
            ":4: field 'chosen': empty text (fix or remove this example)",
        ),
        ("a.jsonl", "", "preference", ":1: empty file (no examples)"),
        ("a.jsonl", "\n\n  \n", "preference", ":1: empty file (no examples)"),
        ("a.json", "[]\n", "preference", ":1: empty file (no examples)"),
        ("a.csv", "", "preference", ":1: empty file (no examples)"),
        (
            "a.txt",
            "prompt,chosen,rejected\n",
            "preference",
            ": unsupported file type (use one of .jsonl, .json, .parquet, .csv)",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, name, content, kind, expected) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert data_error(kind, path) == f"{path}{expected}"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_undecodable_bytes_name_their_line(tmp_path, suffix) -> None:
    path = tmp_path / f"pairs{suffix}"
    head = "prompt,chosen,rejected\na,b,c\n" if suffix == ".csv" else jsonl(GOOD, GOOD)
    path.write_bytes(head.encode() + b'{"prompt": "\xff"}\n')
    assert data_error("preference", path) == (
        f"{path}:3: undecodable bytes, not UTF-8 (re-encode the file as UTF-8)"
    )


def test_missing_path(tmp_path) -> None:
    path = tmp_path / "nope.jsonl"
    assert data_error("preference", path) == (
        f"{path}: no such file or directory (check the data.*.path keys)"
    )


def test_directory_without_data_files(tmp_path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README.md").write_text("# notes\n")
    assert data_error("preference", tmp_path / "raw") == (
        f"{tmp_path / 'raw'}: no .jsonl/.json/.parquet/.csv files in this directory"
    )


def test_column_mapping_of_a_missing_column(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl({"question": "q", "chosen": "c", "rejected": "r"}, GOOD))
    assert data_error("preference", path, {"prompt": "question"}) == (
        f"{path}:2: missing column 'question' (named in data.preference.columns)"
    )


def test_csv_with_only_a_header_is_an_empty_file(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n")
    assert data_error("preference", path) == f"{path}:1: empty file (no examples)"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "p", "chosen": [], "rejected": "r"},
        {"prompt": [], "chosen": "c", "rejected": "r"},
        {"chosen": [], "rejected": []},
    ],
    ids=["empty-chosen-list", "empty-prompt-list", "empty-implicit-lists"],
)
def test_empty_message_list_is_a_data_error(tmp_path, row) -> None:
    # An empty list is one bad example: it must be reported as a DataError line, not crash.
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(GOOD, row))
    message = data_error("preference", path)
    assert message.startswith(f"{path}:2: field '"), message


# ----------------------------------------------------------------------------- conversion


def test_hh_rlhf_strings() -> None:
    row = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Four, I think",
    }
    assert convert("preference", row) == {
        "prompt": [user("What is 2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("Four, I think")],
    }


def test_hh_rlhf_multi_turn() -> None:
    history = "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2+2?"
    row = {
        "chosen": history + "\n\nAssistant: 4",
        "rejected": history + "\n\nAssistant: 4, or maybe 5",
    }
    assert convert("preference", row) == {
        "prompt": [user("Hi!"), assistant("Hello, how can I help?"), user("What is 2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("4, or maybe 5")],
    }


def test_ultrafeedback_style() -> None:
    row = {
        "prompt": "What color is the sky?",
        "chosen": [user("What color is the sky?"), assistant("It is blue.")],
        "rejected": [user("What color is the sky?"), assistant("It is green.")],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    assert convert("preference", row) == {
        "prompt": [user("What color is the sky?")],
        "chosen": [assistant("It is blue.")],
        "rejected": [assistant("It is green.")],
    }


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {
            "prompt": [user("What color is the sky?")],
            "chosen": [assistant("It is blue.")],
            "rejected": [assistant("It is green.")],
        },
    ],
    ids=["plain", "conversational"],
)
def test_explicit_prompt_passes_unchanged(row) -> None:
    expected = json.loads(json.dumps(row))
    assert convert("preference", {**row, "id": 7}) == expected


def test_sharegpt_conversations_for_sft() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "What is 2+2?"},
            {"from": "assistant", "value": "4"},
        ]
    }
    assert convert("sft", row) == {
        "prompt": [{"role": "system", "content": "Be brief."}, user("What is 2+2?")],
        "completion": [assistant("4")],
    }


def test_sharegpt_human_gpt_roles() -> None:
    # ShareGPT as published names its speakers `human` and `gpt`.
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    assert convert("sft", row) == {"prompt": [user("Hi")], "completion": [assistant("Hello!")]}


def test_conversational_sft_messages() -> None:
    messages = [user("Hi"), assistant("Hello!"), user("What is 2+2?"), assistant("4")]
    assert convert("sft", {"messages": messages}) == {
        "prompt": messages[:-1],
        "completion": [assistant("4")],
    }


def test_prompt_completion_sft_and_prompts_pass_unchanged() -> None:
    assert convert("sft", {"prompt": "2+2=", "completion": "4", "meta": 1}) == {
        "prompt": "2+2=",
        "completion": "4",
    }
    assert convert("prompts", {"prompt": [user("Hi")], "chosen": "x"}) == {"prompt": [user("Hi")]}


def test_column_renaming() -> None:
    row = {"question": "What is 2+2?", "good": "4", "bad": "5", "source": "web"}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert convert("preference", row, columns) == {
        "prompt": "What is 2+2?",
        "chosen": "4",
        "rejected": "5",
    }
    swapped = {"prompt": "question", "chosen": "rejected", "rejected": "chosen"}
    assert convert("preference", {"question": "q", "chosen": "b", "rejected": "a"}, swapped) == {
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
    }


def test_column_mapping_wins_over_a_column_of_the_target_name() -> None:
    row = {"instruction": "What is 2+2?", "prompt": "unused", "chosen": "4", "rejected": "5"}
    assert convert("preference", row, {"prompt": "instruction"})["prompt"] == "What is 2+2?"


# ----------------------------------------------------------------------------- file formats


ROWS = [
    {"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"},
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
]
TEXT_ROWS = [
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "Capital of Italy?", "chosen": "Rome", "rejected": "Milan"},
]


def test_read_jsonl_and_json_array(tmp_path) -> None:
    lines = tmp_path / "pairs.jsonl"
    lines.write_text(jsonl(TEXT_ROWS[0]) + "\n" + jsonl(TEXT_ROWS[1]))  # blank line 2 skipped
    assert read_local(lines) == [(f"{lines}:1", TEXT_ROWS[0]), (f"{lines}:3", TEXT_ROWS[1])]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(TEXT_ROWS, indent=2))
    assert read_local(array) == [
        (f"{array}: row 0", TEXT_ROWS[0]),
        (f"{array}: row 1", TEXT_ROWS[1]),
    ]
    plain = tmp_path / "lines.json"  # a .json file of JSON lines
    plain.write_text(jsonl(*TEXT_ROWS))
    assert read_local(plain) == [(f"{plain}:1", TEXT_ROWS[0]), (f"{plain}:2", TEXT_ROWS[1])]


def test_read_csv(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        'prompt,chosen,rejected\nCapital of France?,Paris,Lyon\n"Capital of Italy?",Rome,Milan\n'
    )
    assert read_local(path) == [(f"{path}:2", TEXT_ROWS[0]), (f"{path}:3", TEXT_ROWS[1])]


def test_read_csv_keeps_numeric_looking_text(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 1+1?,2,3\nWhat is 2+2?,4,5\n")
    assert [row for _, row in load("preference", path)] == ROWS


def test_read_parquet(tmp_path) -> None:
    import datasets

    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(TEXT_ROWS).to_parquet(str(path))
    assert read_local(path) == [(f"{path}: row 0", TEXT_ROWS[0]), (f"{path}: row 1", TEXT_ROWS[1])]


def test_read_directory_of_mixed_files(tmp_path) -> None:
    import datasets

    raw = tmp_path / "raw"
    (raw / "more").mkdir(parents=True)
    (raw / "a.jsonl").write_text(jsonl(TEXT_ROWS[0]))
    (raw / "b.csv").write_text("prompt,chosen,rejected\nCapital of Spain?,Madrid,Seville\n")
    datasets.Dataset.from_list([TEXT_ROWS[1]]).to_parquet(str(raw / "more" / "c.parquet"))
    (raw / "more" / "d.json").write_text(json.dumps([GOOD]))
    (raw / "notes.txt").write_text("not data\n")  # ignored inside a directory
    spain = {"prompt": "Capital of Spain?", "chosen": "Madrid", "rejected": "Seville"}
    assert load("preference", raw) == [
        (f"{raw / 'a.jsonl'}:1", TEXT_ROWS[0]),
        (f"{raw / 'b.csv'}:2", spain),
        (f"{raw / 'more' / 'c.parquet'}: row 0", TEXT_ROWS[1]),
        (f"{raw / 'more' / 'd.json'}: row 0", GOOD),
    ]


def _hub_dir(tmp_path: Path) -> Path:
    root = tmp_path / "hub_ds"
    root.mkdir()
    (root / "train.jsonl").write_text(jsonl(*TEXT_ROWS))
    (root / "test.jsonl").write_text(jsonl(GOOD))
    return root


def _src(name: str, split: str = "train", columns: dict[str, str] | None = None):
    return DataSourceConfig(path=None, name=name, config=None, split=split, columns=columns or {})


def test_read_hub_from_a_local_directory(tmp_path) -> None:
    root = _hub_dir(tmp_path)
    assert read_hub(_src(str(root))) == [
        (f"{root}[train]: row 0", TEXT_ROWS[0]),
        (f"{root}[train]: row 1", TEXT_ROWS[1]),
    ]
    assert read_hub(_src(str(root), "test")) == [(f"{root}[test]: row 0", GOOD)]


def test_read_hub_bad_name_or_split_is_one_line(tmp_path) -> None:
    root = _hub_dir(tmp_path)
    for src, detail in [
        (_src(str(tmp_path / "missing")), "Couldn't find any data file"),
        (_src(str(root), "validation"), 'Unknown split "validation"'),
    ]:
        with pytest.raises(DataError) as info:
            read_hub(src)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(
            f"hub dataset '{src.name}' (config None, split {src.split}): cannot load it: {detail}"
        ), message


# ----------------------------------------------------------------------------- prepare_data


def read_split(out: Path, kind: str, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / kind / f"{split}.jsonl").read_text().splitlines()]


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


SYNTHETIC = {
    "data.synthetic.num_sft": 300,
    "data.synthetic.num_preference": 300,
    "data.synthetic.num_prompts": 300,
    "data.eval_fraction": 0.2,
}


def pairs(n: int = 40) -> list[dict[str, str]]:
    return [
        {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
        for i in range(n)
    ]


def local_params(make_params, tmp_path: Path, rows: list[dict], **overrides: Any):
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(*rows))
    settings = {
        "data.source": "local",
        "data.preference.path": str(path),
        "data.eval_fraction": 0.3,
    }
    return load_params(make_params(settings | overrides))


def test_prepare_is_deterministic_in_the_seed(make_params, tmp_path) -> None:
    params = load_params(make_params(SYNTHETIC))
    first = prepare_data.fn(params.data, 7, tmp_path / "a")
    second = prepare_data.fn(params.data, 7, tmp_path / "b")
    assert first == second
    files = all_files(tmp_path / "a")
    assert set(files) == {
        f"{kind}/{split}.jsonl"
        for kind in ("sft", "preference", "prompts")
        for split in ("train", "eval")
    } | {"stats.json"}
    assert files == all_files(tmp_path / "b")
    assert json.loads(files["stats.json"]) == first
    prepare_data.fn(params.data, 8, tmp_path / "c")
    assert all_files(tmp_path / "c")["sft/train.jsonl"] != files["sft/train.jsonl"]


def test_prepare_splits_by_prompt(make_params, tmp_path) -> None:
    params = load_params(make_params(SYNTHETIC))
    out = tmp_path / "out"
    stats = prepare_data.fn(params.data, params.common.seed, out)
    train_prompts, eval_prompts = set(), set()
    for kind in ("sft", "preference", "prompts"):
        train = {json.dumps(r["prompt"]) for r in read_split(out, kind, "train")}
        held_out = {json.dumps(r["prompt"]) for r in read_split(out, kind, "eval")}
        assert train and held_out
        assert train.isdisjoint(held_out), kind
        train_prompts |= train
        eval_prompts |= held_out
        assert stats[kind]["train"] == len(read_split(out, kind, "train"))
        assert stats[kind]["eval"] == len(read_split(out, kind, "eval"))
    assert train_prompts.isdisjoint(eval_prompts)  # across kinds too: eval prompts are unseen
    assert stats["source"] == "synthetic"


def test_prepare_dedupes_and_falls_back_to_preferences(make_params, tmp_path) -> None:
    rows = pairs(40)
    # 2 exact duplicates; one more pair shares prompt and chosen with pair 2 (new rejected).
    extra = {"prompt": "Question 2?", "chosen": "Good answer 2.", "rejected": "Other answer."}
    params = local_params(make_params, tmp_path, [*rows, rows[0], rows[1], extra])
    out = tmp_path / "out"
    stats = prepare_data.fn(params.data, params.common.seed, out)
    assert stats["source"] == "local"
    expected = {"preference": (41, 2), "sft": (40, 3), "prompts": (40, 3)}
    for kind, (kept, duplicates) in expected.items():
        assert stats[kind]["train"] + stats[kind]["eval"] == kept, kind
        assert stats[kind]["duplicates_dropped"] == duplicates, kind
        assert stats[kind]["too_long_dropped"] == 0
        assert stats[kind]["conversational"] is False
        assert stats[kind]["train"] > 0 and stats[kind]["eval"] > 0
    written = {
        kind: read_split(out, kind, "train") + read_split(out, kind, "eval") for kind in expected
    }
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, written["preference"])) == sorted(map(key, [*rows, extra]))
    assert sorted(map(key, written["sft"])) == sorted(
        key({"prompt": r["prompt"], "completion": r["chosen"]}) for r in rows
    )
    assert sorted(map(key, written["prompts"])) == sorted(
        key({"prompt": r["prompt"]}) for r in rows
    )


def test_prepare_uses_given_sft_and_prompts(make_params, tmp_path) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text(jsonl(*({"prompt": f"S{i}", "completion": f"C{i}"} for i in range(30))))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(f"P{i}\n" for i in range(30)))
    params = local_params(
        make_params,
        tmp_path,
        pairs(30),
        **{"data.sft.path": str(sft), "data.prompts.path": str(prompts)},
    )
    out = tmp_path / "out"
    prepare_data.fn(params.data, params.common.seed, out)
    sft_rows = read_split(out, "sft", "train") + read_split(out, "sft", "eval")
    assert sorted(r["prompt"] for r in sft_rows) == sorted(f"S{i}" for i in range(30))
    prompt_rows = read_split(out, "prompts", "train") + read_split(out, "prompts", "eval")
    assert sorted(r["prompt"] for r in prompt_rows) == sorted(f"P{i}" for i in range(30))


def test_prepare_drops_long_rows(make_params, tmp_path) -> None:
    rows = pairs(40)
    rows[3]["chosen"] = "x" * 41  # too long in preference and in the sft fallback
    rows[5]["rejected"] = "y" * 41  # too long in preference only
    rows[7]["chosen"] = "z" * 40  # exactly max_chars: kept
    params = local_params(make_params, tmp_path, rows, **{"data.max_chars": 40})
    out = tmp_path / "out"
    stats = prepare_data.fn(params.data, params.common.seed, out)
    assert stats["preference"]["too_long_dropped"] == 2
    assert stats["sft"]["too_long_dropped"] == 1
    assert stats["prompts"]["too_long_dropped"] == 0
    assert stats["preference"]["train"] + stats["preference"]["eval"] == 38
    assert stats["sft"]["train"] + stats["sft"]["eval"] == 39
    kept = read_split(out, "preference", "train") + read_split(out, "preference", "eval")
    assert rows[7] in kept
    assert max(data.text_length(r) for r in kept) == 40


def test_prepare_fails_before_writing_anything(make_params, tmp_path) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text(jsonl(*({"prompt": f"S{i}", "completion": f"C{i}"} for i in range(30))))
    rows = pairs(10)
    params = local_params(make_params, tmp_path, rows, **{"data.sft.path": str(sft)})
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(jsonl(*rows[:3], {**rows[3], "chosen": ""}, *rows[4:]))
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_data.fn(params.data, params.common.seed, out)
    assert (
        str(info.value)
        == f"{pairs_file}:4: field 'chosen': empty text (fix or remove this example)"
    )
    assert not out.exists()
