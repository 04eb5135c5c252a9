"""hlo.py's reading of an optimized HLO module: the bytes its collectives bring into each device, by kind and by
what they do, against programs of known collectives and a hand-written module (no TPU compiler needed)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from dpo_jax import hlo
from dpo_jax.sharding import make_mesh


@pytest.mark.parametrize("attributes,size", [
    ("replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", 8),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", 8),
    ("replica_groups=mesh['axis_0'=8] {'axis_0':(2)4}", 4),  # a sub-axis: 4 of axis_0's 8, in steps of 2
    ("replica_groups=[2,4]<=[8]", 4),
    ("replica_groups={{0,1},{2,3}}", 2),
    ("replica_groups={}", None),  # all devices: not said
    ("replica_groups=mesh['axis_0'=8] {'other'}", None),
])
def test_group_sizes_from_each_form_of_replica_groups(attributes, size):
    assert hlo.group_size(attributes + ", dimensions={0}") == size


def test_collective_bytes_are_what_each_device_receives():
    """On 8 simulated CPU devices, a program that all-gathers, all-reduces, reduce-scatters and permutes known
    arrays: each device receives 7/8 of a gathered result, twice 7/8 of an all-reduced array (a reduce-scatter
    and an all-gather), 7/8 of a reduce-scattered one, and a permuted array whole."""
    mesh = make_mesh(fsdp=8)  # conftest's simulated devices
    n = 8 * 256  # float32 elements per array: 8 KiB

    def f(x):
        gathered = jax.lax.all_gather(x, "fsdp", tiled=True)  # [n] from [n / 8]
        summed = jax.lax.psum(gathered, "fsdp")  # [n]
        scattered = jax.lax.psum_scatter(summed * 2, "fsdp", tiled=True)  # [n / 8]
        moved = jax.lax.ppermute(scattered, "fsdp", [(i, (i + 1) % 8) for i in range(8)])
        return moved

    program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=PartitionSpec("fsdp"), out_specs=PartitionSpec("fsdp")))
    text = program.lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile().as_text()
    computations, entry = hlo.parse(text)
    collectives, roles = hlo.collective_bytes(computations, hlo.run_counts(computations, entry)[0])
    whole = 4 * n
    assert collectives["all-gather"] == whole * 7 // 8
    assert collectives["all-reduce"] == 2 * whole * 7 // 8
    assert collectives["reduce-scatter"] == whole * 7 // 8
    assert collectives["collective-permute"] == whole // 8
    assert roles == {"gather": whole * 7 // 8, "reduce": 3 * whole * 7 // 8, "exchange": whole // 8}


RINGS_AND_CHAINS = """HloModule rings

%windowed_dot_general_body_ag.1 (p.1: (bf16[8,128], s32[])) -> (bf16[8,128], s32[]) {
  %p.1 = (bf16[8,128], s32[]) parameter(0)
  %shard = bf16[8,128] get-tuple-element(%p.1), index=0
  %sent = bf16[8,128] collective-permute(%shard), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %i = s32[] get-tuple-element(%p.1), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out.1 = (bf16[8,128], s32[]) tuple(%sent, %next)
}

%windowed_dot_general_cond_ag.1 (p.2: (bf16[8,128], s32[])) -> pred[] {
  %p.2 = (bf16[8,128], s32[]) parameter(0)
  %j = s32[] get-tuple-element(%p.2), index=1
  %four = s32[] constant(4)
  ROOT %less = pred[] compare(%j, %four), direction=LT
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%piece (a: bf16[8,128]) -> bf16[16,128] {
  %a = bf16[8,128] parameter(0)
  ROOT %ag = bf16[16,128] all-gather(%a), channel_id=7, replica_groups=[1,2]<=[2], dimensions={0}, frontend_attributes={chain_id="0"}
}

%piece.2 (b: bf16[8,128]) -> bf16[16,128] {
  %b = bf16[8,128] parameter(0)
  ROOT %ag.2 = bf16[16,128] all-gather(%b), channel_id=7, replica_groups=[1,2]<=[2], dimensions={0}, frontend_attributes={chain_id="0"}
}

ENTRY %main (w: bf16[8,128], g: f32[8,128]) -> (bf16[8,128], f32[8,128], bf16[16,128], bf16[16,128], bf16[8,128]) {
  %w = bf16[8,128] parameter(0)
  %g = f32[8,128] parameter(1)
  %first = bf16[8,128] collective-permute(%w), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %zero = s32[] constant(0)
  %init = (bf16[8,128], s32[]) tuple(%first, %zero)
  %loop = (bf16[8,128], s32[]) while(%init), condition=%windowed_dot_general_cond_ag.1, body=%windowed_dot_general_body_ag.1
  %last = bf16[8,128] get-tuple-element(%loop), index=0
  %reduced = f32[8,128] all-reduce(%g), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  %one_piece = bf16[16,128] fusion(%w), kind=kLoop, calls=%piece
  %another_piece = bf16[16,128] fusion(%w), kind=kLoop, calls=%piece.2
  %swapped = bf16[8,128] collective-permute(%w), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %all = (bf16[8,128], f32[8,128], bf16[16,128], bf16[16,128], bf16[8,128]) tuple(%last, %reduced, %one_piece, %another_piece, %swapped)
}
"""


def test_rings_and_chained_collectives_are_counted_for_what_they_do():
    """A windowed einsum's ring (a permute peeled off before its loop, one inside it, run 4 times) gathers; one
    all-gather run in two chained pieces (the same channel and chain ids) is counted once; a permute that feeds
    no ring exchanges; the all-reduce over pairs of devices reduces. Hand-counted bytes of a hand-written module."""
    computations, entry = hlo.parse(RINGS_AND_CHAINS)
    runs, loops = hlo.run_counts(computations, entry)
    assert [n for _, n in loops] == [4]
    collectives, roles = hlo.collective_bytes(computations, runs)
    shard = 8 * 128 * 2  # bf16[8, 128]
    assert collectives["collective-permute"] == (1 + 4 + 1) * shard
    assert collectives["all-gather"] == 2 * shard // 2  # one gather of bf16[16, 128] over 2 devices, not two
    assert collectives["all-reduce"] == 2 * (4 * 8 * 128) // 2
    assert roles == {"gather": (1 + 4) * shard + shard, "reduce": 4 * 8 * 128, "exchange": shard}
