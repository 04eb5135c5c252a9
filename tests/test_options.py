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
