"""The train options: TRL's names, YAML with command-line overrides, errors that suggest the closest option."""

import pytest

from dpo_jax import options
from dpo_jax.errors import UserError


def test_command_line_values_are_typed_and_reach_their_sections():
    o = options.parse(["--beta", "0.25", "--loss_type", "sigmoid,sft", "--loss_weights", "1,0.5",
                       "--max_length=512", "--bf16", "true", "--lora_target_modules", "q_proj,v_proj",
                       "--eval_steps", "none", "--seed", "7"])
    assert o.loss.beta == 0.25 and o.loss.loss_type == ("sigmoid", "sft") and o.loss.loss_weights == (1.0, 0.5)
    assert o.data.max_length == 512 and o.run.bf16 is True and o.run.eval_steps is None
    assert o.lora.lora_target_modules == ("q_proj", "v_proj")
    assert o.run.seed == 7 and o.data.seed == 7  # one name, every section that has it


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.3\nlearning_rate: 5.0e-7\nloss_type: [ipo]\nper_device_train_batch_size: 4\n")
    o = options.parse(["--config", str(path), "--beta", "0.5"])
    assert (o.loss.beta, o.optim.learning_rate, o.loss.loss_type, o.run.per_device_train_batch_size) == \
        (0.5, 5e-7, ("ipo",), 4)


@pytest.mark.parametrize("argv,message", [
    (["--learnig_rate", "1e-6"], "unknown option 'learnig_rate' in the command line. Did you mean learning_rate?"),
    (["--loss_type", "sigmod"], "option loss_type: unknown value 'sigmod'; did you mean sigmoid?"),
    (["--lr_scheduler_type", "cosin"], "did you mean cosine?"),
    (["--beta", "high"], "option beta: 'high' is not a valid float"),
    (["--max_steps", "2.5"], "option max_steps: '2.5' is not a valid int"),
    (["--bf16", "maybe"], "option bf16: 'maybe' is not a valid bool"),
    (["--beta"], "option --beta needs a value"),
    (["beta"], "unexpected argument 'beta'"),
])
def test_bad_options_suggest_the_closest(argv, message):
    with pytest.raises(UserError) as e:
        options.parse(argv)
    assert message in str(e.value)


def test_bad_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- beta\n- 0.1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        options.parse(["--config", str(path)])
    path.write_text("betta: 0.1\n")
    with pytest.raises(UserError, match=f"unknown option 'betta' in --config {path}. Did you mean beta"):
        options.parse(["--config", str(path)])


def test_option_table_lists_every_option_once():
    table = options.option_table()
    for name in options.FIELDS:
        assert table.count(f"| `{name}` |") == 1, name
    assert "| `beta` | loss | `0.1` |" in table and "| `learning_rate` | optim | `1e-06` |" in table


def test_readme_option_table_is_generated_from_the_dataclasses():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("option_table", root / "scripts" / "option_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (root / "README.md").read_text()
    assert module.with_table(readme) == readme, "README's option table is stale: python scripts/option_table.py --write"
    assert all(row.count("|") == 5 and not row.endswith("|  |") for row in options.option_table().splitlines()), \
        "every option needs a meaning (the comment on its field's line)"


def test_yaml_and_command_line_are_checked_together(tmp_path):
    """Options that must agree (loss_type and loss_weights; exo_pair and label_smoothing) may come from both."""
    run = tmp_path / "run.yaml"
    run.write_text("loss_type: [sigmoid, sft]\nlabel_smoothing: 0.001\n")
    o = options.parse(["--config", str(run), "--loss_weights", "1,0.5"])
    assert o.loss.loss_type == ("sigmoid", "sft") and o.loss.loss_weights == (1.0, 0.5)
    assert options.parse(["--config", str(run), "--loss_type", "exo_pair"]).loss.label_smoothing == 0.001
    with pytest.raises(UserError, match="2 weights for 1"):
        options.parse(["--loss_weights", "1,0.5"])


def test_run_options_are_checked():
    for bad in (["--logging_steps", "0"], ["--per_device_train_batch_size", "0"], ["--save_total_limit", "0"],
                ["--num_train_epochs", "0"]):
        with pytest.raises(UserError, match="must be"):
            options.parse(bad)
    assert options.parse(["--num_train_epochs", "0", "--max_steps", "5"]).run.max_steps == 5


def test_keep_end_falls_back_to_the_pairs_layout(caplog):
    """Prefix sharing needs both prompts cut alike (keep_start); keep_end gets chosen and rejected rows of their
    own, with a warning, instead of an error for the default layout."""
    from dpo_jax.trainer import with_layout

    assert with_layout(options.parse([])).run.pack_pairs == "packed"
    o = with_layout(options.parse(["--truncation_mode", "keep_end"]))
    assert o.run.pack_pairs == "pairs" and "keep_end" in caplog.text


# (option, bad value, the range the message gives, other options needed). Every int and float option is here
# (test_every_numeric_option_is_range_checked), so a new one needs its range decided.
BAD_NUMBERS = [
    ("per_device_train_batch_size", "0", "at least 1", ()),
    ("per_device_eval_batch_size", "-1", "at least 1", ()),
    ("gradient_accumulation_steps", "0", "at least 1", ()),
    ("logging_steps", "0", "at least 1", ()),
    ("save_steps", "0", "at least 1", ()),
    ("eval_steps", "0", "at least 1", ()),
    ("save_total_limit", "0", "at least 1", ()),
    ("max_nonfinite_steps", "0", "at least 1", ()),
    ("num_processes", "0", "at least 1", ()),
    ("process_id", "-1", "at least 0", ()),
    ("process_id", "2", "in [0, 1]", ("--num_processes", "2")),
    ("max_steps", "0", "at least 1 or -1", ()),
    ("max_steps", "-2", "at least 1 or -1", ()),
    ("num_train_epochs", "inf", "at least 0 (a finite number)", ()),
    ("num_train_epochs", "nan", "at least 0 (a finite number)", ("--max_steps", "5")),
    ("num_train_epochs", "0", "above 0 (or give max_steps)", ()),
    ("memory_limit_gb", "0", "above 0 (a finite number)", ()),
    ("memory_limit_gb", "inf", "above 0 (a finite number)", ()),
    ("seed", "-1", "in [0, 4294967295]", ()),
    ("seed", str(2**32), "in [0, 4294967295]", ()),
    ("max_length", "0", "at least 1", ()),
    ("max_prompt_length", "0", "at least 1", ()),
    ("max_completion_length", "-5", "at least 1", ()),
    ("pad_to_multiple_of", "0", "at least 1", ()),
    ("num_length_buckets", "0", "at least 1", ()),
    ("dataset_num_proc", "0", "at least 1", ()),
    ("beta", "0", "above 0 (a finite number)", ()),
    ("beta", "-1", "above 0 (a finite number)", ()),
    ("beta", "nan", "above 0 (a finite number)", ()),
    ("beta", "inf", "above 0 (a finite number)", ()),
    ("label_smoothing", "0.5", "in [0, 0.5)", ()),
    ("label_smoothing", "-0.1", "in [0, 0.5)", ()),
    ("label_smoothing", "nan", "in [0, 0.5)", ()),
    ("label_smoothing", "0.7", "in [0, 0.5)", ("--loss_type", "exo_pair,sigmoid")),
    ("discopop_tau", "0", "above 0 (a finite number)", ()),
    ("simpo_gamma", "-1", "at least 0 (a finite number)", ()),
    ("simpo_gamma", "inf", "at least 0 (a finite number)", ()),
    ("rpo_alpha", "-1", "at least 0 (a finite number)", ()),
    ("rpo_alpha", "nan", "at least 0 (a finite number)", ()),
    ("loss_weights", "1,-1", "at least 0 (a finite number)", ("--loss_type", "sigmoid,sft")),
    ("loss_weights", "1,inf", "at least 0 (a finite number)", ("--loss_type", "sigmoid,sft")),
    ("learning_rate", "-1e-6", "at least 0 (a finite number)", ()),
    ("learning_rate", "nan", "at least 0 (a finite number)", ()),
    ("learning_rate", "inf", "at least 0 (a finite number)", ()),
    ("warmup_steps", "-1", "at least 0", ()),
    ("warmup_ratio", "-0.1", "in [0, 1]", ()),
    ("warmup_ratio", "1.5", "in [0, 1]", ()),
    ("weight_decay", "-0.01", "at least 0 (a finite number)", ()),
    ("weight_decay", "inf", "at least 0 (a finite number)", ()),
    ("adam_beta1", "1", "in [0, 1)", ()),
    ("adam_beta1", "-0.1", "in [0, 1)", ()),
    ("adam_beta2", "1.0", "in [0, 1)", ()),
    ("adam_epsilon", "0", "above 0 (a finite number)", ()),
    ("adam_epsilon", "inf", "above 0 (a finite number)", ()),
    ("max_grad_norm", "-1", "at least 0 (a finite number)", ()),
    ("max_grad_norm", "nan", "at least 0 (a finite number)", ()),
    ("lora_r", "0", "at least 1", ()),
    ("lora_alpha", "0", "above 0", ()),
    ("lora_dropout", "1", "in [0, 1)", ()),
    ("lora_dropout", "-0.1", "in [0, 1)", ()),
]


@pytest.mark.parametrize("name,value,expected,extra", BAD_NUMBERS)
def test_numbers_outside_their_range_exit_2_before_anything_loads(name, value, expected, extra, tmp_path, capsys):
    """Through the real command line, with a model that does not exist: the option's error comes first."""
    from dpo_jax.cli import main

    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "out"),
            *extra, f"--{name}", value]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert f"option {name} must be {expected}" in err and "Traceback" not in err, err
    assert "no_model" not in err and not (tmp_path / "out").exists()
    assert main(["evaluate", *argv]) == 2  # evaluate takes the train options too
    assert f"option {name} must be {expected}" in capsys.readouterr().err


def test_every_numeric_option_is_range_checked():
    import typing

    def numeric(kind) -> bool:  # int, float, their optional forms, and tuples of floats (loss_weights)
        return bool({int, float} & set(typing.get_args(kind) or (kind,))) or "float" in str(kind)

    names = {name for name, owners in options.FIELDS.items() for s, f in owners if numeric(options._type(s, f))}
    assert len(names) > 30 and names - {name for name, *_ in BAD_NUMBERS} == set()


def test_yaml_numbers_are_checked_too(tmp_path, capsys):
    from dpo_jax.cli import main

    for text, message in (("beta: -1\n", "option beta must be above 0 (a finite number), not -1"),
                          ("learning_rate: .nan\n", "option learning_rate must be at least 0 (a finite number), not nan"),
                          ("warmup_ratio: 2\n", "option warmup_ratio must be in [0, 1], not 2"),
                          ("max_steps: .inf\n", "option max_steps: inf is not a valid int")):
        run = tmp_path / "run.yaml"
        run.write_text(text)
        assert main(["train", "--config", str(run), "--model_name_or_path", str(tmp_path / "none"),
                     "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [
    ["--beta", "1e-12"], ["--label_smoothing", "0"], ["--label_smoothing", "0.499"], ["--warmup_ratio", "1"],
    ["--warmup_ratio", "0"], ["--learning_rate", "0"], ["--max_grad_norm", "0"], ["--max_grad_norm", "none"],
    ["--seed", "0"], ["--seed", str(2**32 - 1)], ["--adam_beta1", "0"], ["--lora_dropout", "0"],
    ["--max_steps", "-1"], ["--num_train_epochs", "0", "--max_steps", "5"], ["--num_train_epochs", "0.5"],
    ["--loss_type", "exo_pair", "--label_smoothing", "0.7"], ["--loss_weights", "0,1", "--loss_type", "sigmoid,sft"],
    ["--loss_weights", "0", "--rpo_alpha", "1"], ["--process_id", "1", "--num_processes", "2"],
    ["--simpo_gamma", "0"], ["--rpo_alpha", "0"], ["--weight_decay", "0"],
])
def test_edge_values_inside_the_range_are_accepted(argv):
    options.parse(argv)


def test_all_weights_zero_is_refused():
    with pytest.raises(UserError, match="all 2 weights are 0, so nothing would be trained"):
        options.parse(["--loss_type", "sigmoid,sft", "--loss_weights", "0,0"])


@pytest.mark.parametrize("name,value,expected", [
    ("max_new_tokens", "0", "at least 1"), ("temperature", "-1", "at least 0 (a finite number)"),
    ("temperature", "inf", "at least 0 (a finite number)"), ("temperature", "nan", "at least 0 (a finite number)"),
    ("top_p", "0", "in (0, 1]"), ("top_p", "1.5", "in (0, 1]"), ("top_p", "nan", "in (0, 1]"),
    ("seed", "-1", "in [0, 4294967295]"),
])
def test_generate_numbers_exit_2_before_the_model_loads(name, value, expected, tmp_path, capsys):
    from dpo_jax.cli import main

    assert main(["generate", "--model_name_or_path", str(tmp_path / "no_model"), "--prompt", "hi",
                 f"--{name}", value]) == 2
    err = capsys.readouterr().err
    assert f"option {name} must be {expected}" in err and "no_model" not in err, err


def test_audit_and_bench_numbers(tmp_path, capsys):
    from dpo_jax.cli import main

    assert main(["audit", "--model_name_or_path", str(tmp_path / "no_model"), "--num_length_buckets", "0"]) == 2
    assert "option num_length_buckets must be at least 1, not 0" in capsys.readouterr().err
    for flag, low in (("--bench_epochs", 1), ("--bench_steps", 2)):  # the first step compiles: never timed
        with pytest.raises(SystemExit) as e:
            main(["bench", flag, "0"])
        assert e.value.code == 2 and f"argument {flag}: must be at least {low}, not 0" in capsys.readouterr().err
