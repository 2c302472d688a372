"""ATen ops and device->host synchronisations of one training step and one decode batch,
before/after in one run, counted on CPU.

What a GPU run pays per step in eager mode is, to first order, one kernel launch per ATen op
and one stall of the host per synchronisation (the host waits for the device to drain its
queue before it can read a value). Both can be counted on CPU: every op passes through a
``TorchDispatchMode``, and the ops that read a device value on the host are known by name.

Phases (paper-size model: ``ModelConfig`` defaults, d 256, 4 heads, ffn 1024, 1 encoder / 4
decoder layers; ``SidSpec((256,) * 4, 50)``; random weights, random left-padded histories):

- ``train``: one OCN step as the trainer runs it: ``build_objective`` (``DiffusionObjective``
  around ``DiffGRM``) forward, backward, a torch AdamW step (``foreach=True``, the default on
  CUDA) and the trainer's per-step loss bookkeeping (``float(loss.detach())``), on a probe batch
  of ``--batch`` samples. The step counted is the second (AdamW's lazy state exists by then).
- ``cpd``: ``recommend_batch`` (encode, CPD beam search, ``rank_items``) for ``--users`` users at
  ``--beam`` on a random catalogue of ``--items`` items with 4 x 256 codes.
- ``ar``: the same with the autoregressive decoder (``decoder="autoregressive"``, KV cache).
  Decode batches are counted after one warm-up batch (the catalogue's device tables exist).

Counted per phase: ATen ops (``project_gpu.OpCounter``), and host syncs: ops that force a
device->host sync on CUDA: ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``,
``bool(t)``, ``if t:``), ``nonzero`` / ``nonzero_static``, ``is_nonzero``, ``equal``,
``masked_select``, indexing or index assignment with a bool mask (``index`` / ``index_put_``),
``unique*``, ``bincount``, ``repeat_interleave`` with tensor repeats and no ``output_size``, and
copies to the host (``Tensor.cpu()``, ``.tolist()``, ``.numpy()`` of a device tensor,
``.to("cpu")``, ``copy_`` into a host tensor). On CPU those host copies dispatch nothing, so
they are caught by wrapping the ``Tensor`` methods during the measurement. Tensors count as
"on the device" unless made on the host: ``torch.from_numpy``, ``torch.tensor`` without a
device, ``.cpu()``, and AdamW's step counters (host tensors on CUDA unless capturable or
fused); a scalar read of such a tensor is a host read, not a sync, and is reported apart.
Separately, host->device copies (``h2d``): ``torch.tensor(..., device=)``, ``.to(device)`` of a
host tensor, non-scalar ``lift_fresh``. PyTorch makes a blocking (``non_blocking=False``) copy
with a stream synchronisation, so on CUDA these stall the host too.

Each sync is recorded with its call site (the innermost frames of ``diffgrm_dist`` and of this
script); the JSON and README list the top sites. ``--profile`` (default on) also records the
torch.profiler's count of ``aten::`` events, nested ones included (e.g. the ``nonzero`` inside a
bool-mask ``index``).

Before/after: ``--before COMMIT`` checks the commit out as a detached git worktree under /tmp
(``/tmp/diffgrm-<sha7>``, reused when it exists) and measures it in a subprocess whose
``PYTHONPATH`` is that worktree; the current tree is measured in another subprocess. The
measuring code calls only APIs present in both (optional keyword arguments are passed only
where the function's signature has them).

    python tools/bench_ops.py --before 49ba7a7        # writes results/ops/{ops.json,README.md}
    python tools/bench_ops.py                         # current tree only

CPU op counts approximate GPU kernel counts: a few ops decompose differently on CPU (dropout
is bernoulli + mul + div on CPU, one fused op on CUDA; SDPA picks a CPU kernel), and AdamW's
``foreach`` ops are one dispatch each on both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    ROOT,
    catalogue_module,
    device_string,
    git_info,
    package_info,
    package_module,
    run_isolated,
    write_json,
)
from project_gpu import OpCounter  # noqa: E402

THIS_FILE = str(Path(__file__).resolve())
SIZES = (256, 256, 256, 256)
PHASES = ("train", "cpd", "ar")
TOP_SITES = 12

# Ops that read a device value on the host whatever their arguments.
ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "nonzero_static", "is_nonzero", "equal", "masked_select",
               "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"}
TRACKER_CODE = {"__torch_dispatch__", "_frames", "_event", "count", "patched", "label"}
# Frames of the dispatch machinery, never named as the caller of an op.
SKIP_PARTS = ("torch/_ops.py", "torch/utils/_python_dispatch.py", "torch/_dynamo/", "torch/_compile.py")
PROFILED = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static", "aten::is_nonzero",
            "aten::index", "aten::index_put_", "aten::masked_select", "aten::_unique2", "aten::repeat_interleave",
            "aten::lift_fresh", "aten::copy_", "aten::_to_copy")


# --------------------------------------------------------------------------- the counter


def _is_host(x) -> bool:
    if isinstance(x, (list, tuple)):
        return bool(x) and all(_is_host(t) for t in x)
    return bool(getattr(x, "_ops_host", False))


def _tag(x, host: bool) -> None:
    if isinstance(x, (list, tuple)):
        for t in x:
            _tag(t, host)
    elif hasattr(x, "dim"):  # a tensor
        x._ops_host = host


class Tracker:
    """Counts ATen ops and sync / h2d events while ``counting``; tags tensors made on the host
    while ``patched`` is active (see the module docstring)."""

    def __init__(self, pkg_dir: str) -> None:
        self.pkg_dir = pkg_dir.rstrip("/") + "/"
        self.counting = False
        self.part: str | None = None  # explicit part label (training); else ``part_fn``
        self.part_fn = None
        self.in_factory = 0
        self._names: dict = {}
        self.reset()

    def reset(self) -> None:
        self.ops, self.by_op, self.by_part, self.by_func = 0, Counter(), Counter(), Counter()
        self.syncs, self.h2d, self.host_reads = Counter(), Counter(), Counter()
        self.syncs_by_part, self.h2d_by_part = Counter(), Counter()
        self.sites = {"sync": defaultdict(Counter), "h2d": defaultdict(Counter), "host": defaultdict(Counter)}

    # ------------------------------------------------------------------ frames
    def _label(self, f) -> str:
        fn = f.f_code.co_filename
        if fn.startswith(self.pkg_dir):
            rel = "diffgrm_dist/" + fn[len(self.pkg_dir):]
        elif fn == THIS_FILE:
            rel = "tools/bench_ops.py"
        else:
            rel = fn.split("site-packages/", 1)[-1]
        return f"{rel}:{f.f_lineno} {f.f_code.co_qualname}"

    def _frames(self):
        """(caller frame if it is not project code, project frames innermost first)."""
        f, caller, chain = sys._getframe(2), None, []
        while f is not None:
            code = f.f_code
            fn = code.co_filename
            if fn == THIS_FILE and (code.co_name.startswith("_hook") or code.co_name in TRACKER_CODE):
                pass
            elif fn.startswith(self.pkg_dir) or fn == THIS_FILE:
                chain.append(f)
            elif not chain and caller is None and not any(part in fn for part in SKIP_PARTS):
                caller = f
            f = f.f_back
        return caller, chain

    def _where(self, chain) -> str:
        if self.part is not None:
            return self.part
        return self.part_fn([f.f_code.co_qualname for f in chain]) if self.part_fn else "all"

    def _event(self, kind: str, label: str, caller=None, chain=None) -> None:
        if chain is None:
            caller, chain = self._frames()
        part = self._where(chain)
        site = [self._label(f) for f in chain[:4]]
        if caller is not None:
            site.insert(0, "via " + self._label(caller))
        site = " < ".join(site) or "?"
        self.sites[kind][site][label] += 1
        if kind == "sync":
            self.syncs[label] += 1
            self.syncs_by_part[part] += 1
        elif kind == "h2d":
            self.h2d[label] += 1
            self.h2d_by_part[part] += 1
        else:
            self.host_reads[label] += 1

    # ------------------------------------------------------------------ ATen ops
    def _hook_op(self, func, args, kwargs, out) -> None:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = (str(func), func.overloadpacket.__name__)
        full, packet = name
        host = _is_host(args[0]) if args else False
        if host:
            _tag(out, True)
        if not self.counting:
            return
        caller, chain = self._frames()
        self.ops += 1
        self.by_op[full] += 1
        self.by_part[self._where(chain)] += 1
        self.by_func[chain[0].f_code.co_qualname if chain else "?"] += 1
        kind = label = None
        if packet in ALWAYS_SYNC:
            kind, label = "sync", f"aten.{packet}"
        elif packet in INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                hasattr(i, "dtype") and i.dtype in (_torch().bool, _torch().uint8) for i in args[1]):
            kind, label = "sync", f"aten.{packet}[bool mask]"
        elif packet == "repeat_interleave" and kwargs.get("output_size") is None and hasattr(args[0], "dtype"):
            kind, label = "sync", "aten.repeat_interleave (no output_size)"
        elif packet == "copy_" and len(args) > 1:
            if _is_host(args[0]) and not _is_host(args[1]):
                kind, label = "sync", "aten.copy_ (device->host)"
            elif not _is_host(args[0]) and _is_host(args[1]):
                kind, label = "h2d", "aten.copy_ (host->device)"
        elif packet == "lift_fresh" and not self.in_factory and args[0].dim() > 0:
            kind, label = "h2d", "aten.lift_fresh (tensor from Python data)"
        if kind == "sync" and host and packet != "copy_":  # a read of a host tensor (copy_: decided above)
            kind = "host"
        if kind is not None:
            self._event(kind, label, caller, chain)

    # ------------------------------------------------------------------ Python-level hooks
    @contextlib.contextmanager
    def patched(self):
        """Wraps the host<->device entry points that dispatch no ATen op on CPU."""
        torch = _torch()
        tracker = self
        saved_t = {k: torch.Tensor.__dict__.get(k) for k in ("cpu", "tolist", "numpy", "to")}
        saved_m = {k: getattr(torch, k) for k in ("from_numpy", "tensor", "as_tensor")}
        orig_cpu, orig_tolist, orig_numpy, orig_to = (torch.Tensor.cpu, torch.Tensor.tolist,
                                                      torch.Tensor.numpy, torch.Tensor.to)

        def _hook_cpu(t, *a, **k):
            if tracker.counting and not _is_host(t):
                tracker._event("sync", "Tensor.cpu()")
            out = orig_cpu(t, *a, **k)
            out._ops_host = True  # on CPU ``out is t``: the tensor now stands for the host copy
            return out

        def _hook_tolist(t, *a, **k):
            if tracker.counting and not _is_host(t):
                tracker._event("sync", "Tensor.tolist()")
            return orig_tolist(t, *a, **k)

        def _hook_numpy(t, *a, **k):
            if tracker.counting and not _is_host(t):
                tracker._event("sync", "Tensor.numpy() of a device tensor")
            return orig_numpy(t, *a, **k)

        def _hook_to(t, *a, **k):
            target = k.get("device")
            for x in a:
                if isinstance(x, (str, torch.device)):
                    target = x
            out = orig_to(t, *a, **k)
            if target is None:
                return out
            if _is_host(t) and not _literal_cpu(target):
                if tracker.counting:
                    tracker._event("h2d", "Tensor.to(device) of a host tensor")
                out._ops_host = False
            elif _literal_cpu(target) and not _is_host(t):
                if tracker.counting:
                    tracker._event("sync", "Tensor.to('cpu')")
                out._ops_host = True
            return out

        def _hook_from_numpy(a):
            tracker.in_factory += 1  # under a dispatch mode from_numpy dispatches lift_fresh: not a copy
            try:
                out = saved_m["from_numpy"](a)
            finally:
                tracker.in_factory -= 1
            out._ops_host = True
            return out

        def _make_factory(orig, label):
            def _hook_factory(data, *a, **k):
                tracker.in_factory += 1
                try:
                    out = orig(data, *a, **k)
                finally:
                    tracker.in_factory -= 1
                device = k.get("device")
                if device is None or _literal_cpu(device):  # a host tensor on CUDA too
                    if not hasattr(data, "dim") or _is_host(data):
                        out._ops_host = True
                elif not hasattr(data, "dim") or _is_host(data):
                    if tracker.counting:
                        tracker._event("h2d", f"{label}(..., device=)")
                    out._ops_host = False
                return out
            return _hook_factory

        torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.to = (
            _hook_cpu, _hook_tolist, _hook_numpy, _hook_to)
        torch.from_numpy = _hook_from_numpy
        torch.tensor = _make_factory(saved_m["tensor"], "torch.tensor")
        torch.as_tensor = _make_factory(saved_m["as_tensor"], "torch.as_tensor")
        try:
            yield self
        finally:
            for k, v in saved_t.items():
                if v is None:
                    delattr(torch.Tensor, k)
                else:
                    setattr(torch.Tensor, k, v)
            for k, v in saved_m.items():
                setattr(torch, k, v)

    @contextlib.contextmanager
    def count(self, part_fn=None):
        """Counts the block: ops (``OpCounter``, and this tracker's own count, which must agree)."""
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                tracker._hook_op(func, args, kwargs, out)
                return out

        self.reset()
        self.part_fn = part_fn
        with OpCounter() as counter:
            with Mode():
                self.counting = True
                try:
                    yield self
                finally:
                    self.counting = False
        if counter.ops != self.ops:
            raise RuntimeError(f"OpCounter saw {counter.ops} ops, the tracker {self.ops}")

    @contextlib.contextmanager
    def label(self, part: str):
        self.part = part
        try:
            yield
        finally:
            self.part = None

    def result(self) -> dict:
        def sites(kind):
            rows = sorted(self.sites[kind].items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
            return [{"count": sum(ops.values()), "site": site, "ops": dict(ops)} for site, ops in rows]

        return {"ops": self.ops, "syncs": sum(self.syncs.values()), "h2d": sum(self.h2d.values()),
                "host_reads": sum(self.host_reads.values()),
                "syncs_by_op": dict(self.syncs.most_common()), "h2d_by_op": dict(self.h2d.most_common()),
                "host_reads_by_op": dict(self.host_reads.most_common()),
                "ops_by_part": dict(self.by_part), "syncs_by_part": dict(self.syncs_by_part),
                "h2d_by_part": dict(self.h2d_by_part),
                "ops_by_function": dict(self.by_func.most_common(15)),
                "ops_by_aten_op": dict(self.by_op.most_common(20)),
                "sync_sites": sites("sync"), "h2d_sites": sites("h2d"), "host_read_sites": sites("host")}


def _literal_cpu(device) -> bool:
    """``"cpu"`` written as a string names the host; a ``torch.device`` (``x.device``) names the
    device the run is on, which is the CPU here and the GPU there."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _torch():
    import torch

    return torch


def decode_part(qualnames: list[str]) -> str:
    """Which stage of ``recommend_batch`` an op belongs to, from its project call chain."""
    names = set(qualnames)
    if names & {"rank_items", "distinct_sids", "top_items", "first_distinct"}:
        return "rank items"
    if "DiffGRM.encode" in names:
        return "encode"
    if any(q.startswith("DiffGRM.") for q in qualnames):
        return "decoder network"
    if names & {"cpd", "ar_beam_search"}:
        return "beam search"
    return "other"


# --------------------------------------------------------------------------- the child


def call(fn, *args, **optional):
    """``fn(*args, **optional)`` keeping only the optional keywords ``fn``'s signature has."""
    params = inspect.signature(fn).parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return fn(*args, **{k: v for k, v in optional.items() if has_var_kw or k in params})


def profile_counts(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = Counter()
    for e in prof.events():
        if e.name.startswith("aten::"):
            names[e.name] += 1
    return {"aten_events": sum(names.values()), "selected": {n: names[n] for n in PROFILED if names[n]}}


def histories(gen, rows: int, width: int):
    torch = _torch()
    history = torch.randint(0, 256, (rows, width, len(SIZES)), generator=gen)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # left padded
    return history, mask


def train_phase(cfg: dict, tracker: Tracker) -> dict:
    torch = _torch()
    config, network = package_module("core.config"), package_module("model.network")
    ExperimentConfig, ModelConfig = config.ExperimentConfig, config.ModelConfig  # noqa: N806 (classes)
    DiffGRM, SidSpec = network.DiffGRM, network.SidSpec  # noqa: N806
    train_module = package_module("train.engine")
    build_objective = train_module.build_objective

    on_device = hasattr(train_module, "train_step")

    torch.manual_seed(0)
    exp = ExperimentConfig()
    model = DiffGRM(ModelConfig(), SidSpec(SIZES, cfg["history"]))
    objective = build_objective(model, exp).train()
    opt = torch.optim.AdamW(model.parameters(), lr=exp.train.lr, weight_decay=exp.train.weight_decay,
                            betas=(0.9, 0.999), eps=1e-8, foreach=True)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        history, mask = histories(gen, cfg["batch"], cfg["history"])
        batches.append((history, mask, torch.randint(0, 256, (cfg["batch"], len(SIZES)), generator=gen)))
    loss_sum = 0.0

    def step(batch, labelled: bool):
        nonlocal loss_sum
        part = tracker.label if labelled else (lambda _: contextlib.nullcontext())
        with part("forward"):
            loss = objective(*batch)
        with part("backward"):
            loss.backward()
        with part("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with part("bookkeeping"):
            if on_device:  # train.py since train_step: the epoch's loss summed on the device
                loss_sum = loss_sum + loss.detach()
            else:  # train.py at 49ba7a7: loss_sum += float(loss.detach()), a sync per step
                loss_sum += float(loss.detach())

    with tracker.patched():
        step(batches[0], False)  # warm-up: AdamW creates its state
        for state in opt.state.values():  # host tensors on CUDA (not capturable, not fused)
            state["step"]._ops_host = True
        torch.manual_seed(2)
        with tracker.count():
            step(batches[1], True)
        out = tracker.result()
        torch.manual_seed(2)
        start = time.perf_counter()
        step(batches[1], False)
        out["ms"] = 1e3 * (time.perf_counter() - start)
        if cfg["profile"]:
            torch.manual_seed(2)
            out["profiler"] = profile_counts(lambda: step(batches[1], False))
    out["setting"] = {"batch": cfg["batch"], "history": cfg["history"], "objective": exp.train.objective,
                      "optimizer": "torch.optim.AdamW(foreach=True)",
                      "parameters": sum(p.numel() for p in model.parameters())}
    return out


def decode_phase(cfg: dict, tracker: Tracker, decoder: str, catalogue) -> dict:
    torch = _torch()
    ModelConfig = package_module("core.config").ModelConfig  # noqa: N806 (classes)
    decode = package_module("decode.search")
    network = package_module("model.network")
    DiffGRM, SidSpec = network.DiffGRM, network.SidSpec  # noqa: N806

    torch.manual_seed(0)
    model = DiffGRM(ModelConfig(decoder=decoder), SidSpec(SIZES, cfg["history"])).eval()
    history, mask = histories(torch.Generator().manual_seed(3), cfg["users"], cfg["history"])

    # The GPU form of the catalogue's hash look-up where the tree has one (on a CPU the
    # shrinking form, with its syncs, is the default): count what a GPU would run.
    table = catalogue_module().KeyTable
    if "sync_free" in inspect.signature(table.lookup).parameters:
        table.lookup = functools.partialmethod(table.lookup, sync_free=True)

    if hasattr(decode, "SearchOptions"):  # the search options as one object (after the redesign)
        def run():
            return call(decode.recommend_batch, model, history, mask, catalogue,
                        decode.SearchOptions(cfg["beam"], decoder), cfg["k"], rules=("code_prob",))
    else:
        def run():
            return call(decode.recommend_batch, model, history, mask, catalogue, cfg["beam"], cfg["k"],
                        decoder=decoder, rules=("code_prob",))

    with torch.no_grad(), tracker.patched():
        run()  # warm-up: the catalogue's device tables
        with tracker.count(decode_part):
            ranked = run()
        out = tracker.result()
        start = time.perf_counter()
        run()
        out["ms"] = 1e3 * (time.perf_counter() - start)
        if cfg["profile"]:
            out["profiler"] = profile_counts(run)
    top = ranked["code_prob"].items
    out["top10_first_user"] = np.asarray(top[0]).tolist()
    out["setting"] = {"users": cfg["users"], "beam": cfg["beam"], "items": cfg["items"], "k": cfg["k"],
                      "history": cfg["history"], "decoder": decoder}
    return out


def child(cfg: dict) -> dict:
    torch = _torch()
    torch.set_num_threads(cfg["threads"])
    import diffgrm_dist

    tracker = Tracker(str(Path(diffgrm_dist.__file__).parent))
    phases, catalogue_s, catalogue_info = {}, None, None
    if "train" in cfg["phases"]:
        start = time.perf_counter()
        phases["train"] = train_phase(cfg, tracker)
        phases["train"]["phase_s"] = time.perf_counter() - start
    if {"cpd", "ar"} & set(cfg["phases"]):
        codes = np.random.default_rng(0).integers(0, 256, (cfg["items"], len(SIZES)), dtype=np.int64)
        index = catalogue_module()
        build = getattr(index, "build_catalogue", index.Catalogue)
        start = time.perf_counter()
        catalogue = build(codes, SIZES)
        catalogue_s = time.perf_counter() - start
        table = getattr(catalogue, "table", None)
        catalogue_info = {"class": type(catalogue).__name__, "items": cfg["items"],
                          "hash_probes": getattr(table, "probes", None)}  # KeyTable.lookup's probe rounds
        for name, decoder in (("cpd", "diffusion"), ("ar", "autoregressive")):
            if name in cfg["phases"]:
                start = time.perf_counter()
                phases[name] = decode_phase(cfg, tracker, decoder, catalogue)
                phases[name]["phase_s"] = time.perf_counter() - start
    return {"phases": phases, "torch": torch.__version__, "catalogue_s": catalogue_s,
            "catalogue": catalogue_info, **package_info()}


# --------------------------------------------------------------------------- the parent


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def worktree_for(commit: str) -> Path:
    """A detached worktree of ``commit`` under /tmp, created or reused."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    path = Path(f"/tmp/diffgrm-{sha[:7]}")
    if path.exists():
        head = git("rev-parse", "HEAD", cwd=path)
        if head != sha:
            raise SystemExit(f"{path} exists at {head[:7]}, not {sha[:7]}: remove it (git worktree remove {path})")
        if git("status", "--porcelain", "--", "diffgrm_dist", cwd=path):
            raise SystemExit(f"{path}: diffgrm_dist has local changes; it would not measure {sha[:7]}")
        return path
    git("worktree", "prune")  # a worktree whose folder /tmp lost
    git("worktree", "add", "--detach", str(path), sha)
    return path


PART_ORDER = {"train": ("forward", "backward", "optimizer", "bookkeeping"),
              "cpd": ("encode", "decoder network", "beam search", "rank items", "other"),
              "ar": ("encode", "decoder network", "beam search", "rank items", "other")}


def phase_title(name: str, r: dict) -> str:
    s = r["setting"]
    if name == "train":
        return f"train step (OCN, {s['batch']} samples)"
    return f"{'CPD' if name == 'cpd' else 'AR'} batch ({s['users']} users, beam {s['beam']})"


def table_rows(before: dict | None, after: dict) -> list[list[str]]:
    def ratio(a, b):
        return "-" if b is None else ("=" if a == b else (f"{a / b:.2f}x" if b else "new"))

    rows = []
    for name, r in after["phases"].items():
        b = before["phases"].get(name) if before else None
        keys = [(phase_title(name, r), None)] + [(f"  {p}", p) for p in PART_ORDER[name]
                                                  if r["ops_by_part"].get(p) or (b and b["ops_by_part"].get(p))]
        for title, part in keys:
            def get(x, field):
                if x is None:
                    return None
                return x[field] if part is None else x[f"{field}_by_part"].get(part, 0)
            ops_a, ops_b = get(r, "ops"), get(b, "ops")
            sy_a, sy_b = get(r, "syncs"), get(b, "syncs")
            h_a, h_b = get(r, "h2d"), get(b, "h2d")
            ms = (f"{b['ms']:.0f} / {r['ms']:.0f}" if b else f"{r['ms']:.0f}") if part is None else ""
            rows.append([title, "-" if ops_b is None else f"{ops_b:,}", f"{ops_a:,}", ratio(ops_a, ops_b),
                         "-" if sy_b is None else str(sy_b), str(sy_a), ratio(sy_a, sy_b),
                         "-" if h_b is None else str(h_b), str(h_a), ms])
    return rows


HEADER = ["phase", "ops before", "ops after", "ops ratio", "syncs before", "syncs after", "syncs ratio",
          "h2d before", "h2d after", "ms before / after"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(HEADER))
    for r in rows:
        print(fmt(r))


def markdown(payload: dict, rows: list[list[str]]) -> str:
    before, after = payload.get("before"), payload["after"]

    def side(s: dict) -> str:
        changed = s["git"]["changed_package_files"]
        return (f"`{s['git']['tree']}` @ {(s['git']['commit'] or '?')[:7]}"
                + (f" (+{changed} changed diffgrm_dist files)" if changed else ""))

    lines = ["# ATen ops and host syncs per step / decode batch (counted on CPU)", "",
             f"Generated by `{payload['command']}` on {payload['device']}; the measuring processes ran "
             f"{payload['settings']['threads']} torch thread(s) (counts do not depend on it). Same numbers on "
             "every run (seeded); random weights, histories and catalogue "
             f"({payload['settings']['items']:,} items, 4 x 256 codes; its hash table needs "
             f"{(after.get('catalogue') or {}).get('hash_probes')} probe rounds).", "",
             f"- after: {side(after)}"]
    if before:
        lines.append(f"- before: {side(before)}")
    lines += ["", "Ops: ATen ops dispatched (~ GPU kernels in eager mode). Syncs: device->host "
              "synchronisations they would cost on CUDA (`.item()`/`float()`/`if t:`, `nonzero`, bool-mask "
              "indexing, `unique`, `.cpu()`/`.tolist()`, ...). h2d: blocking host->device copies "
              "(`torch.tensor(..., device=)`, `.to(device)` of a host tensor), which also stall the host. "
              "ms: wall clock on this CPU, uninstrumented, for orientation only. "
              "See the docstring of `tools/bench_ops.py` for the exact rules. The after side counts the "
              "catalogue's hash look-up in its GPU form (`KeyTable.lookup(sync_free=True)`, the default on "
              "CUDA; on a CPU the shrinking form, which syncs, stays the default because it is faster there); "
              "the train step's bookkeeping is the loop's since `train_step` (loss summed on the device).", "",
              "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("  ", "&nbsp;&nbsp;") for c in r) + " |" for r in rows]
    for name, r in after["phases"].items():
        b = before["phases"].get(name) if before else None
        lines += ["", f"## {phase_title(name, r)}: syncs by op", "", "| op | before | after |", "|---|---|---|"]
        for op in sorted(set(r["syncs_by_op"]) | set(b["syncs_by_op"] if b else ())):
            lines.append(f"| `{op}` | {b['syncs_by_op'].get(op, 0) if b else '-'} | {r['syncs_by_op'].get(op, 0)} |")
        if r["h2d_by_op"] or (b and b["h2d_by_op"]):
            for op in sorted(set(r["h2d_by_op"]) | set(b["h2d_by_op"] if b else ())):
                lines.append(f"| h2d: `{op}` | {b['h2d_by_op'].get(op, 0) if b else '-'} | "
                             f"{r['h2d_by_op'].get(op, 0)} |")
        if r["host_reads"]:
            lines.append(f"| (not syncs) host-tensor scalar reads | {b['host_reads'] if b else '-'} | "
                         f"{r['host_reads']} |")
        prof_b, prof_a = (b or {}).get("profiler"), r.get("profiler")
        if prof_a:
            lines += ["", f"torch.profiler `aten::` events, nested ones included: "
                      f"{prof_b['aten_events'] if prof_b else '-'} before, {prof_a['aten_events']} after; nested "
                      f"`aten::nonzero` (bool masks' hidden ones included): "
                      f"{prof_b['selected'].get('aten::nonzero', 0) if prof_b else '-'} before, "
                      f"{prof_a['selected'].get('aten::nonzero', 0)} after."]
        if b and "top10_first_user" in r:
            lines.append(f"Same top-10 items for the first user before and after: "
                         f"{b.get('top10_first_user') == r['top10_first_user']}.")
        lines += ["", "Top sync sites (after; innermost first):", ""]
        for s in r["sync_sites"][:8]:
            ops = ", ".join(f"{k} x{v}" for k, v in s["ops"].items())
            lines.append(f"- {s['count']}: `{s['site']}` ({ops})")
    lines += ["", "Caveats: CPU op counts approximate GPU kernel counts (dropout decomposes into 3 ops on "
              "CPU, 1 on CUDA; SDPA picks a CPU kernel); AdamW runs with `foreach=True` (the CUDA default) and "
              "its step counters are host tensors, so their `.item()` reads are listed apart, not as syncs; "
              "`.to(device)` of a device tensor is taken as a no-op and `.to('cpu')` is recognised only with "
              "the literal string.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="", help="commit for the 'before' columns (a worktree under /tmp)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--batch", type=int, default=64, help="training samples in the probe batch")
    parser.add_argument("--history", type=int, default=50, help="max_history (histories are padded to it)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--beam", type=int, default=256)
    parser.add_argument("--items", type=int, default=12_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the measuring processes (counts do not depend on it; on a "
                             "shared 2-core machine 2 threads ran a training step 7x slower than 1)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the torch.profiler event counts")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ops")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(child(json.loads(args.one))))
        return

    cfg = {k: getattr(args, k) for k in ("phases", "batch", "history", "users", "beam", "items", "k", "profile",
                                         "threads")}
    command = "python tools/bench_ops.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    start = time.perf_counter()
    before = None
    if args.before:
        tree = worktree_for(args.before)
        print(f"before: {args.before} in {tree}", flush=True)
        before = {**run_isolated(__file__, json.dumps(cfg), tree=tree), "git": git_info(tree)}
    print("after: the current tree", flush=True)
    after = {**run_isolated(__file__, json.dumps(cfg)), "git": git_info(ROOT)}
    rows = table_rows(before, after)
    print()
    print_table(rows)
    for name, r in after["phases"].items():
        print(f"\n{phase_title(name, r)}: syncs by op (after): {r['syncs_by_op']}; h2d: {r['h2d_by_op']}")
        if before and name in before["phases"]:
            print(f"  before: {before['phases'][name]['syncs_by_op']}; h2d: {before['phases'][name]['h2d_by_op']}")
            same = before["phases"][name].get("top10_first_user") == r.get("top10_first_user")
            if "top10_first_user" in r:
                print(f"  same top-10 items for the first user before and after: {same}")
        for s in r["sync_sites"][:6]:
            print(f"  {s['count']:>4}  {s['site']}  {dict(s['ops'])}")
    payload = {"benchmark": "ops", "command": command, "device": device_string(), "settings": cfg,
               "seconds": time.perf_counter() - start, "before": before, "after": after}
    out = write_json(args.out / "ops.json", payload)
    (args.out / "README.md").write_text(markdown(payload, rows))
    print(f"\nwrote {out} and {args.out / 'README.md'} ({payload['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
