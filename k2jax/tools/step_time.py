"""A step's time predicted from its compiled program: compute, HBM traffic and communication on the slice's torus.

The optimized HLO of a scheduled program lists each computation's ops in the order the chip runs them. Walking it
(loops times their trip counts, a conditional as its slowest branch):

  an op         costs max(FLOPs / (peak x compute_efficiency), HBM bytes / bandwidth) (`HloCost`'s counts: a
                fusion's matrix FLOPs, its operands read and result written; a Pallas kernel's declared cost); it
                is "compute" or "memory" by which term is larger. compute_efficiency 1 is the roofline; the
                calibrated figure (k2jax.tools.aot.TPUS[...].calibrated_efficiency) is what a measured run implies.
  a collective  costs its bytes over the bandwidth its device group gets on the torus (`collective_seconds`). A
                synchronous one stops the chip for all of it (or for its own HBM traffic, if that is longer). An
                asynchronous one (an -start / -done pair, or XLA:TPU's async collective fusion) runs on the
                interconnect from its start, one after another, and the chip waits at its done only for what the
                ops scheduled in between did not cover: its exposed time.
  a DMA         (copy-start / copy-done, dynamic-slice-start / -done, dynamic-update-slice-start / -done) moves
                its bytes beside the ops, exposed likewise: at HBM bandwidth within HBM, at the host link's
                bandwidth to or from host memory (host offloading's S(5)), one transfer at a time each way.
  an async call (call-start / call-done on the SparseCore thread): a collective in it as above (SparseCore
                collective offload); other work (scatters, copies) costs its ops at the chip's rates, beside the
                TensorCore's, exposed at the call-done.

The estimate is the time at the end of the entry computation. It counts no launch overheads, no HBM contention
between an overlapped collective and compute, no ICI latency, and takes ragged all-to-alls at the size of what
each device sends (its whole send buffer). The model is as good as its inputs: the program's own schedule (what
XLA's latency-hiding scheduler overlapped) and the public chip and link figures of `k2jax.tools.aot.TPUS`.

    est = StepTime(HloCost(compiled.as_text()), Machine(...)); est.seconds, est.summary()
"""

from __future__ import annotations

import collections
import dataclasses
import re

from k2jax.tools.hlo_cost import _BRANCHES, _CALLEES, _TRANSFERS, HloCost, Launch, replica_groups

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DONES = tuple(op.replace("-start", "-done") for op in _TRANSFERS) + ("call-done",)  # where the chip waits for them


@dataclasses.dataclass(frozen=True)
class Machine:
    """One chip's rates and where each of the program's devices sits on the torus."""
    peak_flops: float                  # per chip, bf16
    hbm_bandwidth: float               # bytes/s per chip
    link_bandwidth: float              # bytes/s of one ICI link in one direction
    shape: tuple[int, ...]             # the slice's chips along each torus dimension
    wraps: tuple[bool, ...]            # whether each dimension has its wraparound links (a ring, else a line)
    coords: tuple[tuple[int, ...], ...]  # each device's torus coordinates, by the program's device number
    host_bandwidth: float              # bytes/s of one chip's link to its host's memory (PCIe), one direction
    compute_efficiency: float = 1.0    # the fraction of peak_flops a compute-bound op runs at (1: the roofline)


def collective_seconds(kind: str, nbytes: float, group: list[tuple[int, ...]], machine: Machine) -> float:
    """Time of one collective over a device group on the torus, bandwidth terms only. nbytes: all-gather the
    gathered result, reduce-scatter the input, all-reduce the buffer, all-to-all the buffer each device sends,
    collective-permute what each device sends. Per torus dimension a the group spans e chips (a ring of 2 links
    per direction across any cut where the dimension wraps, else a line of 1):

      all-gather / reduce-scatter   B (n-1)/n over the links into a chip: 2 per ring dimension, min(2, e-1) per line
      all-reduce                    a reduce-scatter then an all-gather: twice that
      all-to-all                    the bisection of the busiest dimension: half the devices send half of B across
                                    it, B e / (4 k W), k = 2 for a ring, 1 for a line
      collective-permute            B times the farthest pair's hops over one link

    (the ring / bisection arguments of "How to Scale Your Model", jax-ml.github.io/scaling-book, chapter 3)."""
    n = len(group)
    if n <= 1 or nbytes <= 0:
        return 0.0
    w = machine.link_bandwidth
    spans = []  # (extent, ring) of each dimension the group spans
    for a in range(len(machine.shape)):
        extent = len({c[a] for c in group})
        if extent > 1:
            spans.append((extent, machine.wraps[a] and extent == machine.shape[a]))
    if kind == "collective-permute":
        return nbytes * max(_hops(group[0], c, machine) for c in group[1:]) / w
    if kind in ("all-to-all", "ragged-all-to-all"):
        return max(nbytes * e / (4 * (2 if ring else 1) * w) for e, ring in spans)
    links = sum(2 if ring else min(2, e - 1) for e, ring in spans)
    one_way = nbytes * (n - 1) / n / (links * w)
    return 2 * one_way if kind == "all-reduce" else one_way


def _hops(a: tuple[int, ...], b: tuple[int, ...], machine: Machine) -> int:
    hops = 0
    for d, (x, y) in enumerate(zip(a, b)):
        step = abs(x - y)
        hops += min(step, machine.shape[d] - step) if machine.wraps[d] else step
    return hops


class StepTime:
    """The predicted time of one run of a compiled program (module docstring) and where it goes."""

    def __init__(self, cost: HloCost, machine: Machine):
        self.cost, self.machine = cost, machine
        self._memo: dict[str, tuple[float, collections.Counter]] = {}
        self.seconds, self.parts = self._walk(cost.entry)

    def _walk(self, comp: str, depth: int = 0) -> tuple[float, collections.Counter]:
        """Seconds of one run of `comp` and what they are made of: ("compute" | "memory", op label), ("exposed",
        collective kind | "copy" | "host transfer" | "sparsecore" | "async call"), ("collective", kind) for the
        interconnect's busy time, hidden or not, ("busy", "host transfer" | "sparsecore" | "async call") likewise for
        the host link and offloaded work (an async call off the SparseCore thread: "async call")."""
        if comp in self._memo:
            return self._memo[comp]
        cost, machine = self.cost, self.machine
        parts: collections.Counter = collections.Counter()
        t, ici_free, dma_free, async_free = 0.0, 0.0, 0.0, 0.0
        host_free = {"to host": 0.0, "from host": 0.0}
        pending: dict[str, tuple[float, str]] = {}  # an async op's name -> (when it ends, its kind)
        launches = cost.launches(comp)
        by_name = {i.name: i for i in cost.computations.get(comp, [])}
        for i in cost.computations.get(comp, []):
            if depth < 32 and i.op in ("while", "conditional", "call"):
                seconds, inner = self._nested(i, depth)
                t += seconds
                parts.update(inner)
                continue
            launch = launches.get(i.name)
            if launch is not None and launch.role != "step":
                busy = self._collective(launch)
                if launch.role == "sync":  # its own HBM traffic and the interconnect's, at once
                    own = self._op(i, parts)
                    t += max(own, busy)
                    parts["exposed", launch.kind] += max(busy - own, 0.0)
                    parts["collective", launch.kind] += busy
                elif launch.role == "start":
                    t += self._op(i, parts)
                    ici_free = max(t, ici_free) + busy
                    pending[i.name] = (ici_free, launch.kind)
                    parts["collective", launch.kind] += busy
                else:
                    t = self._wait(t, _started_by(i, by_name, pending), pending, parts) + self._op(i, parts)
                continue
            if i.op in _TRANSFERS:
                moved, direction = cost.transfer(i)
                if direction:  # over the host link (PCIe), one transfer at a time in each direction
                    host_free[direction] = max(t, host_free[direction]) + moved / machine.host_bandwidth
                    pending[i.name] = (host_free[direction], "host transfer")
                    parts["busy", "host transfer"] += moved / machine.host_bandwidth
                else:
                    dma_free = max(t, dma_free) + cost.op_hbm_bytes(i) / machine.hbm_bandwidth
                    pending[i.name] = (dma_free, "copy")
                continue
            if i.op == "call-start":  # an async call that runs no collective: its ops beside the TensorCore's
                offloaded, _ = self._walk(cost.async_callee(i, by_name), depth + 1)
                where = "sparsecore" if 'async_execution_thread="sparsecore"' in i.attrs else "async call"
                async_free = max(t, async_free) + offloaded
                pending[i.name] = (async_free, where)
                parts["busy", where] += offloaded
                continue
            if i.op in _DONES:
                t = self._wait(t, _started_by(i, by_name, pending), pending, parts)
                continue
            t += self._op(i, parts)
        for name in list(pending):  # what is still in flight when the computation ends
            t = self._wait(t, name, pending, parts)
        self._memo[comp] = (t, parts)
        return t, parts

    def _op(self, i, parts: collections.Counter) -> float:
        """An op's own time, max(FLOPs / (peak x compute_efficiency), HBM bytes / bandwidth), added to parts as
        compute or memory."""
        compute = self.cost.op_flops(i) / (self.machine.peak_flops * self.machine.compute_efficiency)
        memory = self.cost.op_hbm_bytes(i) / self.machine.hbm_bandwidth
        if compute or memory:
            parts["compute" if compute >= memory else "memory", _label(i)] += max(compute, memory)
        return max(compute, memory)

    def _nested(self, i, depth: int) -> tuple[float, collections.Counter]:
        callees = dict((k, c) for k, c in _CALLEES.findall(i.attrs))
        if i.op == "while":
            trips = self.cost.trip_count(i, list(callees.items()))
            body, body_parts = self._walk(callees.get("body", ""), depth + 1)
            cond, cond_parts = self._walk(callees.get("condition", ""), depth + 1)
            total = collections.Counter()
            for key, v in body_parts.items():
                total[key] += v * trips
            for key, v in cond_parts.items():
                total[key] += v * (trips + 1)
            return body * trips + cond * (trips + 1), total
        if i.op == "conditional":
            branches = [c.strip().lstrip("%") for g in _BRANCHES.findall(i.attrs) for c in g.split(",") if c.strip()]
            branches += [c for k, c in callees.items() if k in ("true_computation", "false_computation")]
            walked = [self._walk(b, depth + 1) for b in branches]
            return max(walked, key=lambda w: w[0]) if walked else (0.0, collections.Counter())
        return self._walk(callees.get("to_apply", callees.get("calls", "")), depth + 1)

    def _collective(self, launch: Launch) -> float:
        kind = launch.kind
        if kind == "reduce-scatter":
            nbytes = launch.operand_bytes
        elif kind in ("all-to-all", "ragged-all-to-all", "collective-permute"):
            nbytes = min(launch.operand_bytes, launch.result_bytes) or launch.result_bytes
        else:
            nbytes = launch.result_bytes
        groups = replica_groups(launch.collective.attrs, len(self.machine.coords))
        group = [self.machine.coords[d] for d in groups[0] if d < len(self.machine.coords)]
        return collective_seconds(kind, nbytes, group, self.machine)

    @staticmethod
    def _wait(t: float, name: str | None, pending: dict, parts: collections.Counter) -> float:
        if name is None or name not in pending:
            return t
        end, kind = pending.pop(name)
        if end > t:
            parts["exposed", kind] += end - t
            return end
        return t

    def summary(self, top: int = 5) -> dict:
        """Seconds by what they are spent on (compute, memory-bound ops, exposed communication per collective
        kind and exposed DMA, host transfers and SparseCore work, the interconnect's busy time per kind, the host
        link's and the SparseCore's) and the `top` costliest ops."""
        p = self.parts
        ops = collections.Counter()
        for (what, label), v in p.items():
            if what in ("compute", "memory"):
                ops[label] += v
        return {
            "compute_seconds": sum(v for (what, _), v in p.items() if what == "compute"),
            "memory_bound_seconds": sum(v for (what, _), v in p.items() if what == "memory"),
            "exposed_seconds": {k: v for (what, k), v in sorted(p.items()) if what == "exposed"},
            "collective_busy_seconds": {k: v for (what, k), v in sorted(p.items()) if what == "collective"},
            "offload_busy_seconds": {k: v for (what, k), v in sorted(p.items()) if what == "busy"},
            "top_ops": [{"op": label, "seconds": v} for label, v in ops.most_common(top)],
        }


def _started_by(done, by_name: dict, pending: dict, depth: int = 0) -> str | None:
    """The pending async op a done waits for: followed back through its operands (tuples, get-tuple-elements and
    the fusions that advance an async collective)."""
    for o in done.operands:
        if o in pending:
            return o
    if depth > 16:
        return None
    for o in done.operands:
        producer = by_name.get(o)
        if producer is not None:
            found = _started_by(producer, by_name, pending, depth + 1)
            if found is not None:
                return found
    return None


def _label(i) -> str:
    """What jax called an op (its op_name without the jit(...) prefix; ops of one name add up), else its HLO
    name."""
    m = _OP_NAME.search(i.attrs)
    return m.group(1).split("/", 1)[-1] if m else i.name
