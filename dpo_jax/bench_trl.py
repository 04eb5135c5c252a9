"""TRL's side of `dpo-jax bench --vs trl`: train with TRL's DPOTrainer and measure it as dpo_jax/bench.py
measures dpo-jax (same epochs, same figures). Run as a script, in its own process, so that neither JAX nor
dpo-jax is imported and the peak memory is TRL's own:

    python dpo_jax/bench_trl.py '{"model": DIR, "data": FILE.jsonl, "options": {...}, "epochs": 2, ...}'

Needs torch and trl (benchmark-only dependencies, never dpo-jax's).
"""

import json
import resource
import statistics
import sys
import time

RESULT = "DPO_JAX_BENCH_RESULT "


def torch_matmul_peak(n: int = 4096, repeats: int = 7) -> float:
    import torch

    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(spec: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    peak = torch_matmul_peak()
    started = time.perf_counter()
    options = dict(spec["options"])
    if isinstance(options.get("loss_type"), str):
        options["loss_type"] = [options["loss_type"]]
    config = DPOConfig(output_dir=spec["output_dir"], num_train_epochs=spec["epochs"], bf16=False,
                       gradient_checkpointing=spec["gradient_checkpointing"], report_to="none", save_strategy="no",
                       logging_steps=1_000_000, eval_strategy="no", disable_tqdm=True, **options)
    trust = bool(spec.get("trust_remote_code", False))  # explicit: with None transformers asks on stdin
    hf = AutoConfig.from_pretrained(spec["model"], trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=trust)
    train = datasets.load_dataset("json", data_files=spec["data"], split="train")

    # Useful FLOPs as dpo_jax/bench.py counts them: per real token 2P + 4 L A (p + 1), times 3 (policy forward
    # and backward) plus 1 for a live reference.
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = any(head is m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding))
    matmul = total - embeddings + (head.numel() if tied else 0)
    width = hf.num_attention_heads * (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    passes = 3 + (not spec["options"].get("precompute_ref_log_probs"))
    timings = {}
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        start = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        timings["precompute"] = timings.get("precompute", 0.0) + time.perf_counter() - start
        return out
    DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    steps, current = [], {}
    compute_loss = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):  # the collated batch: real tokens and their positions
        mask = inputs["attention_mask"].bool()
        positions = (mask.long().cumsum(-1) - 1)[mask].double()
        current["tokens"] = current.get("tokens", 0) + int(mask.sum())
        current["pairs"] = current.get("pairs", 0) + mask.shape[0] // 2
        current["flops"] = current.get("flops", 0.0) + passes * float(
            (2 * matmul + 4 * hf.num_hidden_layers * width * (positions + 1)).sum())
        return compute_loss(model, inputs, *args, **kwargs)
    trainer.compute_loss = counting_loss

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "epoch": int(state.epoch - 1e-9) if state.epoch else 0,
                          "seconds": time.perf_counter() - current["start"], "pairs": current["pairs"],
                          "tokens": current["tokens"], "flops": current["flops"], "compiles": 0,
                          "end": time.perf_counter() - started})
    trainer.add_callback(Clock())
    trainer.train()
    return {"side": "trl", "matmul_peak_gflops": peak, "precompute_seconds": timings.get("precompute"),
            "wall_seconds": time.perf_counter() - started, "first_step_seconds": steps[0]["end"] if steps else None,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gradient_checkpointing": spec["gradient_checkpointing"], "steps": steps}


if __name__ == "__main__":
    print(RESULT + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
