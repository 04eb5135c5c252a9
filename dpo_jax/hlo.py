"""Figures of a compiled program read from its optimized HLO text: FLOPs with every loop counted as many times
as it runs, and the bytes its collectives bring into each device, by kind and by what they do.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, whatever its trip count, and
a train step is mostly loops (the scan over decoder blocks, gradient accumulation, the head's chunks). Here each
loop body is cut out of the module as a module of its own and costed by the same analysis, then weighted by its
trip count, which is read from the loop itself: the induction variable's start (a constant in the loop's
initial tuple), its step (a constant added in the body) and its bound (a constant it is compared with in the
condition). The TPU compiler does not record `known_trip_count` as the CPU's does, so this is the way for both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|f8e4m3b11fnuz|f8e4m3fnuz|f8e5m2fnuz|"
                    r"bf16|f16|f32|f64|c64|c128|token)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_CALLED = re.compile(r"(?:calls|to_apply|condition|body|true_computation|false_computation)=%([^,\s)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text: an array, or a tuple of arrays
    opcode: str
    operands: list[str]
    attributes: str
    root: bool


@dataclass
class Computation:
    name: str
    text: list[str]
    instructions: dict[str, Instruction] = field(default_factory=dict)

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a shape's text (a tuple's elements summed)."""
    total = 0.0
    for kind, dims in _ARRAY.findall(shape):
        total += _BYTES[kind] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _operands(text: str) -> tuple[list[str], str]:
    """The operand names of an instruction's argument text and the attributes after it."""
    depth, end = 1, len(text)
    for n, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = n
            break
    return re.findall(r"%([^\s,()]+)", text[:end]), text[end + 1:]


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """(computations by name, the entry computation's name) of an HLO module's text."""
    computations: dict[str, Computation] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = Computation(header.group(2), [line])
            computations[current.name] = current
            entry = current.name if header.group(1) else entry
            continue
        if current is None:
            continue
        current.text.append(line)
        if line == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            operands, attributes = _operands(m.group(5))
            current.instructions[m.group(2)] = Instruction(m.group(2), m.group(3), m.group(4), operands, attributes,
                                                           bool(m.group(1)))
    return computations, entry


def called(instruction: Instruction) -> list[str]:
    """The computations an instruction calls (fusions, loops, conditionals, reductions, async wrappers)."""
    names = _CALLED.findall(instruction.attributes)
    for branches in _BRANCHES.findall(instruction.attributes):
        names += re.findall(r"%([^,\s}]+)", branches)
    return names


def _line(computation: Computation, name: str) -> str:
    return next(line for line in computation.text if re.match(rf"^\s*(ROOT )?%{re.escape(name)} = ", line))


def _source(computation: Computation, name: str) -> Instruction | None:
    """The instruction whose value `name` holds, seen through copies, bitcasts and conversions."""
    instruction = computation.instructions.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "copy-start", "copy-done", "convert") \
            and instruction.operands:
        instruction = computation.instructions.get(instruction.operands[0])
    return instruction


def _constant(computation: Computation, name: str) -> int | None:
    """The integer value of instruction `name` when it is a scalar constant."""
    instruction = _source(computation, name)
    if instruction is None or instruction.opcode != "constant":
        return None
    m = re.search(r" constant\((-?\d+)\)", _line(computation, instruction.name))
    return int(m.group(1)) if m else None


def _operation(computations, computation: Computation, instruction: Instruction) -> tuple[str, list, str]:
    """(opcode, operands, its line) of an instruction, seen through a fusion that wraps one operation: the
    operands are then the fusion's (names in `computation`), or an int for a constant inside the fusion."""
    if instruction.opcode != "fusion":
        return instruction.opcode, list(instruction.operands), _line(computation, instruction.name)
    inner = computations[called(instruction)[0]]
    root = inner.root
    operands = []
    for operand in root.operands:
        line = _line(inner, operand)
        parameter = re.search(r" parameter\((\d+)\)", line)
        operands.append(instruction.operands[int(parameter.group(1))] if parameter else _constant(inner, operand))
    return root.opcode, operands, _line(inner, root.name)


def _int(computation: Computation, operand) -> int | None:
    return operand if isinstance(operand, int) or operand is None else _constant(computation, operand)


def trip_count(computations, computation: Computation, loop: Instruction) -> int | None:
    """How many times `loop` (a while in `computation`) runs its body, or None when it cannot be read: the
    condition compares a tuple element (the counter) with a constant; the loop starts it at a constant and the
    body adds a constant to it."""
    condition = computations[re.search(r"condition=%([^,\s]+)", loop.attributes).group(1)]
    body = computations[re.search(r"body=%([^,\s]+)", loop.attributes).group(1)]
    opcode, operands, line = _operation(computations, condition, condition.root)
    direction = re.search(r"direction=(\w+)", line)
    if opcode != "compare" or len(operands) != 2 or not direction:
        return None
    def counter_of(computation, operand):  # get-tuple-element(parameter) of the loop's tuple
        found = _source(computation, operand) if isinstance(operand, str) else None
        return found if found is not None and found.opcode == "get-tuple-element" else None

    counter_first = counter_of(condition, operands[0]) is not None
    counter, bound = operands if counter_first else operands[::-1]
    bound, counter = _int(condition, bound), counter_of(condition, counter)
    if counter is None or counter.opcode != "get-tuple-element" or bound is None:
        return None
    index = int(re.search(r"index=(\d+)", counter.attributes).group(1))
    # the comparison as "counter OP bound"
    flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}
    op = direction.group(1) if counter_first else flip.get(direction.group(1))
    initial = computation.instructions.get(loop.operands[0])
    if initial is None or initial.opcode != "tuple" or body.root.opcode != "tuple":
        return None
    start = _constant(computation, initial.operands[index])
    step_op, step_operands, _ = _operation(computations, body, body.instructions[body.root.operands[index]])
    if start is None or step_op not in ("add", "subtract") or len(step_operands) != 2:
        return None
    read, step = counter_of(body, step_operands[0]), _int(body, step_operands[1])
    if read is None or step is None \
            or int(re.search(r"index=(\d+)", read.attributes).group(1)) != index:
        return None
    step = step if step_op == "add" else -step
    if op in ("LT", "LE") and step > 0:
        return max(0, -(-(bound + (op == "LE") - start) // step))
    if op in ("GT", "GE") and step < 0:
        return max(0, -(-(start - bound + (op == "GE")) // -step))
    return None


def _reachable(computations, name: str, stop_at_loops: bool) -> list[str]:
    """Computations `name` calls, transitively; with `stop_at_loops`, not into while loops' bodies."""
    seen, todo = [name], [name]
    while todo:
        for instruction in computations[todo.pop()].instructions.values():
            if stop_at_loops and instruction.opcode == "while":
                continue
            for callee in called(instruction):
                if callee not in seen and callee in computations:
                    seen.append(callee)
                    todo.append(callee)
    return seen


def _submodule(computations, name: str) -> str:
    """A module text whose entry is computation `name`, with every computation it calls."""
    parts = ["HloModule part", ""]
    needed = set(_reachable(computations, name, stop_at_loops=False)[1:])
    for callee in (c for c in computations if c in needed):  # in the module's order: callees come first
        parts += computations[callee].text + [""]
    body = list(computations[name].text)
    body[0] = "ENTRY " + body[0]
    # source locations point into the module's frame tables, which the part does not carry
    return re.sub(r" stack_frame_id=\d+", "", "\n".join(parts + body))


# XLA's SPMD partitioner may run a sharded matmul as a "windowed einsum": a loop that passes the weight's shards
# (or the partial results) around a ring with collective-permutes while it multiplies, instead of one
# all-gather (or reduce-scatter) before (after) the matmul. Its loops are named for what they replace.
_RING_LOOPS = (("windowed_dot_general_body_ag", "gather"), ("windowed_dot_general_body_rs", "reduce"))
ROLES = ("gather", "reduce", "exchange")


def _ring_role(name: str) -> str | None:
    return next((role for marker, role in _RING_LOOPS if marker in name), None)


def permute_role(computations, computation: Computation, instruction: Instruction) -> str:
    """What a collective-permute does: "gather" or "reduce" when it is a step of a windowed einsum's ring (inside
    its loop, or peeled off just before or after it: its result feeds such a loop, or it sends such a loop's
    result), "exchange" otherwise."""
    role = _ring_role(computation.name)
    if role:
        return role
    def loop_role(candidate: Instruction | None) -> str | None:
        if candidate is not None and candidate.opcode == "while":
            return _ring_role(re.search(r"body=%([^,\s]+)", candidate.attributes).group(1))
        return None
    source = _source(computation, instruction.operands[0]) if instruction.operands else None
    while source is not None and source.opcode == "get-tuple-element" and source.operands:
        role = loop_role(computation.instructions.get(source.operands[0]))
        if role:
            return role
        source = _source(computation, source.operands[0])
    # where its result goes: the done of an async permute, then through tuples and copies into a loop
    users: dict[str, list[Instruction]] = {}
    for other in computation.instructions.values():
        for operand in other.operands:
            users.setdefault(operand, []).append(other)
    todo, seen = [instruction.name], set()
    while todo:
        name = todo.pop()
        for user in users.get(name, []):
            role = loop_role(user)
            if role:
                return role
            if user.opcode in ("collective-permute-done", "tuple", "copy", "copy-start", "copy-done", "bitcast") \
                    and user.name not in seen:
                seen.add(user.name)
                todo.append(user.name)
    return "exchange"


@dataclass
class Figures:
    flops: float | None  # every loop counted trip-count times; None when a loop cannot be counted
    flops_once: float  # XLA's own figure: each loop body once
    loops: list[tuple[str, int | None]]  # (while instruction, trip count)
    collectives: dict[str, int]  # bytes into each device by kind (_moved_bytes), loops counted trip-count times
    # the same bytes by what they do: "gather" (all-gathers and the permutes of gathering rings), "reduce"
    # (all-reduces, reduce-scatters and the permutes of reducing rings), "exchange" (all-to-alls, other permutes)
    roles: dict[str, int] = field(default_factory=dict)


def run_counts(computations, entry: str) -> tuple[dict[str, int], list[tuple[str, int | None]]]:
    """(times each computation runs per execution of the program, every loop with its trip count); a loop whose
    count cannot be read is taken as running once."""
    loops = []
    runs = {entry: 1}
    for name in _reachable(computations, entry, stop_at_loops=False):
        for instruction in computations[name].instructions.values():
            count = 1
            if instruction.opcode == "while":
                count = trip_count(computations, computations[name], instruction)
                loops.append((instruction.name, count))
                count = 1 if count is None else count
            for callee in called(instruction):
                runs[callee] = runs.get(callee, 0) + runs.get(name, 0) * count
    return runs, loops


def collective_bytes(computations, runs: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes into each device by collective kind, the same by role: ROLES) per execution of the program."""
    collectives = {kind: 0 for kind in COLLECTIVES}
    roles = {role: 0 for role in ROLES}
    # XLA:TPU may run one collective in pieces inside several compute fusions ("async collective fusion"), even
    # across a loop's iterations, to overlap it with them: each piece carries the whole collective's shape and the
    # same channel and chain ids. Such a chain is counted once for every time the least-run of its pieces runs.
    chain_runs: dict[tuple[str, str], int] = {}
    for name, computation in computations.items():
        for instruction in computation.instructions.values():
            chain = _chain(instruction)
            if chain and runs.get(name):
                chain_runs[chain] = min(chain_runs.get(chain, runs[name]), runs[name])
    counted_chains = set()
    for name, computation in computations.items():
        for instruction in computation.instructions.values():
            kind = instruction.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or not runs.get(name):
                continue
            chain = _chain(instruction)
            if chain in counted_chains:
                continue  # another piece of a chain already counted
            if chain:
                counted_chains.add(chain)
            moved = (chain_runs[chain] if chain else runs[name]) * _moved_bytes(computation, instruction, kind)
            collectives[kind] += moved
            role = ("gather" if kind == "all-gather" else "reduce" if kind in ("all-reduce", "reduce-scatter")
                    else "exchange" if kind == "all-to-all" else permute_role(computations, computation, instruction))
            roles[role] += moved
    return collectives, roles


def analyse(text: str, client) -> Figures:
    """The figures of an optimized HLO module's text; `client` runs XLA's cost analysis (any backend's: the
    analysis is the same HloCostAnalysis)."""
    from jax._src.lib import _jax  # XLA's cost analysis of a module, what Compiled.cost_analysis() calls
    from jax.errors import JaxRuntimeError
    from jaxlib import _hlo

    computations, entry = parse(text)

    def cost(name: str) -> float:
        module = _hlo.hlo_module_from_text(text if name == entry else _submodule(computations, name))
        return float(_jax.hlo_module_cost_analysis(client, module).get("flops", 0.0))

    runs, loops = run_counts(computations, entry)

    def weighted(name: str) -> float:
        """FLOPs of one run of computation `name` with its loops run as many times as they do."""
        total = cost(name)
        for inner in _reachable(computations, name, stop_at_loops=True):
            for instruction in computations[inner].instructions.values():
                if instruction.opcode == "while":
                    body = re.search(r"body=%([^,\s]+)", instruction.attributes).group(1)
                    n = trip_count(computations, computations[inner], instruction)
                    total += (1 if n is None else n) * weighted(body) - cost(body)
        return total

    collectives, roles = collective_bytes(computations, runs)
    flops = None
    if all(n is not None for _, n in loops):
        try:
            flops = weighted(entry)
        except JaxRuntimeError:  # a loop body the analysis cannot take as a module of its own
            flops = None
    return Figures(flops=flops, flops_once=cost(entry), loops=loops, collectives=collectives, roles=roles)


def _chain(instruction: Instruction) -> tuple[str, str] | None:
    """(channel id, chain id) of a collective that is one piece of a chained async collective, else None."""
    if instruction.opcode.removesuffix("-start") not in COLLECTIVES:
        return None
    chain = re.search(r'chain_id="([^"]*)"', instruction.attributes)
    channel = re.search(r"channel_id=(\d+)", instruction.attributes)
    return (channel.group(1) if channel else "", chain.group(1)) if chain else None


def group_size(attributes: str) -> int | None:
    """How many devices take part in each group of a collective, from its replica_groups (XLA's mesh form
    `mesh['axis_0'=8,'axis_1'=1] {'axis_0'}`, a sub-axis written `'axis_0':(2)4`, the iota form `[2,4]<=[8]`
    or explicit `{{0,1},{2,3}}`); None when it does not say (`{}`: all devices) or cannot be read."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        total = 1
        for name, sub in re.findall(r"'([^']+)'(?::\((?:\d+)\)(\d+))?", mesh.group(2)):
            if not sub and name not in sizes:
                return None
            total *= int(sub) if sub else sizes[name]
        return total if mesh.group(2).strip() else None
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    return len(explicit.group(1).split(",")) if explicit else None


def _moved_bytes(computation: Computation, instruction: Instruction, kind: str) -> int:
    """The bytes a collective brings into each device, by the usual algorithms over groups of g devices: an
    all-gather receives (g - 1) / g of its result, a reduce-scatter or all-to-all (g - 1) / g of its operand, an
    all-reduce twice that (a reduce-scatter, then an all-gather), a collective-permute its operand. An async
    `-start` is counted; its `-done` is not."""
    operands = sum(shape_bytes(computation.instructions[o].shape) for o in instruction.operands
                   if o in computation.instructions)
    if kind == "collective-permute":
        return operands
    g = group_size(instruction.attributes)
    share = 1.0 if g is None else (g - 1) / g  # groups it does not say: counted whole (an upper bound)
    if kind == "all-gather":
        result = shape_bytes(instruction.shape)
        # all-gather-start's result is the tuple (operands, results)
        return int(share * (result - operands if instruction.opcode.endswith("-start") else result))
    return int((2 if kind == "all-reduce" else 1) * share * operands)
