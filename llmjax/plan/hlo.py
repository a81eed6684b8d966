"""A roofline over a compiled (optimized, scheduled) HLO module's text.

`compiled.cost_analysis()` cannot be read as a step time: on TPU its flops count a while
loop's body once (the layer scan runs it num_layers times), leave out custom calls (the
Mosaic splash kernel) and its `optimal_seconds` can be negative. This module walks the
module instead: every computation reached from ENTRY with the number of times it runs
(while loops: their trip count), and for each op that touches HBM (fusions, custom calls,
copies, ...) the bytes it reads and writes and the matmul FLOPs inside it; each op costs
max(flops / peak, bytes / HBM bandwidth). Collectives (all-gather, reduce-scatter,
all-reduce, all-to-all, collective-permute; across slices the megascale `send`s) are
listed with their group size and bytes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) +
                    r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute", "ragged-all-to-all")
# Ops that move no HBM data of their own (bookkeeping, or accounted for where they run).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "copy-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "send-done", "recv-done", "opt-barrier", "add-dependency", "domain", "slice-done"}
_NO_TRAFFIC = {"AllocateBuffer", "AsyncCollectiveStart", "AsyncCollectiveDone",
               "AssumeGatherIndicesInBound"}
_SLICERS = {"dynamic-slice", "slice", "gather"}


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO type: an array `bf16[4,128]{...}` or a tuple of them."""
    return sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
               for d, dims in _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # result type text
    opcode: str
    operands: list[str]
    attrs: str
    root: bool
    args: str = ""  # the text inside the op's parentheses (a parameter's number, a constant)


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instrs: list[Instr]
    types: dict[str, str]  # value name -> type text (parameters included)

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


def _parse_instr(line: str) -> Optional[Instr]:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:  # array type, possibly with a {layout}
        end = rest.index(" ") if " " in rest else len(rest)
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():close - 1])
    return Instr(m.group(2), type_text, op.group(1), operands, rest[close:], bool(m.group(1)),
                 rest[op.end():close - 1])


def parse_module(text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = Computation(h.group(2), bool(h.group(1)), [], {})
                for pname, ptype in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,]+)", h.group(3)):
                    current.types[pname] = ptype
            continue
        if line.rstrip() == "}":  # (a multi-line literal may start a line with "}" too)
            comps[current.name] = current
            current = None
            continue
        instr = _parse_instr(line)
        if instr:
            current.instrs.append(instr)
            current.types[instr.name] = instr.type
    return comps


def _called(instr: Instr, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)\}?", instr.attrs)
    return re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []


def _trip_count(instr: Instr, comps: dict[str, Computation]) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if known:
        return int(known.group(1))
    cond = comps.get((_called(instr, "condition") or [""])[0])
    if cond is not None:  # `i < N` with the counter starting at 0 (jax's scan / fori_loop)
        root = cond.root
        if root.opcode == "compare" and "direction=LT" in root.attrs:
            for operand in root.operands:
                const = next((i for i in cond.instrs if i.name == operand
                              and i.opcode == "constant"), None)
                if const is not None and re.fullmatch(r"\d+", const.args.strip()):
                    return int(const.args)
    return 1


def matmul_flops(instr: Instr, types: dict[str, str]) -> float:
    """FLOPs of one convolution or dot (2 per multiply-add)."""
    out = math.prod(_dims(instr.type))
    if instr.opcode == "convolution":
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
        rhs = _dims(types.get(instr.operands[1], "")) if len(instr.operands) > 1 else []
        lhs = _dims(types.get(instr.operands[0], ""))
        if not labels or not rhs or not lhs or "i" not in labels.group(2):
            return 0.0
        inner = rhs[labels.group(2).index("i")]
        return 2.0 * out * inner * _real_taps(instr.attrs, labels.group(1), labels.group(3),
                                              lhs, _dims(instr.type))
    if instr.opcode == "dot":
        lhs = _dims(types.get(instr.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
        inner = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * out * inner
    return 0.0


def ragged_dot_flops(instr: Instr) -> float:
    """FLOPs of a grouped matmul that XLA:TPU lowered to a Mosaic kernel (a custom call with
    `ragged_dot_tiling`: MoE experts): each of the m rows meets one group's [k, n] matrix, so
    2 m k n, with m the rows of its 2-D arrays and k, n the minor dims of the 3-D one."""
    if "ragged_dot_tiling" not in instr.attrs:
        return 0.0
    constraints = re.search(r"operand_layout_constraints=\{(.*?)\}, \w+=", instr.attrs)
    arrays = [(d, [int(x) for x in dims.split(",") if x]) for d, dims in
              _ARRAY.findall((constraints.group(1) if constraints else "") + " " + instr.type)]
    floats = [dims for d, dims in arrays if d in ("f32", "bf16", "f16", "f8e4m3fn", "f8e5m2")]
    grouped = [dims for dims in floats if len(dims) == 3]
    rows = [dims for dims in floats if len(dims) == 2]
    if len(grouped) != 1 or not rows:
        return 0.0
    return 2.0 * rows[0][0] * grouped[0][1] * grouped[0][2]


def _real_taps(attrs: str, lhs_labels: str, out_labels: str, lhs: list[int],
               out: list[int]) -> float:
    """Window taps per output element that land on real input (not padding, not the holes
    of an lhs dilation): XLA:TPU writes batched matmuls as convolutions with such windows."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    if not window:
        return 1.0
    fields = dict(re.findall(r"(\w+)=([0-9x_\-]+)", window.group(1)))
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    spatial = len(sizes)

    def per_dim(key: str, default: int) -> list[int]:
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * spatial
    strides, dilate = per_dim("stride", 1), per_dim("lhs_dilate", 1)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] \
        if "pad" in fields else [(0, 0)] * spatial
    total = 1.0
    for k in range(spatial):
        if str(k) not in lhs_labels or str(k) not in out_labels:
            continue  # a window over no dimension (size=1 on a 0-spatial dot)
        n = lhs[lhs_labels.index(str(k))]
        outs = out[out_labels.index(str(k))]
        pos = (np.arange(outs)[:, None] * strides[k] + np.arange(sizes[k])[None, :]
               - pads[k][0])
        real = (pos >= 0) & (pos <= (n - 1) * dilate[k]) & (pos % dilate[k] == 0)
        total *= real.sum() / max(outs, 1)
    return total


@dataclasses.dataclass
class Collective:
    kind: str
    group: int  # devices per replica group
    bytes: float  # result bytes per device, per execution
    count: int  # executions per step
    cross_slice: bool  # the group spans slices (DCN)

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution, ring algorithms."""
        n = self.group
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2.0 * (n - 1) / n * self.bytes
        if self.kind == "reduce-scatter":
            return (n - 1) * self.bytes  # result is 1/n of the input
        if self.kind in ("all-gather", "all-to-all", "ragged-all-to-all"):
            return (n - 1) / n * self.bytes
        return self.bytes  # collective-permute


@dataclasses.dataclass
class Roofline:
    flops: float = 0.0  # matmul FLOPs per device per step (custom calls excluded)
    hbm_bytes: float = 0.0  # bytes read + written by HBM-touching ops
    compute_seconds: float = 0.0  # sum over ops of max(flop time, byte time)
    bytes_bound_seconds: float = 0.0  # the part of it in ops limited by HBM bandwidth
    custom_calls: dict = dataclasses.field(default_factory=dict)  # target -> (count, bytes)
    collectives: list = dataclasses.field(default_factory=list)  # [Collective]


def _group_size(instr: Instr, num_devices: int) -> tuple[int, list[list[int]]]:
    """Devices per replica group, and the groups when listed or iota-given."""
    a = instr.attrs
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", a)
    if iota:
        g, s = int(iota.group(1)), int(iota.group(2))
        dims = [int(x) for x in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(x) for x in iota.group(4).split(",")])
        return s, ids.reshape(g, s).tolist()
    listed = re.search(r"replica_groups=\{(\{[0-9,]*\}(?:,\{[0-9,]*\})*)\}", a)
    if listed:
        groups = [[int(x) for x in grp.split(",") if x]
                  for grp in re.findall(r"\{([0-9,]*)\}", listed.group(1))]
        return (len(groups[0]) if groups and groups[0] else num_devices), groups
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", a)
    if mesh:  # mesh['axis_0'=2,...]: the group spans the axes listed
        return math.prod(int(x) for x in re.findall(r"=(\d+)", mesh.group(1))), []
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", a)
    if pairs:
        return 2, []
    return num_devices, []


def _in_flight(user: Instr, fused: Computation) -> bool:
    """A fused parameter's use that moves no data for the fusion's own work: a collective
    fused in (XLA:TPU's async_collective_fusion carries in-flight all-gathers through a
    matmul) or the root tuple passing it through unchanged."""
    return user.opcode.removesuffix("-start") in COLLECTIVES or (user is fused.root and
                                                                 user.opcode == "tuple")


def _operand_bytes(fused: Optional[Computation], instr: Instr, types: dict[str, str]) -> float:
    """Bytes an op reads: its operands, except that a fused parameter read only through
    (dynamic-)slices costs the slices, the buffer a dynamic-update-slice writes into in
    place costs nothing, and so do buffers of collectives carried through the fusion."""
    total = 0.0
    for index, name in enumerate(instr.operands):
        full = shape_bytes(types.get(name, ""))
        if fused is not None:
            pname = next((i.name for i in fused.instrs if i.opcode == "parameter"
                          and i.args.strip() == str(index)), None)
            if pname is not None:
                users = [u for u in fused.instrs if pname in u.operands]
                if users and all(_in_flight(u, fused) for u in users):
                    full = 0.0  # a collective's buffer passed through (async_collective_fusion)
                elif users and all(u.opcode in _SLICERS and u.operands[0] == pname
                                   for u in users):
                    full = sum(shape_bytes(u.type) for u in users)
                elif users and all(u.opcode == "dynamic-update-slice" and
                                   u.operands[0] == pname for u in users):
                    full = 0.0
        elif instr.opcode in _SLICERS and index == 0:
            full = shape_bytes(instr.type)
        elif instr.opcode == "dynamic-update-slice" and index == 0:
            full = 0.0
        total += full
    return total


def _output_bytes(fused: Optional[Computation], instr: Instr, types: dict[str, str]) -> float:
    """Bytes an op writes; an in-place dynamic-update-slice writes only its update."""
    def written(comp: Computation, node: Instr) -> float:
        if node.opcode == "parameter" or node.opcode.removesuffix("-start") in COLLECTIVES:
            return 0.0  # passed through, or a collective's result (its time is ICI's)
        if node.opcode == "dynamic-update-slice":
            return shape_bytes(comp.types.get(node.operands[1], ""))
        if node.opcode == "tuple":
            parts = [next((i for i in comp.instrs if i.name == o), None) for o in node.operands]
            return sum(written(comp, p) if p is not None else 0.0 for p in parts)
        return shape_bytes(node.type)
    if fused is not None:
        return written(fused, fused.root)
    if instr.opcode == "dynamic-update-slice":
        return shape_bytes(types.get(instr.operands[1], ""))
    return shape_bytes(instr.type)


def analyze(text: str, peak_flops: float, hbm_bandwidth: float,
            slice_of: Optional[list[int]] = None) -> Roofline:
    """The roofline of one device's program. `slice_of[i]`: the slice of partition i (a
    group whose members lie in different slices crosses DCN)."""
    comps = parse_module(text)
    entry = next(c for c in comps.values() if c.entry)
    num_devices = len(slice_of) if slice_of else 1
    # A multi-slice program is one slice's: its cross-slice (DCN) transfers are host
    # transfers to the megascale runtime (`send` ops), among this many slices.
    slices = len(set(slice_of)) if slice_of else 1
    out = Roofline()
    collectives: dict[tuple, Collective] = {}

    def flops_inside(comp: Computation, seen=()) -> float:
        total = 0.0
        for i in comp.instrs:
            if i.opcode in ("convolution", "dot"):
                total += matmul_flops(i, comp.types)
            for callee in _called(i, "calls"):
                if callee in comps and callee not in seen:
                    total += flops_inside(comps[callee], seen + (callee,))
        return total

    # XLA:TPU splits one collective over a chain of async_collective_fusions, each holding a
    # copy of the op with the same channel_id: one collective per (scope, channel).
    channels: set = set()

    def note_collectives(comp: Computation, times: int, seen=(), scope: str = "") -> None:
        for i in comp.instrs:
            kind = i.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                channel = re.search(r"channel_id=(\d+)", i.attrs)
                if channel and scope:
                    if (scope, channel.group(1)) in channels:
                        continue
                    channels.add((scope, channel.group(1)))
                size, groups = _group_size(i, num_devices)
                cross = bool(slice_of and groups and any(
                    len({slice_of[d] for d in g if d < len(slice_of)}) > 1 for g in groups))
                if slice_of and not groups and "mesh[" in i.attrs:
                    cross = False
                nbytes = shape_bytes(i.type) if not i.opcode.endswith("-start") else \
                    _start_bytes(i)
                key = (kind, size, nbytes, cross)
                c = collectives.setdefault(key, Collective(kind, size, nbytes, 0, cross))
                c.count += times
            for callee in _called(i, "calls"):
                if callee in comps and callee not in seen:
                    note_collectives(comps[callee], times, seen + (callee,), scope)

    def walk(comp: Computation, times: int) -> None:
        for i in comp.instrs:
            if i.opcode == "while":
                n = _trip_count(i, comps)
                for body in _called(i, "body"):
                    walk(comps[body], times * n)
                continue
            if i.opcode in ("call", "conditional"):
                for callee in _called(i, "to_apply") + _called(i, "calls") + \
                        _called(i, "branch_computations"):
                    if callee in comps:
                        walk(comps[callee], times)
                continue
            if i.opcode in _FREE or i.opcode == "recv":
                continue
            megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', i.attrs)
            if i.opcode == "send" and megascale:  # multi-slice: the DCN half of a collective
                kind = megascale.group(1).lower().replace("_", "-")
                nbytes = shape_bytes(_ARRAY.search(i.type).group(0))
                key = (kind, slices, nbytes, True)
                c = collectives.setdefault(key, Collective(kind, slices, nbytes, 0, True))
                c.count += times
                continue
            kind = i.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                note_collectives(Computation("", False, [i], comp.types), times, (), comp.name)
                continue
            fused = None
            if i.opcode == "fusion":
                fused = comps.get((_called(i, "calls") or [""])[0])
                if fused is not None and any(x.opcode in COLLECTIVES for x in fused.instrs):
                    # its time is the collective's (ICI/DCN)
                    note_collectives(fused, times, (), comp.name)
                    if not any(x.opcode in ("convolution", "dot") for x in fused.instrs):
                        continue  # a bare async collective; else a matmul fused with it
            if i.opcode in ("slice-start", "copy-start"):
                # Async slice / copy: (operand, result, ...) or (dest, source, context); each
                # reads and writes its result once (the tuple's other members alias buffers).
                arrays = _ARRAY.findall(i.type)
                one = arrays[1] if i.opcode == "slice-start" and len(arrays) > 1 else arrays[0]
                nbytes = 2 * DTYPE_BYTES[one[0]] * math.prod(int(x) for x in one[1].split(",")
                                                             if x)
                out.hbm_bytes += nbytes * times
                out.compute_seconds += nbytes / hbm_bandwidth * times
                out.bytes_bound_seconds += nbytes / hbm_bandwidth * times
                continue
            flops = matmul_flops(i, comp.types) + (flops_inside(fused) if fused else 0.0) + \
                (ragged_dot_flops(i) if i.opcode == "custom-call" else 0.0)
            nbytes = _operand_bytes(fused, i, comp.types) + _output_bytes(fused, i, comp.types)
            if i.opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
                name = target.group(1) if target else "?"
                if name in _NO_TRAFFIC:
                    continue
                count, b = out.custom_calls.get(name, (0, 0.0))
                out.custom_calls[name] = (count + times, b + nbytes * times)
            out.flops += flops * times
            out.hbm_bytes += nbytes * times
            flop_time, byte_time = flops / peak_flops, nbytes / hbm_bandwidth
            out.compute_seconds += max(flop_time, byte_time) * times
            if byte_time > flop_time:
                out.bytes_bound_seconds += byte_time * times

    walk(entry, 1)
    out.collectives = sorted(collectives.values(), key=lambda c: -c.wire_bytes * c.count)
    return out


def _start_bytes(instr: Instr) -> float:
    """An async *-start returns (operands..., results...): count the result half."""
    parts = _ARRAY.findall(instr.type)
    half = parts[len(parts) // 2:] if len(parts) > 1 else parts
    return sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
               for d, dims in half)
