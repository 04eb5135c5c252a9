import os
import tempfile

# Eight simulated CPU devices for the sharding tests; must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU. With the `plan` extra (libtpu) installed, jax would otherwise try to start a TPU first
# and print libtpu's warnings in every subprocess; the TPU compiler stays usable (dpo-jax plan --topology).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The reference log-prob and XLA compilation caches of the session's runs: not the user's ~/.cache.
os.environ.setdefault("DPO_JAX_CACHE", tempfile.mkdtemp(prefix="dpo_jax_test_cache."))
