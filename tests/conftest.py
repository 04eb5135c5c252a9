import os
import tempfile

# Eight simulated CPU devices for the sharding tests; must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU. With the `plan` extra (libtpu) installed, jax would otherwise try to start a TPU first
# and print libtpu's warnings in every subprocess; the TPU compiler stays usable (dpo-jax plan --topology).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compiler's tests (test_plan.py) as `dpo-jax plan` runs it: told it is not on a TPU VM (no warnings), and
# not holding libtpu's machine-wide lock (it drives no chip), so the plan subprocesses and other runs can load it.
for name, value in (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                    ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The reference log-prob and XLA compilation caches of the session's runs: not the user's ~/.cache.
os.environ.setdefault("DPO_JAX_CACHE", tempfile.mkdtemp(prefix="dpo_jax_test_cache."))
