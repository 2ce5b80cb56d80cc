"""What a compiled XLA program does per run, counted from its optimized HLO text with loop trip counts applied.

XLA's own cost analysis (`compiled.cost_analysis()`) counts a while loop's body once. A k2jax step is loops: the
layer scan (60 MoE layers of K2), remat's recomputation inside it, MuonClip's Newton-Schulz iterations, the loss
over logit pieces. So its FLOPs and bytes are a fraction of the real ones (0.05x for K2's train step). Here every
computation is weighted by how often it runs (XLA's `known_trip_count`, else the bound N of the loop condition
`i < N`, which is how jax's scan / fori_loop loops count), and then:

  flops        matrix FLOPs: every `convolution` (XLA:TPU writes each dot_general as one; 2 x output elements x
               input features x the kernel taps that land on the input, padding and dilation honoured, which
               is what the "batch as a spatial dimension" convolutions need), every `dot` (2 x output elements
               x contracted size), every `reduce` that XLA made of a small dot_general (its op_name says so:
               2 x the multiplied elements), and each Pallas kernel's declared pl.CostEstimate. Elementwise work is not
               counted (XLA counts ~1 FLOP per element; it is under 1 % of a transformer step).
  hbm_bytes    for each op outside fused computations: the bytes of its operands read and result written,
               a slice / dynamic-slice (also inside a fusion, through its copies and transposes) reading only
               what it takes and an in-place dynamic-update-slice or scatter writing only the update; values in
               VMEM (memory space S(1)) and bookkeeping ops (tuples, bitcasts, parameters, loops themselves) move
               no HBM bytes; a Pallas kernel's bytes are its declared bytes_accessed.
  collectives  every all-gather / all-reduce / reduce-scatter / all-to-all / ragged-all-to-all /
               collective-permute: executions and result bytes per device (async pairs once, at -start).
  pallas       Pallas kernel launches in the program text (Mosaic custom calls made by a pallas_call).

    cost = HloCost(compiled.as_text())
    cost.flops, cost.hbm_bytes, cost.collectives(), cost.pallas_kernels()
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$", re.S)
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_CLOSE = re.compile(r'^\}(?:, execution_thread="[^"]*")?\s*$')  # a computation's closing line
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MEMORY_SPACE = re.compile(r"S\([1-9]\d*\)")
_HOST_MEMORY = re.compile(r"S\(5\)")  # XLA:TPU's memory space of host memory (what host offloading writes to)
_TRANSFERS = ("copy-start", "dynamic-slice-start", "dynamic-update-slice-start")  # async DMAs, waited at -done
_OPERAND = re.compile(r"%([\w.\-]+)")
_FROM_DOT = re.compile(r'op_name="[^"]*dot_general"')
_COST_ESTIMATE = re.compile(r'"cost_estimate":(\{[^}]*\})')
# ops that move no HBM bytes of their own (their computations' ops are counted where they run)
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "opt-barrier", "partition-id", "replica-id", "iota", "call-start", "call-done",
               "async-start", "async-update", "async-done", "call-update", "add-dependency", "domain"}
_SLICING = ("dynamic-slice", "slice", "gather")
_IN_PLACE = ("dynamic-update-slice", "scatter")  # operand 0 is the buffer, updated where it lies
_VIEWS = ("bitcast", "reshape", "get-tuple-element")  # a user that passes the value on: its users decide
# inside a fused computation, ops that only move elements (a layout change, a transpose, padding): a slice of their
# result reads at most that slice's elements of their operand (XLA:TPU slices one layer of an FP8 stack through a
# copy from its T(32,128) tiling to T(8,128) and back, the whole stack never copied; a windowed einsum's loop reads
# one piece of a padded weight shard per trip)
_REMAPS = ("copy", "transpose", "pad")


class _Instruction:
    __slots__ = ("name", "type", "op", "args", "operands", "attrs")

    def __init__(self, name: str, type_text: str, op: str, rest: str):
        self.name, self.type, self.op = name, type_text, op
        depth, end = 1, len(rest)
        for i, ch in enumerate(rest):  # the operand list ends at the parenthesis that closes op(
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        self.args = rest[:end]  # operands; a constant's value; a parameter's number
        self.operands = _OPERAND.findall(self.args)
        self.attrs = rest[end + 1:]


@dataclasses.dataclass(frozen=True)
class Launch:
    """A collective as one op outside fused computations runs it."""
    op: _Instruction          # the op: the collective itself, its -start / -done, or a fusion holding it
    collective: _Instruction  # the collective (inside the op's computation for a fusion)
    kind: str                 # what it does: one of COLLECTIVES ("reduce-scatter" for an all-reduce-scatter fusion)
    role: str                 # "sync", "start", "done", or "step" (an async collective fusion's progress)
    operand_bytes: float      # bytes of the collective's first operand per device (what a device sends)

    @property
    def result_bytes(self) -> float:
        """Bytes of the collective's result per device (its last array: an async op's tuple ends with it)."""
        arrays = _arrays(self.collective.type)
        return _array_bytes(arrays[-1]) if arrays else 0.0


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """(dtype, dims, off HBM) of each array in a result type (a tuple type has several). Off HBM: a memory
    space other than HBM's 0 (S(1) VMEM, S(2) SMEM, S(5) host memory, ...)."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d), bool(_MEMORY_SPACE.search(layout)))
            for dtype, dims, layout in _ARRAY.findall(type_text) if dtype in _DTYPE_BYTES]


def _array_bytes(array: tuple[str, tuple[int, ...], bool]) -> float:
    """Bytes of one of `_arrays`' arrays."""
    return math.prod(array[1]) * _DTYPE_BYTES[array[0]]


def _bytes(type_text: str, hbm_only: bool = False) -> float:
    return sum(_array_bytes(a) for a in _arrays(type_text) if not (hbm_only and a[2]))


class HloCost:
    """The per-run costs of one optimized HLO module (module docstring)."""

    def __init__(self, hlo_text: str):
        self.computations: dict[str, list[_Instruction]] = {}
        entry, current = None, None
        for line in _logical_lines(hlo_text):
            m = _header(line)
            if m:
                current = m.group(1)
                self.computations[current] = []
                entry = current if line.startswith("ENTRY") else entry
                continue
            ins = _INSTRUCTION.match(line) if current is not None else None
            if ins:
                self.computations[current].append(_Instruction(*ins.groups()))
        self.entry = entry or next(iter(self.computations), "")
        self.types = {i.name: i.type for ins in self.computations.values() for i in ins}
        self.fused: set[str] = set()  # computations whose ops run in registers / VMEM: a fusion's body
        self.async_bodies: set[str] = set()  # the computations async calls run (their collectives: the call's)
        calls: dict[str, list[tuple[str, int]]] = {c: [] for c in self.computations}
        for comp, instructions in self.computations.items():
            for i in instructions:
                callees = _CALLEES.findall(i.attrs)
                trips = self.trip_count(i, callees) if i.op == "while" else 1
                for kind, callee in callees:
                    calls[comp].append((callee, trips if kind == "body" else 1))
                    if i.op == "fusion" or (kind == "to_apply" and i.op not in ("call", "call-start")):
                        self.fused.add(callee)  # a fusion's body, a reduction's or a sort's computation
                    if i.op == "call-start":
                        self.async_bodies.add(callee)
                for group in _BRANCHES.findall(i.attrs):
                    calls[comp] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
        self.times = {c: 0 for c in self.computations}

        def visit(comp: str, n: int, depth: int = 0) -> None:
            if comp not in self.times or depth > 64:
                return
            self.times[comp] += n
            for callee, k in calls[comp]:
                visit(callee, n * k, depth + 1)

        visit(self.entry, 1)
        self.flops = sum(self._times(c) * sum(self._flops(i) for i in ins) for c, ins in self.computations.items())
        self.hbm_bytes = sum(self._times(c) * sum(self._hbm_bytes(i) for i in ins)
                             for c, ins in self.computations.items() if c not in self.fused)

    def _times(self, comp: str) -> int:
        return self.times[comp] or 1  # a computation not reached from the entry (none expected) counts once

    def trip_count(self, loop: _Instruction, callees: list[tuple[str, str]]) -> int:
        """A while loop's iterations: XLA's known_trip_count when the text has it, else from its condition `i < N`
        and the step the body adds to i, counting from 0 (jax's loops step by 1; XLA:TPU's windowed-einsum
        loops, which overlap a matmul with the collective that feeds it, count u32 by 2)."""
        known = _TRIP_COUNT.search(loop.attrs)
        if known:
            return int(known.group(1))
        kinds = dict((kind, c) for kind, c in callees)
        cond = self.computations.get(kinds.get("condition"), [])
        by_name = {i.name: i for i in cond}
        compare = next((i for i in cond if i.op == "compare" and "direction=LT" in i.attrs), None)
        if compare is None or len(compare.operands) < 2:
            return 1
        counter, bound = (by_name.get(o) for o in compare.operands[:2])
        if bound is None or bound.op != "constant" or not re.match(r"[su](32|64)\[\]", bound.type) \
                or not bound.args.isdigit():
            return 1
        step = self._loop_step(self.computations.get(kinds.get("body"), []), counter)
        return max(1, -(-int(bound.args) // step))

    @staticmethod
    def _loop_step(body: list[_Instruction], counter: _Instruction | None) -> int:
        """What a loop body adds to the counter the condition reads (get-tuple-element `index=k` of the loop
        state): the constant of `add(state[k], c)` in the body's result tuple; 1 when the text does not say."""
        index = re.search(r"index=(\d+)", counter.attrs) if counter is not None and \
            counter.op == "get-tuple-element" else None
        if not body or index is None or body[-1].op != "tuple":
            return 1
        by_name = {i.name: i for i in body}
        k = int(index.group(1))
        update = by_name.get(body[-1].operands[k]) if k < len(body[-1].operands) else None
        if update is None or update.op != "add":
            return 1
        steps = [by_name[o] for o in update.operands if o in by_name and by_name[o].op == "constant"]
        reads = [by_name[o] for o in update.operands if o in by_name and by_name[o].op == "get-tuple-element"
                 and re.search(r"index=(\d+)", by_name[o].attrs).group(1) == str(k)]
        return int(steps[0].args) if len(steps) == 1 and reads and steps[0].args.isdigit() \
            and int(steps[0].args) > 0 else 1

    def _flops(self, i: _Instruction) -> float:
        if i.op == "convolution":
            return self._convolution_flops(i)
        if i.op == "dot":
            lhs = _arrays(self.types.get(i.operands[0], ""))
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
            if not lhs or not contracting:
                return 0.0
            k = math.prod(lhs[0][1][int(d)] for d in contracting.group(1).split(",") if d)
            return 2.0 * math.prod(_arrays(i.type)[0][1]) * k
        if i.op == "custom-call":
            estimate = _COST_ESTIMATE.search(i.attrs)
            return float(json.loads(estimate.group(1)).get("flops", 0)) if estimate else 0.0
        if i.op == "reduce" and _FROM_DOT.search(i.attrs):  # a small dot_general XLA wrote as multiply + reduce
            operand = _arrays(self.types.get(i.operands[0], ""))
            return 2.0 * math.prod(operand[0][1]) if operand else 0.0
        return 0.0

    def _convolution_flops(self, i: _Instruction) -> float:
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attrs)
        lhs_dims, rhs_dims = (_arrays(self.types.get(o, ""))[0][1] for o in i.operands[:2])
        out_dims = _arrays(i.type)[0][1]
        lhs_l, rhs_l, out_l = labels.groups()
        window = _window(re.search(r"window=\{([^}]*)\}", i.attrs), len(lhs_l) - 2)
        taps = 1
        for d in range(len(lhs_l) - 2):
            taps *= _valid_taps(lhs_dims[lhs_l.index(str(d))], out_dims[out_l.index(str(d))], **window[d])
        batch, features = out_dims[out_l.index("b")], out_dims[out_l.index("f")]
        return 2.0 * batch * features * rhs_dims[rhs_l.index("i")] * taps

    # ---- HBM bytes ------------------------------------------------------------------------------------------

    def _hbm_bytes(self, i: _Instruction) -> float:
        if i.op in _NO_TRAFFIC or i.op.endswith("-done"):
            return 0.0
        if i.op == "custom-call":
            estimate = _COST_ESTIMATE.search(i.attrs)
            if estimate:
                return float(json.loads(estimate.group(1)).get("bytes_accessed", 0))
        operands = [_bytes(self.types.get(o, ""), hbm_only=True) for o in i.operands]
        if i.op in ("dynamic-slice-start", "dynamic-update-slice-start"):  # a DMA: one side in HBM unless both are
            moved, direction = self.transfer(i)
            return moved if direction else 2 * moved
        if i.op == "copy-start":  # (destination, source, context): the source is the operand
            destination = i.type[1:].split(", ")[0]
            return sum(operands) + _bytes(destination, hbm_only=True)
        if i.op in _SLICING:
            return 2 * _bytes(i.type, hbm_only=True)
        if i.op in _IN_PLACE:
            return 2 * operands[_update_operand(i)]
        written = _bytes(i.type, hbm_only=True)
        if i.op != "fusion":
            return written + sum(operands)
        body = self._called(i)
        params = _parameters(body)
        read = 0.0
        for n, full in enumerate(operands):
            got = self._read(params[n], body, full) if n in params else None
            read += full if got is None else min(full, got)
        root_updates = [u for u in body[-1:] if u.op in _IN_PLACE and u.operands[0] in params.values()]
        if root_updates:  # in place: only the update is written
            written = _bytes(self.types.get(root_updates[0].operands[_update_operand(root_updates[0])], ""))
        return read + written

    def _called(self, fusion: _Instruction) -> list[_Instruction]:
        return self.computations.get(next((c for k, c in _CALLEES.findall(fusion.attrs) if k == "calls"), ""), [])

    def _read(self, value: str, body: list[_Instruction], full: float, depth: int = 0) -> float | None:
        """Bytes of `value` (a fused computation's parameter, `full` bytes) that the body reads: slices read
        what they take, an in-place dynamic-update-slice or scatter does not read its buffer, views and nested
        fusions are followed; any other use reads it all. None: the value only passes on to the body's result (as a
        view)."""
        if depth > 16:
            return full
        read, passes_on = 0.0, bool(body) and body[-1].name == value
        for u in (u for u in body if value in u.operands):
            if u.op in _SLICING and u.operands[0] == value:
                read += _bytes(u.type)
            elif u.op in _IN_PLACE and u.operands[0] == value:
                continue
            elif u.op in _VIEWS or u.op in _REMAPS or u.op == "fusion":
                inner = self._called(u) if u.op == "fusion" else None
                if inner is None:
                    r = self._read(u.name, body, full, depth + 1)
                else:
                    params = _parameters(inner)
                    r = 0.0
                    for n in (n for n, o in enumerate(u.operands) if o == value):
                        got = self._read(params.get(n, ""), inner, full, depth + 1)
                        r = self._read(u.name, body, full, depth + 1) if got is None else r + got
                if r is None:
                    passes_on = True
                else:
                    read += r
            else:
                return full
        return None if passes_on and read == 0 else read

    # ---- collectives and kernels ----------------------------------------------------------------------------

    def launches(self, comp: str) -> dict[str, Launch]:
        """The collectives that the ops of `comp` (a computation outside fusions) run, by op name. XLA:TPU writes
        a collective as the op itself (synchronous), as an -start / -done pair or async-start / async-done around
        a computation holding it, or fused: a reduce-scatter as an `all-reduce-scatter` fusion (an all-reduce and
        the slice each device keeps), and with async collective fusion as an `async-collective-start` fusion, the
        `async_collective_fusion` steps that advance it inside compute fusions, and an `async-collective-done`
        fusion (each of the three holds the collective: it is one launch, at the start). With SparseCore
        collective offload a collective runs in a computation of an async call (call-start / call-done,
        async_execution_thread="sparsecore")."""
        found: dict[str, Launch] = {}
        by_name = {i.name: i for i in self.computations.get(comp, [])}
        for i in self.computations.get(comp, []):
            base = i.op.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES:
                role = "start" if i.op.endswith("-start") else "done" if i.op.endswith("-done") else "sync"
                found[i.name] = Launch(i, i, base, role, self._operand_bytes(i))
                continue
            if i.op not in ("fusion", "async-start", "async-done", "call-start", "call-done"):
                continue
            callee = self.async_callee(i, by_name)
            inner = self._collective_in(callee)
            if inner is None:
                continue
            kind = inner.op.removesuffix("-start")
            if i.op in ("async-start", "call-start") or i.name.startswith("async-collective-start"):
                role = "start"
            elif i.op in ("async-done", "call-done") or i.name.startswith("async-collective-done"):
                role = "done"
            elif callee.startswith("async_collective_fusion"):
                role = "step"
            else:
                role = "sync"
                kind = "reduce-scatter" if callee.startswith("all-reduce-scatter") else kind
            found[i.name] = Launch(i, inner, kind, role, self._operand_bytes(inner))
        return found

    def async_callee(self, i: _Instruction, by_name: dict[str, _Instruction]) -> str:
        """The computation an async op runs: its own `calls=` / `to_apply=`, or for a call-done its call-start's."""
        if i.op == "call-done" and i.operands and i.operands[0] in by_name:
            i = by_name[i.operands[0]]
        return next((c for k, c in _CALLEES.findall(i.attrs) if k in ("calls", "to_apply")), "")

    def transfer(self, i: _Instruction) -> tuple[float, str | None]:
        """An async DMA (`_TRANSFERS`): the bytes it moves (a copy its source, a dynamic-slice the slice, a
        dynamic-update-slice the update) and its direction over the host link: "to host" (into host memory),
        "from host", or None (within HBM)."""
        source = self.types.get(i.operands[0], "") if i.operands else ""
        if i.op == "copy-start":  # ((destination, source, context)
            moved, into = _bytes(source), i.type[1:].split(", ")[0]
        elif i.op == "dynamic-update-slice-start":  # the update into operand 0
            moved, into = (_bytes(self.types.get(i.operands[1], "")) if len(i.operands) > 1 else 0.0), source
        else:  # dynamic-slice-start: ((operands), slice, context)
            arrays = _arrays(i.type)
            moved = _array_bytes(arrays[-2]) if len(arrays) > 1 else 0.0
            into = ""
        if _HOST_MEMORY.search(into):
            return moved, "to host"
        return moved, "from host" if _HOST_MEMORY.search(source) else None

    def _operand_bytes(self, i: _Instruction) -> float:
        return _bytes(self.types.get(i.operands[0], "")) if i.operands else 0.0

    def _collective_in(self, comp: str, depth: int = 0) -> _Instruction | None:
        """The first collective in `comp` or the computations it calls."""
        for i in self.computations.get(comp, []):
            if i.op.removesuffix("-start") in COLLECTIVES:
                return i
            for _, callee in _CALLEES.findall(i.attrs):
                found = self._collective_in(callee, depth + 1) if depth < 8 else None
                if found is not None:
                    return found
        return None

    def collectives(self) -> list[dict]:
        """[{op, count, bytes}]: executions per run and the result bytes of all of them per device (each launch
        once: a synchronous collective or the start of an asynchronous one)."""
        found: dict[str, list[float]] = {}
        for comp in self.computations:
            if comp in self.fused or comp in self.async_bodies:
                continue
            for launch in self.launches(comp).values():
                if launch.role not in ("sync", "start"):
                    continue
                row = found.setdefault(launch.collective.op.removesuffix("-start"), [0, 0])
                row[0] += self._times(comp)
                row[1] += self._times(comp) * launch.result_bytes
        return [{"op": op, "count": int(c), "bytes": int(b)} for op, (c, b) in sorted(found.items())]

    def op_flops(self, i: _Instruction) -> float:
        """An op's matrix FLOPs, a fusion's summed over the computations it calls."""
        if i.op != "fusion":
            return self._flops(i)
        return sum(self.op_flops(j) for j in self._called(i))

    def op_hbm_bytes(self, i: _Instruction) -> float:
        """An op's HBM bytes (module docstring), for an op outside fused computations."""
        return self._hbm_bytes(i)

    def pallas_kernels(self) -> int:
        return sum(1 for ins in self.computations.values() for i in ins if _is_kernel(i) and 'pallas_call"' in i.attrs)

    def uncosted_kernels(self) -> dict[str, int]:
        """Mosaic kernel launches per run that declare no cost estimate, by kernel name: their FLOPs count as 0
        (and their HBM bytes as their operands and results), so the step-time estimate leaves their compute out."""
        found: dict[str, int] = {}
        for comp, ins in self.computations.items():
            for i in ins:
                if _is_kernel(i) and not _COST_ESTIMATE.search(i.attrs):
                    name = re.sub(r"\.\d+$", "", i.name)
                    found[name] = found.get(name, 0) + self._times(comp)
        return found


def _is_kernel(i: _Instruction) -> bool:
    return i.op == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attrs


def _logical_lines(hlo_text: str) -> list[str]:
    """The module's lines with an instruction continued over several lines joined into one: after an instruction's
    first line, lines join it while its braces are open (a Pallas kernel's frontend_attributes can hold newlines,
    its backend_config, with the kernel's cost estimate, then follows on a later line), up to a computation's own
    header or closing line at the latest."""
    lines: list[str] = []
    depth = 0
    for line in hlo_text.splitlines():
        if depth > 0 and not _CLOSE.match(line) and not _header(line):
            lines[-1] += "\n" + line
            depth += line.count("{") - line.count("}")
            continue
        lines.append(line)
        depth = line.count("{") - line.count("}") if _INSTRUCTION.match(line) else 0
    return lines


def _header(line: str) -> re.Match | None:
    """A computation's header line (`%name (params) -> type {`), not an instruction."""
    m = _COMPUTATION.match(line)
    return m if m and "=" not in line.split("(")[0] else None


def _parameters(body: list[_Instruction]) -> dict[int, str]:
    """A computation's parameters by number."""
    return {int(p.args): p.name for p in body if p.op == "parameter"}


def memory_parts(stats) -> dict[str, int]:
    """Bytes per device a compiled program needs, from its memory_analysis(): arguments, temporaries, outputs not
    aliased to arguments, generated code, and their `total` (what train.py checks against a device and k2jax-aot
    against a chip's HBM)."""
    parts = {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
             "outputs_not_aliased": max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0),
             "generated_code": getattr(stats, "generated_code_size_in_bytes", 0)}
    return {**parts, "total": sum(parts.values())}


def _update_operand(i: _Instruction) -> int:
    """Which operand of an in-place op is the update: dynamic-update-slice(buffer, update, indices...),
    scatter(buffer, indices, updates)."""
    return 1 if i.op == "dynamic-update-slice" else len(i.operands) - 1


def _window(match, spatial: int) -> list[dict]:
    """Per spatial dimension: size, stride, pad_lo, lhs_dilate, rhs_dilate of a convolution's window attribute."""
    fields = dict(kv.split("=", 1) for kv in match.group(1).split()) if match else {}

    def ints(key: str, default: int) -> list[int]:
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * spatial

    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * spatial
    return [dict(size=s, stride=st, pad_lo=p, lhs_dilate=ld, rhs_dilate=rd) for s, st, p, ld, rd in
            zip(ints("size", 1), ints("stride", 1), pads, ints("lhs_dilate", 1), ints("rhs_dilate", 1))]


def _valid_taps(n_in: int, n_out: int, *, size: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """Summed over the output positions of one spatial dimension: the kernel taps that land on an input element
    (not on padding, not between lhs-dilated elements)."""
    o_N = np.arange(n_out, dtype=np.int64)[:, None]
    total = 0
    for start in range(0, size, 4096):  # taps in blocks: an output x taps table stays small
        k_K = np.arange(start, min(size, start + 4096), dtype=np.int64)[None, :]
        at = o_N * stride + k_K * rhs_dilate - pad_lo
        valid = (at >= 0) & (at <= (n_in - 1) * lhs_dilate) & (at % lhs_dilate == 0)
        total += int(valid.sum())
    return total


_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                          r"(?: \{([^}]*)\})?")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """iota(prod dims) reshaped to dims and transposed by perm: XLA's iota device list."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def replica_groups(attrs: str, devices: int) -> list[list[int]]:
    """The device groups of a collective (ids as the program numbers its partitions), in each of the forms XLA
    prints: explicit lists `{{0,1},{2,3}}` (`{}`: all devices), iota `[G,S]<=[dims]T(perm)`, and mesh axes
    `mesh['a'=2,'b'=4], device_ids=([dims]T(perm)) {'b'}` (the groups vary along the named axes); a
    collective-permute's source_target_pairs as two-device groups."""
    m = _IOTA_GROUPS.search(attrs)
    if m:
        return _iota(m.group(2), m.group(3)).reshape([int(d) for d in m.group(1).split(",")]).tolist()
    m = _MESH_GROUPS.search(attrs)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        sizes = [int(n) for _, n in axes]
        ids = (_iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes))).reshape(sizes)
        grouped = re.findall(r"'([^']+)'", m.group(4) or "")
        names = [a for a, _ in axes]
        order = [k for k, a in enumerate(names) if a not in grouped] + [names.index(a) for a in grouped]
        size = math.prod(sizes[names.index(a)] for a in grouped)
        return ids.transpose(order).reshape(-1, size).tolist()
    m = _PAIRS.search(attrs)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    m = _LIST_GROUPS.search(attrs)
    if m and re.search(r"\d", m.group(1)):
        return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(devices))]
