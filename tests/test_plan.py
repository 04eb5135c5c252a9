"""`dpo-jax plan`: the train step compiled for TPU topologies by libtpu's compiler from config.json alone, its
figures against independent arithmetic, the loop-weighted FLOPs against unrolled programs, and its errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import hlo, options, plan
from dpo_jax.cli import main
from dpo_jax.hf import load_config
from dpo_jax.models import family
from dpo_jax.sharding import logical_to_spec, make_mesh

pytest.importorskip("libtpu", reason="the TPU compiler: pip install -e '.[plan]'")


def config_dir(path, hidden, layers, vocab=1024, heads=4, kv_heads=2, intermediate=None):
    """A model directory holding only config.json (head_dim 128: every weight's shard is whole TPU tiles)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate or 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}))
    return str(path)


def tpu_bytes(shape, itemsize=4) -> int:
    """Bytes of a 32-bit array in TPU memory: stored in tiles of 8 x 128 over its two minor dimensions (of 1, 2
    or 4 x 128 when the second is that small), a 1-D array or a scalar in tiles of 128. (bfloat16 matrices: tiles
    of 16 x 128; every one here has a multiple of 16 rows.)"""
    shape = tuple(shape) or (1,)
    *major, minor = shape
    if major:
        rows = major[-1]
        major[-1] = -(-rows // 8) * 8 if rows >= 8 else 1 << (rows - 1).bit_length()
    return int(np.prod(major, dtype=np.int64)) * (-(-minor // 128) * 128) * itemsize


def param_shapes(model_dir, mesh, lora_rank=None):
    """(per-chip shard shape of every parameter, of every LoRA adapter), from the model's logical axes."""
    config = load_config(model_dir)
    model = nnx.eval_shape(lambda: family("llama").Model(config, rngs=nnx.Rngs(0)))
    params, adapters = [], []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(variable.get_value().shape)
        axes = variable.get_metadata().get("out_sharding")
        spec = logical_to_spec(tuple(axes), shape, mesh)
        params.append(tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(shape, spec)))
        layers = shape[:1] if axes[0] == "layers" else ()  # a stacked block's weight: [layers, ...]
        layer_axes, shape, axes = axes[:len(layers)], shape[len(layers):], axes[len(layers):]
        if lora_rank and path[-2] in ("q_proj", "v_proj"):  # PEFT's default targets: A [in, r], B [r, out]
            for a_or_b, dims, names in (("a", (*layers, shape[0], lora_rank), (*layer_axes, axes[0], None)),
                                        ("b", (*layers, lora_rank, shape[1]), (*layer_axes, None, axes[1]))):
                s = logical_to_spec(names, dims, mesh)
                adapters.append(tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(dims, s)))
    return params, adapters


def frozen_itemsize(shape, layers: int = 1) -> int:
    """Bytes per element of a frozen weight as the trainer holds it: matrices in bfloat16 (the compute dtype),
    vectors in float32; a stacked block's weight ([layers, ...], its leading axis `layers` long) is a matrix when
    one layer's is. (The embedding and head are never stacked; none of the tests' widths equals `layers`.)"""
    per_layer = len(shape) - (1 if len(shape) >= 2 and shape[0] == layers else 0)
    return 2 if per_layer >= 2 else 4


def held_frozen(shapes, layers: int = 1) -> int:
    """TPU bytes of frozen weights as the trainer holds them (`frozen_itemsize`)."""
    return sum(tpu_bytes(s, frozen_itemsize(s, layers)) for s in shapes)


def scalars_of_the_optimizer(o):
    from dpo_jax import step as S

    tx = S.make_optimizer(o.optim, 10)
    return sum(1 for x in jax.tree.leaves(jax.eval_shape(tx.init, {"w": jnp.zeros((2, 2))})) if x.ndim == 0)


def test_full_fine_tune_on_v5e(tmp_path, capsys):
    """4 v5e chips, fsdp=4: XLA's argument bytes per chip are the parameters and both AdamW moments (float32),
    the reference (its matrices in bfloat16), each split 4 ways on its model-width side, and the batch, counted
    here in TPU tiles; the FLOPs count the scan over the 2 decoder blocks twice; the JSON has the figures."""
    model = config_dir(tmp_path / "m", hidden=512, layers=2)
    o = options.parse(["--model_name_or_path", model, "--max_length", "128", "--per_device_train_batch_size", "8",
                       "--pack_pairs", "shared_prefix", "--gradient_checkpointing", "true",
                       # eager: splash (auto's choice on a TPU) adds its block tables, a few KiB, to the
                       # arguments, and blockwise's loops have trip counts XLA's FLOP count cannot know
                       "--attn_implementation", "eager"])
    figures = plan.plan(o, "v5e:2x2")
    out = capsys.readouterr().out
    assert "4 chips (TPU v5 lite)" in out and "fits:" in out and "compile time" in out
    mesh = make_mesh(fsdp=4, devices=plan.tpu_devices("v5e:2x2")[0])
    params, _ = param_shapes(model, mesh)
    weights = sum(tpu_bytes(s) for s in params)
    scalars = 3 + scalars_of_the_optimizer(o)  # step, nonfinite_run, nonfinite_total and the optimizer's counts
    pairs, row = 8, 256  # a row per pair per chip; prompt, chosen and rejected in 2 x max_length
    batch = 5 * tpu_bytes((pairs, row)) + tpu_bytes((pairs,))  # input_ids, position_ids, segment, branch, source; pair_mask
    assert figures["argument"] == 3 * weights + held_frozen(params, layers=2) + scalars * tpu_bytes(()) + batch
    assert figures["chips"] == 4 and figures["topology"] == "v5e:2x2" and figures["hbm"] == 16 * 2**30
    assert figures["fits"] is True and figures["total"] == figures["argument"] + figures["output"] \
        - figures["alias"] + figures["temp"]
    assert 2 in figures["loop_trip_counts"] and figures["flops"] > 1.5 * figures["flops_loops_once"]
    path = tmp_path / "plan.json"
    plan.write_json(figures, str(path))
    written = json.loads(path.read_text())
    for key in ("argument", "temp", "total", "hbm", "fits", "chips", "topology", "flops", "collective_bytes",
                "compile_seconds"):
        assert key in written
    assert set(written["collective_bytes"]) == set(hlo.COLLECTIVES) and written["collective_bytes"]["all-gather"] > 0


def test_lora_on_v5p(tmp_path, capsys):
    """8 v5p chips, LoRA: the arguments are the adapters and their moments, the frozen base (the reference), the
    dropout keys and the batch; no second copy of the model."""
    model = config_dir(tmp_path / "m", hidden=1024, layers=1, heads=8, kv_heads=2)
    o = options.parse(["--model_name_or_path", model, "--max_length", "128", "--per_device_train_batch_size", "1",
                       "--pack_pairs", "pairs", "--use_peft", "true", "--lora_r", "128", "--gradient_checkpointing",
                       "false", "--attn_implementation", "eager"])  # see test_full_fine_tune_on_v5e
    figures = plan.plan(o, "v5p-16")
    assert "8 chips (TPU v5)" in capsys.readouterr().out
    mesh = make_mesh(fsdp=8, devices=plan.tpu_devices("v5p:2x2x2")[0])
    params, adapters = param_shapes(model, mesh, lora_rank=128)
    keys = len(adapters) // 2  # one dropout key per layer (uint32 [layers, 2], replicated) per adapted linear
    scalars = 3 + scalars_of_the_optimizer(o)
    batch = 5 * tpu_bytes((2, 128)) + tpu_bytes((1,))  # a pair's two rows: ids, positions, segment, branch, source
    expected = 3 * sum(tpu_bytes(s) for s in adapters) + held_frozen(params) \
        + keys * tpu_bytes((1, 2)) + scalars * tpu_bytes(()) + batch
    assert figures["argument"] == expected
    assert figures["arguments"]["parameters"] == sum(4 * int(np.prod(s)) for s in adapters)  # the adapters alone
    assert figures["arguments"]["reference"] == sum(frozen_itemsize(s) * int(np.prod(s)) for s in params) \
        + keys * 8  # the base, once (matrices in bfloat16, a stack of norm scales in float32), the dropout keys
    assert figures["chips"] == 8 and figures["topology"] == "v5p:2x2x2" and figures["fits"] is True


def test_qlora_on_v5p_counts_the_codes_at_their_size(tmp_path, capsys):
    """QLoRA (nf4 base): the plan's reference is the LoRA base less, for every linear kernel but the head, its
    bfloat16 bytes plus its codes at half a byte (XLA:TPU packs 4-bit arrays) and a float32 scale per 64
    weights; XLA's own argument bytes fall by that much."""
    model = config_dir(tmp_path / "m", hidden=1024, layers=1, heads=8, kv_heads=2)
    common = ["--model_name_or_path", model, "--max_length", "128", "--per_device_train_batch_size", "1",
              "--pack_pairs", "pairs", "--use_peft", "true", "--gradient_checkpointing", "false",
              "--attn_implementation", "eager"]
    lora = plan.plan(options.parse(common), "v5p-16")
    qlora = plan.plan(options.parse(common + ["--load_in_4bit", "true"]), "v5p-16")
    assert "QLoRA base nf4 (4.50 bits/weight)" in capsys.readouterr().out and qlora["frozen_quantization"] == "nf4"
    mesh = make_mesh(fsdp=8, devices=plan.tpu_devices("v5p:2x2x2")[0])
    params, _ = param_shapes(model, mesh)
    config = load_config(model)
    kernels = [s for s in params if len(s) == 3]  # the stacked blocks' seven linear kernels [1, in, out]
    assert len(kernels) == 7 and config.num_layers == 1
    weights = sum(int(np.prod(s)) for s in kernels)
    saved = 2 * weights - (weights // 2 + 4 * weights // 64)
    assert lora["arguments"]["reference"] - qlora["arguments"]["reference"] == saved
    assert lora["argument"] - qlora["argument"] == pytest.approx(saved, rel=0.02)  # XLA's figure (tile padding)


def test_a_step_that_does_not_fit(tmp_path, capsys):
    """The compiler refuses a step above a v5e chip's 16 GiB (eager attention's scores of 64 rows of 4096 tokens,
    no remat): plan says so with XLA's largest buffers and what to change, and exits 1."""
    model = config_dir(tmp_path / "m", hidden=512, layers=1)
    status = main(["plan", "--model_name_or_path", model, "--topology", "v5litepod-4", "--max_length", "4096",
                   "--per_device_train_batch_size", "32", "--pack_pairs", "pairs", "--gradient_checkpointing",
                   "false", "--attn_implementation", "eager", "--output_json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert status == 1 and "DOES NOT FIT" in out
    assert "--gradient_checkpointing true" in out and "--use_peft true" in out
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["fits"] is False and written["hbm"] == 16 * 2**30 and written["argument"] > 0
    assert "hbm" in written["largest_buffers"].lower() or "memory" in written["largest_buffers"].lower()


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-32", "v5p:2x2x4", 16), ("v5p-128", "v5p:4x4x4", 64),
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v5litepod-1", "v5e:1x1", 1), ("v5litepod-8", "v5e:2x4", 8),
    ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8), ("v6e-256", "v6e:16x16", 256),
    ("v5e:2x4", "v5e:2x4", 8), ("v5p:4x4x2", "v5p:4x4x2", 32),
])
def test_accelerator_types_count_chips(name, libtpu_name, chips):
    """v4 and v5p accelerator types count TensorCores, two per chip; v5e and v6e count chips. libtpu agrees on
    the chips: one device per chip (v4's two cores as one, as JAX on a v4 VM)."""
    assert plan.topology_name(name) == libtpu_name
    devices, found = plan.tpu_devices(name)
    assert found == libtpu_name and len(devices) == chips
    if "-" in name and not name.startswith("v5litepod"):
        assert plan.accelerator_type(libtpu_name) == name


@pytest.mark.parametrize("name", ["v5p-12", "v5p-7", "v9-8", "v5e-2x2", "tpu", "v5e:3x3"])
def test_a_bad_topology_exits_2(name, tmp_path, capsys):
    model = config_dir(tmp_path / "m", hidden=128, layers=1)
    assert main(["plan", "--model_name_or_path", model, "--topology", name]) == 2
    err = capsys.readouterr().err
    assert "--topology" in err and "Traceback" not in err


def test_without_libtpu_it_says_how_to_install_it(tmp_path):
    """In a Python where libtpu cannot be imported (None in sys.modules is how Python marks a module absent),
    `plan --topology` names the extra to install and exits 2, without a traceback or libtpu's noise."""
    model = config_dir(tmp_path / "m", hidden=128, layers=1)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["libtpu"] = None
        from dpo_jax.cli import main
        sys.exit(main(["plan", "--model_name_or_path", {model!r}, "--topology", "v5p-8"]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert 'pip install "dpo-jax[plan]"' in result.stderr and "Traceback" not in result.stderr
    assert "TPU_ACCELERATOR_TYPE" not in result.stderr


def test_the_cli_silences_libtpu(tmp_path):
    """On a machine that is not a TPU VM, libtpu warns that it cannot find TPU_ACCELERATOR_TYPE and the worker
    hostnames; `dpo-jax plan` tells it (before jax starts), so its output is ours alone. (The mesh is refused after
    the topology was built: libtpu has started by then.)"""
    model = config_dir(tmp_path / "m", hidden=128, layers=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-m", "dpo_jax", "plan", "--model_name_or_path", model, "--topology",
                             "v5p-8", "--mesh", "tensor=3"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "mesh" in result.stderr, result.stderr
    assert "TPU_ACCELERATOR_TYPE" not in result.stderr and "WORKER_HOSTNAMES" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_loops_are_counted_as_often_as_they_run():
    """On a TPU chip, the FLOPs of nested scans (5 x 3 matmuls) equal XLA's own count of the same program
    unrolled, up to the loops' bookkeeping (a counter add per iteration); those of its gradient are the 45
    matmuls of the forward and backward passes plus the elementwise accumulation of the weights' gradient in the
    loops' carries (XLA, counting each loop body once, sees a tenth of it)."""
    devices, _ = plan.tpu_devices("v5e:1x1")
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
    rows, width, outer, inner = 64, 128, 5, 3  # fewer rows than columns: no matmul chain for XLA to reorder
    x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    w = jax.ShapeDtypeStruct((outer, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))

    def scanned(x, w, c):
        def step(h, w_i):
            return jax.lax.scan(lambda g, _: (g @ w_i, None), h, None, length=inner)[0], None
        return (jax.lax.scan(step, x, w)[0] * c).astype(jnp.float32).sum()

    def unrolled(x, w, c):
        for i in range(outer):
            for _ in range(inner):
                x = x @ w[i]
        return (x * c).astype(jnp.float32).sum()

    cpu = jax.devices("cpu")[0].client
    iterations, matmul = outer + outer * inner, 2 * rows * width * width
    looped = hlo.analyse(jax.jit(scanned).lower(x, w, x).compile().as_text(), cpu)
    flat = jax.jit(unrolled).lower(x, w, x).compile().cost_analysis()["flops"]
    assert sorted(n for _, n in looped.loops) == [inner, outer]
    assert 0 <= looped.flops - flat <= 2 * iterations and looped.flops_once < flat / 10

    grad = jax.grad(scanned, argnums=(0, 1))
    looped = hlo.analyse(jax.jit(grad).lower(x, w, x).compile().as_text(), cpu)
    assert sorted(n for _, n in looped.loops) == [inner, inner, outer, outer]
    matmuls = 3 * outer * inner * matmul  # forward; the input's and the weights' gradients
    # and elementwise work, a few passes per iteration over the carry and a weight (the weight gradient's sum)
    assert matmuls <= looped.flops <= matmuls + 4 * iterations * (rows * width + width * width)
    assert looped.flops_once < matmuls / 10


def test_the_host_is_planned_the_same_way(tmp_path, capsys):
    """Without --topology: this machine's 8 (simulated CPU) devices, host memory as the limit."""
    model = config_dir(tmp_path / "m", hidden=128, layers=1)
    assert main(["plan", "--model_name_or_path", model, "--max_length", "64", "--per_device_train_batch_size", "1",
                 "--output_json", str(tmp_path / "p.json")]) == 0
    figures = json.loads((tmp_path / "p.json").read_text())
    assert figures["chips"] == 8 and figures["fits"] is True and "host memory" in figures["hbm_source"]
    assert figures["attn_implementation"] == "auto (eager)"  # 128-token rows on the CPU
    out = capsys.readouterr().out
    assert "8 chips (cpu)" in out and "attention auto (eager)" in out


def test_fsdp_gathers_the_head_once_per_pass_and_reduces_its_gradient_once(tmp_path):
    """A full fine-tune on 8 v5e chips whose head runs in 4 chunks (vocabulary 65536, 2 rows of 4096 tokens per
    chip), remat on: the head's weight is gathered for the policy's forward and the reference's (the backward
    reuses the policy's), the blocks' about 3 times (forward, reference, backward with its recomputation), not
    once per chunk; the head's gradient is reduced once, not once per chunk. Each chip receives 7/8 of a
    gathered or reduce-scattered weight and twice 7/8 of an all-reduced one."""
    model = config_dir(tmp_path / "m", hidden=512, layers=2, vocab=65536)
    figures = plan.plan(options.parse(["--model_name_or_path", model, "--max_length", "4096",
                                       "--per_device_train_batch_size", "1", "--pack_pairs", "pairs",
                                       "--gradient_checkpointing", "true", "--bf16", "true"]), "v5e:2x4")
    assert figures["attn_implementation"] == "auto (splash)"  # auto's choice on a TPU, named
    head = 512 * 65536
    block = 512 * (4 * 128 + 2 * 2 * 128 + 4 * 128) + 3 * 512 * 1024 + 2 * 512  # q, k, v, o; the MLP; 2 norms
    assert figures["model_parameters"] == 2 * head + 2 * block + 512  # embedding, head, 2 blocks, the final norm
    bf16 = 2
    gathers = figures["collective_roles"]["gather"]
    assert 7 / 8 * 2 * head * bf16 <= gathers <= (2 * head + 3.5 * 2 * block) * bf16
    # one reduce-scatter of the head's gradient (7/8 of it), or one all-reduce where XLA prefers it (twice that);
    # once per chunk would be 4 times either
    reduced = figures["collective_bytes"]["all-reduce"] + figures["collective_bytes"]["reduce-scatter"]
    assert 7 / 8 * head * bf16 <= reduced <= 2 * 7 / 8 * head * bf16 + 2**20


def test_per_chip_activations_do_not_grow_with_the_chips(tmp_path):
    """The same batch per chip on 4 and on 8 v5e chips, an MLP-heavy model (intermediate 8192, rows of 1024
    tokens): a chip's temporaries stay about the same, as activations are split by rows over the chips. Without
    the row hints they grow 1.82x (the MLP's intermediates kept whole, split over the hidden dimension). The
    saved activations are the same buffers on both; what differs (8 chips: 1.14x) is XLA's choice of matmul
    algorithm per topology (on 4 chips windowed einsums over [2, 128, 8192] pieces, on 8 whole [2, 1024, 8192]
    intermediates), hence the 1.25 bound."""
    model = config_dir(tmp_path / "m", hidden=512, layers=2, intermediate=8192)
    args = ["--model_name_or_path", model, "--max_length", "1024", "--per_device_train_batch_size", "1",
            "--pack_pairs", "pairs", "--gradient_checkpointing", "false", "--bf16", "true"]
    four, eight = (plan.plan(options.parse(args), topology)["temp"] for topology in ("v5e:2x2", "v5e:2x4"))
    assert eight <= 1.25 * four
