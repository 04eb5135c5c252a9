"""Loading from every kind of source, and every kind of bad input: exit status 2, a message naming the file,
the row and the field, no traceback; with --on_bad_row skip, the right rows counted and left out."""

import json
import shutil

import pytest
from datasets import Dataset, DatasetDict

from dpo_jax.cli import main
from dpo_jax.config import DataConfig
from dpo_jax.data import MissingSplit, load_split
from dpo_jax.data import validate
from tiny_tokenizers import gpt2_style, llama3_style

GOOD = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}


def msg(role, content):
    return {"role": role, "content": content}


CONV = {"prompt": [msg("user", "Capital of France?")], "chosen": [msg("assistant", "Paris.")],
        "rejected": [msg("assistant", "Lyon.")]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    llama3_style().save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run_audit(capsys, tokenizer_dir, data, *extra):
    code = main(["audit", "--model_name_or_path", tokenizer_dir, "--dataset_name", data, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_ROWS = {
    "null": ({**GOOD, "chosen": None}, "field 'chosen' is null"),
    "empty": ({**GOOD, "rejected": "  "}, "field 'rejected' is empty"),
    "not_a_string": ({**GOOD, "chosen": 5}, "field 'chosen' is a int, expected a string"),
    "not_json": ('{"prompt": "a", "chosen": "b", "rejected": "c"', "not valid JSON"),
    "not_an_object": ('["a", "b"]', "a JSON list, expected an object"),
}
BAD_MESSAGES = {
    "no_role": ({**CONV, "chosen": [{"content": "Paris."}]}, "field 'chosen', message 1 has no 'role'"),
    "no_content": ({**CONV, "prompt": [{"role": "user"}]}, "field 'prompt', message 1 has no 'content'"),
    "unknown_role": ({**CONV, "rejected": [msg("bot", "Lyon.")]}, "unknown role 'bot'"),
    "empty_list": ({**CONV, "chosen": []}, "field 'chosen' is an empty list"),
    "content_not_string": ({**CONV, "chosen": [msg("assistant", 3)]}, "'content' is a int"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS) + list(BAD_MESSAGES))
def test_bad_row_names_file_row_and_field(case, tmp_path, capsys, tokenizer_dir):
    bad, expected = {**BAD_ROWS, **BAD_MESSAGES}[case]
    good = CONV if case in BAD_MESSAGES else GOOD
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    out_dir = tmp_path / "out"
    code, out, err = run_audit(capsys, tokenizer_dir, path, "--output_dir", str(out_dir))
    assert code == 2
    assert f"{path}, row 3: " in err and expected in err and "--on_bad_row skip" in err
    assert "Traceback" not in err + out
    assert not out_dir.exists()  # nothing half-written

    code, out, err = run_audit(capsys, tokenizer_dir, path, "--output_dir", str(out_dir), "--on_bad_row", "skip")
    assert code == 0, err
    report = json.loads((out_dir / "data_audit.json").read_text())["train"]
    assert report["records_read"] == 4 and report["pairs_kept"] == 3
    assert report["counts"]["skipped"] == 1 and report["first_rows"]["skipped"] == [3]


def test_skip_counts_several_bad_rows_and_lists_them(tmp_path, capsys, tokenizer_dir):
    rows = [GOOD, {**GOOD, "chosen": None}, "{not json", GOOD, {**GOOD, "prompt": ""}, "", GOOD, {**GOOD, "rejected": 1}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)  # the blank line is not a record: 7 records
    code, _, err = run_audit(capsys, tokenizer_dir, path)
    assert code == 2 and "row 2: field 'chosen' is null" in err and "3 more bad rows: rows 3, 5, 7" in err
    out_dir = tmp_path / "out"
    code, out, err = run_audit(capsys, tokenizer_dir, path, "--on_bad_row", "skip", "--output_dir", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "data_audit.json").read_text())["train"]
    assert (report["records_read"], report["pairs_kept"], report["counts"]["skipped"]) == (7, 3, 4)
    assert report["first_rows"]["skipped"] == [2, 3, 5, 7]
    assert "skipped (bad rows)" in out


def test_row_numbers_name_the_line_when_blank_lines_differ(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", GOOD, {**GOOD, "chosen": None}])
    code, _, err = run_audit(capsys, tokenizer_dir, path)
    assert code == 2 and "row 3 (line 4): field 'chosen' is null" in err


def test_missing_column(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "chosen": "b", "answer": "c"}])
    code, _, err = run_audit(capsys, tokenizer_dir, path)
    assert code == 2 and "missing column rejected" in err and "prompt, chosen, answer" in err
    assert "Traceback" not in err


def test_invalid_utf8(tmp_path, capsys, tokenizer_dir):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    code, _, err = run_audit(capsys, tokenizer_dir, str(path))
    assert code == 2 and f"{path}, row 2: not valid UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize("name,content,expected", [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n\n", "the file is empty"),
    ("broken.json", '[{"prompt": "a",\n "chosen": }]', "not valid JSON at line 2"),
    ("ragged.csv", 'prompt,chosen,rejected\na,b,c\nd,e,f,g\n', "row 2: 4 fields, the header has 3"),
    ("short.csv", 'prompt,chosen,rejected\na,b,c\nd,e\n', "row 2: field 'rejected' is null"),
    ("data.txt", "hello", "unsupported file type '.txt'"),
])
def test_unreadable_files(name, content, expected, tmp_path, capsys, tokenizer_dir):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = run_audit(capsys, tokenizer_dir, str(path))
    assert code == 2 and str(path) in err and expected in err and "Traceback" not in err


def test_missing_path_and_unreachable_hub_name(tmp_path, capsys, tokenizer_dir):
    code, _, err = run_audit(capsys, tokenizer_dir, str(tmp_path / "nope.jsonl"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_audit(capsys, tokenizer_dir, "someone/some-preference-dataset")  # HF_HUB_OFFLINE=1 in conftest
    assert code == 2 and "neither a local file or directory nor loadable from the Hugging Face hub" in err
    assert "Traceback" not in err


def test_conversations_need_a_chat_template(tmp_path, capsys):
    tok_dir = tmp_path / "gpt2"
    gpt2_style().save_pretrained(tok_dir)
    path = write_jsonl(tmp_path / "data.jsonl", [CONV])
    code, _, err = run_audit(capsys, str(tok_dir), path)
    assert code == 2 and "no chat template" in err


def test_forced_format_that_does_not_fit(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [CONV])
    code, _, err = run_audit(capsys, tokenizer_dir, path, "--data_format", "standard")
    assert code == 2 and "row 1: field 'prompt' is a list, expected a string" in err


def test_audit_fail_on_stops_before_writing(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    out_dir = tmp_path / "out"
    code, _, err = run_audit(capsys, tokenizer_dir, path, "--output_dir", str(out_dir),
                             "--audit_fail_on", "duplicates,identical")
    assert code == 2 and "duplicates: 1 (rows 2)" in err and "identical: 1 (rows 3)" in err
    assert not out_dir.exists()
    code, _, err = run_audit(capsys, tokenizer_dir, path, "--audit_fail_on", "typos")
    assert code == 2 and "unknown check typos" in err


# ------------------------------------------------------------------------------------------ sources and splits
def _rows(n):
    return [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(n)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow", "save_to_disk", "directory"])
def test_every_source_kind_loads_the_same_rows(kind, tmp_path):
    rows = _rows(10)
    ds = Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        ds.to_json(path, lines=True)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        ds.to_csv(path, index=False)
    elif kind == "parquet":
        ds.to_parquet(path)
    elif kind == "arrow":
        ds.save_to_disk(tmp_path / "saved")
        shutil.copy(next((tmp_path / "saved").glob("*.arrow")), path)
    elif kind == "save_to_disk":
        DatasetDict(train=ds, test=Dataset.from_list(_rows(3))).save_to_disk(path)
    else:
        path.mkdir()
        ds.to_json(path / "train.jsonl", lines=True)
        Dataset.from_list(_rows(3)).to_json(path / "test.jsonl", lines=True)
    split = validate(load_split(str(path), "train"))
    assert split.dataset.remove_columns(["__row__", "__file__"]).to_list() == rows
    assert split.dataset["__row__"] == list(range(1, 11))
    if kind in ("save_to_disk", "directory"):
        assert len(load_split(str(path), "test").dataset) == 3


def test_slices_hold_out_an_eval_split(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", _rows(20))
    train, test = load_split(path, "train[:90%]"), load_split(path, "train[90%:]")
    assert train.dataset["__row__"] == list(range(1, 19)) and test.dataset["__row__"] == [19, 20]
    assert test.dataset["prompt"] == ["Question 18?", "Question 19?"]
    with pytest.raises(MissingSplit, match="split 'validation' is not in .* the splits are train"):
        load_split(path, "validation")


def test_skip_with_slices_counts_bad_rows_once(tmp_path):
    rows = _rows(10)
    rows[2], rows[8] = "{broken", "{broken"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    train, test = (load_split(path, s, on_bad_row="skip") for s in ("train[:50%]", "train[50%:]"))
    assert len(train.dataset) + len(test.dataset) == 8
    assert [r for _, r, _ in train.skipped] + [r for _, r, _ in test.skipped] == [3, 9]
    assert train.read + test.read == 10


def test_implicit_prompt_and_format_detection(tmp_path):
    implicit = [{"chosen": [msg("user", "Hi"), msg("assistant", "Hello!")],
                 "rejected": [msg("user", "Hi"), msg("assistant", "Go away.")]}]
    split = validate(load_split(write_jsonl(tmp_path / "a.jsonl", implicit), "train"))
    assert (split.fmt, split.implicit_prompt) == ("conversational", True)
    # a string prompt beside conversational completions is ignored and extracted from them, as TRL
    split = validate(load_split(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Hi", **implicit[0]}]), "train"))
    assert (split.fmt, split.implicit_prompt) == ("conversational", True)
    different = [{"chosen": [msg("user", "Hi")], "rejected": [msg("user", "Yo")]}]
    with pytest.raises(Exception, match="share no leading messages before their last, so there is no implicit prompt"):
        validate(load_split(write_jsonl(tmp_path / "c.jsonl", different), "train"))


def test_data_config_defaults_are_trls():
    cfg = DataConfig()
    assert (cfg.max_length, cfg.truncation_mode, cfg.dataset_train_split, cfg.dataset_test_split) == \
        (1024, "keep_start", "train", "test")


def test_rows_are_numbered_per_file_in_multi_file_splits(tmp_path, capsys, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train-00000-of-00002.jsonl", [GOOD, GOOD, GOOD])
    second = write_jsonl(data / "train-00001-of-00002.jsonl", [GOOD, {**GOOD, "chosen": None}])
    code, _, err = run_audit(capsys, tokenizer_dir, str(data))
    assert code == 2 and f"{second}, row 2: field 'chosen' is null" in err
    split = load_split(str(data), "train")
    assert list(zip(split.dataset["__file__"], split.dataset["__row__"])) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]


def test_train_plus_test_spec_keeps_each_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", _rows(3))
    test = write_jsonl(data / "test.jsonl", [GOOD, {**GOOD, "rejected": ""}])
    with pytest.raises(Exception, match=f"{test}, row 2: field 'rejected' is empty"):
        validate(load_split(str(data), "train+test"))


def test_skip_keeps_the_other_splits_and_files(tmp_path, capsys, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train-0.jsonl", [GOOD, GOOD])
    write_jsonl(data / "train-1.jsonl", [GOOD, "{bad", GOOD])
    write_jsonl(data / "test.jsonl", [GOOD])
    out_dir = tmp_path / "out"
    code, _, err = run_audit(capsys, tokenizer_dir, str(data), "--on_bad_row", "skip", "--output_dir", str(out_dir))
    assert code == 0, err
    reports = json.loads((out_dir / "data_audit.json").read_text())
    assert reports["train"]["records_read"] == 5 and reports["train"]["pairs_kept"] == 4
    assert reports["train"]["first_rows"]["skipped"] == ["train-1.jsonl:2"]
    assert reports["test"]["pairs_kept"] == 1


def test_lenient_reading_keeps_a_column_the_first_record_lacks(tmp_path):
    rows = [{"chosen": "a", "rejected": "b"}, GOOD, "{bad", GOOD]
    split = load_split(write_jsonl(tmp_path / "data.jsonl", rows), "train", on_bad_row="skip")
    split = validate(split, on_bad_row="skip")
    assert not split.implicit_prompt and split.dataset["prompt"] == [GOOD["prompt"]] * 2
    assert [(r, why.split(" (")[0]) for _, r, why in split.skipped] == [(3, "not valid JSON"),
                                                                        (1, "field 'prompt' is null; give it a value or remove the row")]


def test_a_bad_first_record_does_not_decide_the_format(tmp_path, capsys, tokenizer_dir):
    rows = [{**CONV, "chosen": None}, CONV, CONV, "{bad"]
    code, _, err = run_audit(capsys, tokenizer_dir, write_jsonl(tmp_path / "data.jsonl", rows))
    assert code == 2 and "row 1: field 'chosen' is null" in err and "1 more bad rows: rows 4" in err


def test_csv_rows_do_not_count_blank_lines(tmp_path, capsys, tokenizer_dir):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\n\nd,e,f\ng,h,i,j\n")
    code, _, err = run_audit(capsys, tokenizer_dir, str(path))
    assert code == 2 and "row 3: 4 fields" in err


def test_chat_template_errors_name_the_row(tmp_path, capsys):
    tok = llama3_style()
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir, )
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (tok_dir / "chat_template.jinja").write_text(template + tok.chat_template)
    config.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [CONV, {**CONV, "prompt": [msg("system", "Be brief."), msg("user", "Hi")]}]
    code, _, err = run_audit(capsys, str(tok_dir), write_jsonl(tmp_path / "data.jsonl", rows))
    assert code == 2 and "data.jsonl, row 2: the tokenizer's chat template failed" in err
    assert "System role not supported" in err and "Traceback" not in err


def test_test_split_may_be_longer_than_train(tmp_path, capsys, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [GOOD])
    write_jsonl(data / "test.jsonl", [{**GOOD, "prompt": "Tell me more. " * 30}])
    code, out, err = run_audit(capsys, tokenizer_dir, str(data))
    assert code == 0, err
    assert out.count("data audit:") == 2


def test_bos_count_ignores_eos_when_bos_is_eos(tmp_path, capsys):
    """GPT-2: BOS and EOS are the same token and the tokenizer adds none; the appended EOS is not a BOS."""
    tok_dir = tmp_path / "gpt2"
    gpt2_style().save_pretrained(tok_dir)
    out_dir = tmp_path / "out"
    code, _, err = run_audit(capsys, str(tok_dir), write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]),
                             "--output_dir", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "data_audit.json").read_text())["train"]
    assert report["bos_in_prompt"] == {"0": 4} and report["counts"]["missing_eos"] == 0
