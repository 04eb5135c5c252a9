"""Training parity with TRL: a few full-batch DPO steps of TRL's DPOTrainer (1.16) and of dpo-jax's `Trainer` on
the same tiny Llama, the same pairs and the same settings log the same loss, grad_norm, rewards, logps and logits
at every step, for several of TRL's loss types and with LoRA (PEFT on TRL's side).

Full batch (all pairs in one step), so the order of the pairs does not matter; float32, a constant learning rate,
AdamW with weight decay, clipping at max_grad_norm 1.0; no dropout, no gradient checkpointing on either side. Both
sides log the loss and metrics of the parameters before the step's update, and grad_norm before clipping, so the
three steps compare like for like. TRL runs in this process (torch and JAX coexist); our side runs on the 8
simulated devices, one pair per device.
"""

import json

import numpy as np
import pytest
import torch

from dpo_jax import options
from dpo_jax.trainer import Trainer
from tiny_models import CONFIGS
from tiny_tokenizers import llama3_style

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": " The capital of France is Paris.", "rejected": " Lyon."},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": "Hello wor", "chosen": "ld!", "rejected": "ld? I can't help with that."},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " is quick."},
    {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " Five."},
    {"prompt": "Where does water boil at 100 degrees?", "chosen": " At sea level.", "rejected": " On the moon."},
    {"prompt": "Great question!", "chosen": " I hope this helps.", "rejected": " Let me know if you have any."},
    {"prompt": "Sure, here is", "chosen": " a short answer.", "rejected": " the capital of France, Paris."},
]
STEPS = 3
# Shared by both sides (TRL's names). Weight decay is large so that its masking (matrices only, not biases and
# norms, which this model has) shows: decaying the norms and biases too moves step 2's rewards by 1.6e-3 relative,
# 16 times RTOL (0.1 would move them by about the tolerance itself).
SETTINGS = {"learning_rate": 3e-4, "lr_scheduler_type": "constant", "weight_decay": 1.0, "max_grad_norm": 1.0,
            "beta": 0.1, "label_smoothing": 0.0, "max_length": 64, "seed": 42}
# case -> its loss (and settings that differ). Chosen so that grad_norm exceeds max_grad_norm in some step (so
# the clipping is compared; asserted) and the rewards grow far past float32 rounding of the log-probs.
CASES = {
    "sigmoid": {"loss_type": ["sigmoid"]},
    "ipo": {"loss_type": ["ipo"]},  # length-averaged: TRL's completion_mask.sum
    # TRL's MPO example: several losses weighted, sft averaged over the batch's chosen tokens, not its pairs
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    # every other loss type TRL has, in one run to keep the suite fast (each term changes the loss and the
    # gradients); sppo_hard's term is ~50 at the start, so it is weighted down to the others' size; label_smoothing
    # enters robust, exo_pair, aot and aot_unpaired
    "the_others": {"loss_type": ["robust", "hinge", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard",
                                 "discopop", "sigmoid_norm", "aot", "aot_unpaired"],
                   "loss_weights": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.02, 1.0, 1.0, 1.0, 1.0], "label_smoothing": 0.1},
}
# LoRA moves the model more slowly: a larger learning rate and beta, so that rewards leave rounding noise and
# grad_norm passes 1.0
LORA = {"loss_type": ["sigmoid"], "learning_rate": 3e-3, "beta": 0.5, "lora_r": 4, "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"]}
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
RTOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("llama_trl"))


def save_checkpoint(path):
    """The tiny Llama of tests/tiny_models.py (biases, norms, Llama 3 RoPE; every weight random, as make_model)
    with the vocabulary of a small Llama 3 style tokenizer, saved with it as a Hugging Face directory; the pairs
    as JSONL beside it."""
    import transformers

    tokenizer = llama3_style()
    config = CONFIGS["llama"]()
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path, data


def trl_history(path, data, out, case: dict, lora_a: dict | None = None) -> list[dict]:
    """TRL's logged metrics, one dict per step. With LoRA in `case`, PEFT's adapters start with A = `lora_a`
    (module name -> lora_A.weight [r, in])."""
    import transformers
    from datasets import load_dataset
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from trl import DPOConfig, DPOTrainer

    s = {**SETTINGS, **case}
    lora = {k: s.pop(k) for k in ("lora_r", "lora_alpha", "lora_target_modules") if k in s}
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=len(PAIRS), max_steps=STEPS, warmup_steps=0,
                     bf16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, disable_tqdm=True, **s)
    peft_config = lora and LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                                      target_modules=lora["lora_target_modules"], task_type="CAUSAL_LM")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, processing_class=transformers.AutoTokenizer.from_pretrained(path),
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         peft_config=peft_config or None)
    if lora:  # before train(), which builds the optimizer
        adapters = {name[name.index("layers."):]: m for name, m in trainer.model.named_modules()
                    if isinstance(m, LoraLayer)}
        assert sorted(adapters) == sorted(lora_a)
        with torch.no_grad():
            for name, module in adapters.items():
                assert not module.lora_B["default"].weight.any()  # B starts at 0 on both sides
                module.lora_A["default"].weight.copy_(torch.from_numpy(lora_a[name]))
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def our_trainer(path, data, out, case: dict) -> Trainer:
    args = ["--model_name_or_path", str(path), "--output_dir", str(out), "--dataset_name", str(data),
            "--per_device_train_batch_size", "1", "--mesh", "fsdp=-1", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--bf16", "false",
            "--gradient_checkpointing", "false"]
    if "lora_r" in case:
        args += ["--use_peft", "true", "--lora_dropout", "0"]
    for name, value in {**SETTINGS, **case}.items():
        args += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return Trainer(options.parse(args))


def our_history(trainer: Trainer) -> list[dict]:
    trainer.train()
    rows = [json.loads(line) for line in open(trainer.out / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def assert_same_history(ours: list[dict], theirs: list[dict], case: dict):
    """Every metric of every step within RTOL of TRL's (the failure message shows them all), except at step 1 the
    rewards, 0 in exact arithmetic, and their accuracy: see below."""
    beta = case.get("beta", SETTINGS["beta"])
    # Step 1: the policy equals the reference. TRL's two forward passes run the same kernels, so its rewards are
    # exactly 0 and its accuracy (strict >) is 0. Ours are two different XLA programs (the policy's forward is
    # fused with its backward), which round differently: a pair's reward beta * (pi - ref) can be beta times an
    # ulp or two of its log-prob (|log-prob| < 128 here: ulp <= 2^-16), and then counts as a win or a loss.
    step1_atol = beta * 4 * np.spacing(np.float32(128))
    assert max(abs(theirs[0]["logps/chosen"]), abs(theirs[0]["logps/rejected"])) < 128
    table, bad = [], []
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for key in METRICS:
            error = abs(a[key] - b[key]) / abs(b[key]) if b[key] else abs(a[key])
            table.append(f"step {step} {key:20} ours {a[key]: .8g}  trl {b[key]: .8g}  rel {error:.1e}")
            if step == 1 and key in REWARDS:
                assert b[key] == 0.0
                ok = abs(a[key]) <= step1_atol
            elif step == 1 and key == "rewards/accuracies":
                assert b[key] == 0.0
                ok = True  # the fraction of pairs whose rounding noise came out positive
            else:
                ok = np.isclose(a[key], b[key], rtol=RTOL, atol=0)
            if not ok:
                bad.append(table[-1])
    assert not bad, "\n".join(["not within 1e-4 of TRL:", *bad, "all:", *table])
    assert max(b["grad_norm"] for b in theirs) > SETTINGS["max_grad_norm"], "clipping was never active"
    assert min(abs(b["rewards/margins"]) for b in theirs[1:]) > 1e3 * step1_atol, "rewards too close to rounding"


@pytest.mark.parametrize("name", CASES)
def test_steps_equal_trl(name, checkpoint, tmp_path):
    path, data = checkpoint
    theirs = trl_history(path, data, tmp_path / "trl", CASES[name])
    ours = our_history(our_trainer(path, data, tmp_path / "ours", CASES[name]))
    assert_same_history(ours, theirs, CASES[name])


def initial_lora_a(trainer: Trainer) -> dict:
    """Our adapters' initial A (random, as PEFT's; B is 0) as PEFT holds them: module name from `layers.` on ->
    lora_A.weight [r, in] (ours is [in, r])."""
    out = {}
    for name, adapter in trainer.state.params["layers"]["self_attn"].items():  # stacked: [L, in, r]
        for i, a in enumerate(np.asarray(adapter["lora_a"].get_value())):
            out[f"layers.{i}.self_attn.{name}"] = a.T.copy()
    return out


def test_lora_steps_equal_trl_with_peft(checkpoint, tmp_path):
    """LoRA r 4 on q_proj and v_proj against PEFT's LoraConfig. Both sides draw A at random (from different
    generators), so TRL's adapters are set to start from ours; the rest (B = 0, scale alpha / r, the reference
    being the base model, AdamW on the adapters only) is each side's own."""
    path, data = checkpoint
    ours_trainer = our_trainer(path, data, tmp_path / "ours", LORA)
    lora_a = initial_lora_a(ours_trainer)  # before training, which donates the state
    ours = our_history(ours_trainer)
    theirs = trl_history(path, data, tmp_path / "trl", LORA, lora_a)
    assert_same_history(ours, theirs, LORA)
