"""Tensor parallelism (Megatron style) over torch.distributed: one model across N ranks.

A transform on a built model, like int8 (quantize.py): rank 0 loads the model as usual (any dtype, a
precision plan included), cuts it into N shards and sends ranks 1..N-1 theirs over torch.distributed,
so the other ranks need neither the model files nor a calibration run. Per layer:
    QKV      column-parallel by heads: rank r keeps its query heads and the KV heads they read
             (fused [q heads | kv heads | kv heads]); attention runs on those heads only
    O        row-parallel: the rows that multiply rank r's heads; partial sums, one all-reduce
    up       column-parallel (fused gate|up: the same column range of both halves)
    down     row-parallel, one all-reduce
    embedding and LM head by vocabulary: each rank looks up (or scores) its own vocabulary range;
             lookups are all-reduced, logits all-gathered
Row-parallel biases stay on rank 0's shard only, so the all-reduced sum carries them once. In the
encoder the residual + LayerNorm (+ int8 quantization for the next GEMM) epilogue of O and fc2 runs
after the all-reduce. An int8 row-parallel shard quantizes its own activation columns per token (a
finer scale than one process's, so int8 results are close to, not equal to, the single-process ones).
The decoder's KV cache lives on each rank with its KV heads only; a model with fewer KV heads than
ranks (and N a multiple of them) gives each rank a copy of the one KV head its query heads read.

Control: rank 0 owns everything but the arithmetic. Before each forward it broadcasts the batch's
metadata (a fixed int64 header, then the flat int64 fields); ranks > 0 wait in `run_worker`, run the
same forward with the same code and take part in its collectives. The process group has a timeout,
idle periods are bridged by pings, and a watcher sees spawned workers exit, so a dead or stuck rank
becomes a `RankFailure` on rank 0 (the engines turn it into death: /health answers 503 and `serve`
stops) and never a hang. Workers leave on a stop message, a failed collective, or their parent's exit.

Ranks start either from `start` (this process is rank 0; ranks 1..N-1 are spawned with
torch.multiprocessing on this machine, rendezvous on a free local port) or under torchrun (env://
rendezvous, any number of machines): rank 0 runs the server and the others call `run_worker_from_env`.
Backend: gloo; the ranks are CPU processes (`start` refuses a CUDA model). One tensor-parallel model
per process at a time (it owns the default process group).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import multiprocessing.connection
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from .errors import ModelLoadError, TurboServeError

log = logging.getLogger("turboserve")

DEFAULT_TIMEOUT = 60.0          # seconds a collective may wait for the other ranks

# message kinds (the first int64 of the header)
_STOP, _PING, _ENCODE, _CACHE, _DECODE = range(5)
_HEADER = 32                    # int64s: kind, tensor count, scalar count, then the sizes and scalars


class RankFailure(TurboServeError):
    """A rank of the tensor-parallel group died, hung past the timeout, or fell out of step."""


# ---------------------------------------------------------------------- the group, as model code sees it
class TPGroup:
    """This process's place in the group and the collectives model code calls. Time spent in each
    kind of collective is counted (`comm`), waits for slower ranks included."""

    def __init__(self, rank: int, world: int, vocab: int = 0):
        self.rank, self.world = rank, world
        self.vocab = vocab                    # rows of the full embedding (set when the model is sharded)
        self.comm: dict[str, list] = {}       # op -> [seconds, calls]

    def _count(self, op: str, start: float) -> None:
        c = self.comm.setdefault(op, [0.0, 0])
        c[0] += time.perf_counter() - start
        c[1] += 1

    def reset_counters(self) -> None:
        self.comm = {}

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        s = time.perf_counter()
        dist.all_reduce(t)
        self._count("all_reduce", s)
        return t

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab // self.world)

    def embedding(self, shard: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a vocabulary-sharded embedding: each rank looks up the ids in its own range, the
        others read zeros, and the all-reduce puts every row together."""
        start = self.rank * self.vocab_per_rank
        local = ids - start
        inside = (local >= 0) & (local < shard.shape[0])
        out = torch.embedding(shard, local.clamp(0, max(shard.shape[0] - 1, 0)))
        out.masked_fill_(~inside[:, None], 0)
        return self.all_reduce(out)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, this rank's vocabulary range] -> [R, vocab]: all ranks' logits side by side."""
        s = time.perf_counter()
        per = self.vocab_per_rank
        if logits.shape[1] < per:             # the last range may be shorter
            logits = torch.nn.functional.pad(logits, (0, per - logits.shape[1]))
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(parts, logits.contiguous())
        self._count("all_gather", s)
        return torch.cat(parts, dim=1)[:, :self.vocab]

    def local_heads(self, heads: int, kv_heads: int) -> tuple[int, int]:
        """(query heads, KV heads) on one rank."""
        return heads // self.world, max(1, kv_heads // self.world)


# ---------------------------------------------------------------------- shard helpers
def _range(n: int, rank: int, world: int, offset: int = 0) -> torch.Tensor:
    """Rank's equal share of n consecutive indices, starting at `offset`."""
    per = n // world
    return torch.arange(offset + rank * per, offset + (rank + 1) * per)


# How the linears of ops/cpu.py hold their tensors: attribute -> the axis that runs over output
# features (column-parallel slices it) or over input features (row-parallel slices it).
_OUT_AXIS = {"weight_t": 1, "weight_q": 1, "weight_scale": 0, "bias": 0}
_IN_AXIS = {"weight_t": 0, "weight_q": 0, "inv_smooth": 0}


def _take(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(axis, index).contiguous()     # a copy: its own storage, pickled alone


def column_shard(linear, index: torch.Tensor):
    """The linear restricted to output features `index` (column-parallel: input replicated)."""
    new = copy.copy(linear)
    for attr, axis in _OUT_AXIS.items():
        t = getattr(linear, attr, None)
        if t is not None:
            setattr(new, attr, _take(t, axis, index))
    new.out_features = len(index)
    _resliced(new)
    return new


def row_shard(linear, index: torch.Tensor, keep_bias: bool):
    """The linear restricted to input features `index` (row-parallel: its output is a partial sum).
    The bias stays on one rank only (`keep_bias`), so the all-reduced sum adds it once."""
    new = copy.copy(linear)
    for attr, axis in _IN_AXIS.items():
        t = getattr(linear, attr, None)
        if t is not None:
            setattr(new, attr, _take(t, axis, index))
    if not keep_bias and linear.bias is not None:
        # the int8 epilogue always adds a bias vector; the dense GEMM simply runs without one
        new.bias = torch.zeros_like(linear.bias) if linear.takes_int8 else None
    new.in_features = len(index)
    _resliced(new)
    return new


def _resliced(linear) -> None:
    """Let a linear re-derive what it keeps besides the sliced tensors (Int8Linear's packed copy)."""
    hook = getattr(linear, "resliced", None)
    if hook is not None:
        hook()


def qkv_index(heads: int, kv_heads: int, head_dim: int, rank: int, world: int) -> torch.Tensor:
    """Output features of rank's share of a fused [q heads | k heads | v heads] projection: its
    query heads and the KV heads they read (a shared copy when there are fewer KV heads than ranks)."""
    q = _range(heads * head_dim, rank, world)
    if kv_heads >= world:
        kv = _range(kv_heads * head_dim, rank, world)
    else:
        h = rank // (world // kv_heads)
        kv = torch.arange(h * head_dim, (h + 1) * head_dim)
    return torch.cat([q, heads * head_dim + kv, (heads + kv_heads) * head_dim + kv])


def check_shardable(model, world: int) -> None:
    """Raise ModelLoadError, naming the counts, when `model` cannot be cut into `world` shards."""
    if world < 1:
        raise ModelLoadError(f"--tensor-parallel must be at least 1, not {world}")
    model = getattr(model, "decoder", model)                    # a pre-norm encoder: its decoder trunk's sizes
    kv = getattr(model, "num_kv_heads", model.num_heads)       # decoders with grouped-query attention
    bad = []
    if model.num_heads % world:
        bad.append(f"{model.num_heads} attention heads")
    if kv != model.num_heads and kv % world and world % kv:
        bad.append(f"{kv} KV heads (nor does {world} divide by them)")
    if model.intermediate % world:
        bad.append(f"an FFN width of {model.intermediate}")
    if bad:
        raise ModelLoadError(f"tensor parallelism over {world} ranks needs the model's sizes to divide by {world}; "
                             f"it has {' and '.join(bad)}")


def _vocab_rows(t: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    per = tp.vocab_per_rank
    return t[tp.rank * per:(tp.rank + 1) * per].clone()


def shard_encoder(model, tp: TPGroup):
    """Rank `tp.rank`'s shard of an EncoderModel (a new object; `model` is left whole)."""
    H, I, r, n = model.hidden, model.intermediate, tp.rank, tp.world
    heads = _range(H, r, n)
    qkv = torch.cat([heads, H + heads, 2 * H + heads])
    ffn = _range(I, r, n)
    shard = copy.copy(model)
    shard.layers = [dataclasses.replace(
        layer, qkv=column_shard(layer.qkv, qkv), o=row_shard(layer.o, heads, r == 0),
        fc1=column_shard(layer.fc1, ffn), fc2=row_shard(layer.fc2, ffn, r == 0)) for layer in model.layers]
    tp.vocab = model.word_emb.shape[0]
    shard.word_emb = _vocab_rows(model.word_emb, tp)
    shard.tp = tp
    return shard


def shard_decoder(model, tp: TPGroup):
    """Rank `tp.rank`'s shard of a DecoderModel (a new object; `model` is left whole)."""
    r, n, d = tp.rank, tp.world, model.head_dim
    qkv = qkv_index(model.num_heads, model.num_kv_heads, d, r, n)
    heads = _range(model.num_heads * d, r, n)
    I = model.intermediate
    ffn = _range(I, r, n)
    up = torch.cat([ffn, I + ffn]) if model.spec.gated_mlp else ffn
    shard = copy.copy(model)
    shard.layers = [dataclasses.replace(
        layer, qkv=column_shard(layer.qkv, qkv), o=row_shard(layer.o, heads, r == 0),
        up=column_shard(layer.up, up), down=row_shard(layer.down, ffn, r == 0)) for layer in model.layers]
    tp.vocab = model.vocab_size
    tied = model.lm_head is not None and model.lm_head.data_ptr() == model.word_emb.data_ptr()
    shard.word_emb = _vocab_rows(model.word_emb, tp)
    if model.lm_head_int8 is not None:
        per = tp.vocab_per_rank
        shard.lm_head_int8 = column_shard(model.lm_head_int8, torch.arange(r * per, min((r + 1) * per, model.vocab_size)))
    elif model.lm_head is not None:                        # none in a pre-norm encoder's trunk
        shard.lm_head = shard.word_emb if tied else _vocab_rows(model.lm_head, tp)
    shard.tp = tp
    return shard


def shard_prenorm(model, tp: TPGroup):
    """Rank `tp.rank`'s shard of a PreNormEncoderModel (ModernBERT, EmbeddingGemma, a decoder as an
    embedding model): its decoder trunk's shard, with a scratch cache of its own KV heads. The
    classifier head, if any, runs on rank 0 after the forward pass."""
    shard = copy.copy(model)
    shard.decoder = shard_decoder(model.decoder, tp)
    shard._cache, shard._cache_blocks = None, 0
    shard.tp = tp
    return shard


# ---------------------------------------------------------------------- wire format of one step
def _packed_to_wire(batch) -> tuple[list[torch.Tensor], list[int]]:
    return ([batch.input_ids, batch.positions, batch.token_types, batch.cu_tensor, batch.longest_first],
            [batch.max_len])


def _packed_from_wire(tensors, scalars):
    from .packing import PackedBatch
    ids, pos, types, cu, order = tensors
    return PackedBatch(ids, pos, types, cu.tolist(), scalars[0], cu, order)


def _step_to_wire(step) -> tuple[list[torch.Tensor], list[int]]:
    return ([step.input_ids, step.positions, step.cu_q, step.ctx_len, step.block_tables, step.slot_blocks,
             step.slot_offsets, step.logit_rows], [step.max_ctx, step.block_tables.shape[1]])


def _step_from_wire(tensors, scalars):
    from .decoder import StepBatch
    ids, pos, cu, ctx, tables, blocks, offsets, rows = tensors
    return StepBatch(ids, pos, cu, ctx, tables.view(-1, scalars[1]).to(torch.int32), blocks, offsets, rows,
                     scalars[0])


def _send(kind: int, tensors: list[torch.Tensor], scalars: list[int], tp: TPGroup) -> None:
    s = time.perf_counter()
    header = torch.zeros(_HEADER, dtype=torch.int64)
    fields = [kind, len(tensors), len(scalars)] + [t.numel() for t in tensors] + list(scalars)
    header[:len(fields)] = torch.tensor(fields, dtype=torch.int64)
    dist.broadcast(header, 0)
    if tensors:
        dist.broadcast(torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]), 0)
    tp._count("broadcast", s)


def _receive() -> tuple[int, list[torch.Tensor], list[int]]:
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, 0)
    kind, nt, ns = header[:3].tolist()
    sizes = header[3:3 + nt].tolist()
    scalars = header[3 + nt:3 + nt + ns].tolist()
    tensors = []
    if nt:
        flat = torch.empty(sum(sizes), dtype=torch.int64)
        dist.broadcast(flat, 0)
        tensors = list(flat.split(sizes))
    return kind, tensors, scalars


# ---------------------------------------------------------------------- rank 0
class Leader:
    """Rank 0's handle on the group: sends each step, keeps idle workers alive, watches them, stops them."""

    def __init__(self, tp: TPGroup, processes: list, timeout: float):
        self.tp, self.processes, self.timeout = tp, processes, timeout
        self.failed: BaseException | None = None
        self._lock = threading.Lock()            # one message (and its forward) at a time
        self._state_lock = threading.Lock()      # failed + callbacks
        self._callbacks: list = []
        self._closing = threading.Event()
        self._last = time.monotonic()
        threading.Thread(target=self._keepalive, name="turboserve-tp-ping", daemon=True).start()
        if processes:
            threading.Thread(target=self._watch, name="turboserve-tp-watch", daemon=True).start()

    def run(self, kind: int, wire: tuple[list, list], compute):
        """Broadcast one message, then run this rank's part of it (`compute()`), as one unit: any
        error leaves the ranks out of step, so it fails the group."""
        with self._lock:
            if self.failed is not None:
                raise RankFailure(f"the tensor-parallel group has failed: {self.failed}")
            try:
                _send(kind, *wire, self.tp)
                out = compute()
            except Exception as exc:
                self._fail(exc)
                raise RankFailure(f"the tensor-parallel group failed: {exc}") from exc
            self._last = time.monotonic()
            return out

    def on_failure(self, callback) -> None:
        """Call `callback(exc)` once when the group fails (at once if it already has)."""
        with self._state_lock:
            self._callbacks.append(callback)
            failed = self.failed
        if failed is not None:
            callback(failed)

    def _fail(self, exc: BaseException) -> None:
        with self._state_lock:
            if self.failed is not None or self._closing.is_set():
                return
            self.failed = exc
            callbacks = list(self._callbacks)
        log.error("tensor-parallel group failed: %s", exc)
        for cb in callbacks:
            try:
                cb(exc)
            except Exception:
                log.exception("rank-failure callback failed")

    def _keepalive(self) -> None:
        """Workers wait for the next message inside a collective that times out: an idle server
        pings them well inside the timeout. A ping to a dead worker fails the group."""
        interval = self.timeout / 4
        while not self._closing.wait(interval / 4):
            if self.failed is not None or time.monotonic() - self._last < interval:
                continue
            if not self._lock.acquire(timeout=interval):
                continue
            try:
                if self.failed is None and not self._closing.is_set():
                    _send(_PING, [], [], self.tp)
                    self._last = time.monotonic()
            except Exception as exc:
                self._fail(exc)
            finally:
                self._lock.release()

    def _watch(self) -> None:
        sentinels = {p.sentinel: i + 1 for i, p in enumerate(self.processes)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if not self._closing.is_set():
            rank = sentinels[ready[0]]
            self.processes[rank - 1].join(1.0)          # reap it, for its exit code
            code = self.processes[rank - 1].exitcode
            self._fail(RankFailure(f"tensor-parallel rank {rank} exited (code {code})"))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (a stop message, then terminate stragglers) and leave the group."""
        if self._closing.is_set():
            return
        got = self._lock.acquire(timeout=timeout)
        self._closing.set()
        try:
            if got and self.failed is None:
                try:
                    _send(_STOP, [], [], self.tp)
                except Exception as exc:
                    log.warning("could not send stop to the tensor-parallel workers: %s", exc)
            deadline = time.monotonic() + timeout
            for p in self.processes:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(timeout)
            _leave_group()
        finally:
            if got:
                self._lock.release()


def _leave_group() -> None:
    """Destroy the process group; a broken one (a dead peer) is logged, not raised."""
    try:
        dist.destroy_process_group()
    except Exception as exc:
        log.warning("leaving the tensor-parallel group: %s", exc)


class ParallelModel:
    """Rank 0's view of a sharded model: `forward` (and a decoder's `allocate_cache`) first sends the
    step to the other ranks; everything else reads through to this rank's shard."""

    def __init__(self, shard, leader: Leader, kind: str):
        self.shard, self.leader, self.kind = shard, leader, kind

    def __getattr__(self, name):
        return getattr(self.shard, name)

    def forward(self, batch, cache=None):
        """EncoderModel.forward(PackedBatch) or DecoderModel.forward(StepBatch, cache), on every rank."""
        if self.kind != "decoder":
            return self.leader.run(_ENCODE, _packed_to_wire(batch), lambda: self.shard.forward(batch))
        return self.leader.run(_DECODE, _step_to_wire(batch), lambda: self.shard.forward(batch, cache))

    def allocate_cache(self, num_blocks: int, block_size: int):
        return self.leader.run(_CACHE, ([], [num_blocks, block_size]),
                               lambda: self.shard.allocate_cache(num_blocks, block_size))

    def close(self) -> None:
        self.leader.close()


def close(model) -> None:
    """Stop `model`'s tensor-parallel workers, if it has any."""
    if isinstance(model, ParallelModel):
        model.close()


def on_failure(model, callback) -> None:
    """`callback(exc)` once if `model`'s tensor-parallel group fails; nothing for a single-process model."""
    if isinstance(model, ParallelModel):
        model.leader.on_failure(callback)


# ---------------------------------------------------------------------- starting the ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def rank_threads(threads: int | None, world: int) -> int:
    """Torch threads per rank: the machine's share (threads, or all cores, over the ranks on it)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (threads or len(os.sched_getaffinity(0))) // local)


def _model_state(shard) -> dict:
    """What a worker needs of its shard: plain data and tensors (no ops module, no workspace); a
    pre-norm encoder's decoder trunk as a state of its own."""
    state = {k: v for k, v in vars(shard).items() if k not in ("ops", "workspace", "tp")}
    for head in ("head", "extra"):
        if head in state:
            state[head] = None            # classification runs on rank 0
    if "decoder" in state:
        state["decoder"] = _model_state(state["decoder"])
    return state


def _rebuild(kind: str, state: dict, tp: TPGroup):
    """A worker's shard from _model_state's state."""
    from .decoder import DecoderModel
    from .model import EncoderModel
    from .ops import backend_for
    from .prenorm_encoder import PreNormEncoderModel
    cls = {"encoder": EncoderModel, "decoder": DecoderModel, "prenorm": PreNormEncoderModel}[kind]
    model = cls.__new__(cls)
    vars(model).update(state)
    model.ops = backend_for("cpu")
    model.tp = tp
    if kind == "prenorm":
        model.decoder = _rebuild("decoder", state["decoder"], tp)
    return model


def _ready(shard, kind: str) -> None:
    """What a shard builds on its own rank: the encoder's workspace, a decoder trunk's kernel choice
    (measured for the shard's own shapes)."""
    if kind == "encoder":
        shard._build_workspace()
    else:
        getattr(shard, "decoder", shard).tune_kernels()


def start(model, world: int, threads: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> ParallelModel:
    """Shard a built EncoderModel / DecoderModel over `world` ranks with this process as rank 0;
    returns rank 0's model. Spawns ranks 1..N-1 on this machine, or joins torchrun's group."""
    check_shardable(model, world)
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        raise TurboServeError("tensor parallelism runs CPU ranks only: a CUDA model is served on one GPU "
                              "(docs/gpu.md)")
    if dist.is_initialized():
        raise TurboServeError("a tensor-parallel model already runs in this process; close() it first")
    kind = "decoder" if hasattr(model, "num_kv_heads") else "prenorm" if hasattr(model, "decoder") else "encoder"
    per_rank = rank_threads(threads, world)
    td = datetime.timedelta(seconds=timeout)
    processes = []
    if torchrun_rank() is not None:
        if int(os.environ["WORLD_SIZE"]) != world or torchrun_rank() != 0:
            raise TurboServeError(f"torchrun started {os.environ['WORLD_SIZE']} ranks (this is rank "
                                  f"{torchrun_rank()}); --tensor-parallel is {world}")
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=world, timeout=td)
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        processes = [ctx.Process(target=_spawned_worker, name=f"turboserve-tp-rank{r}", daemon=True,
                                 args=(r, world, init, per_rank, timeout, os.getpid()))
                     for r in range(1, world)]
        for p in processes:
            p.start()
        try:
            dist.init_process_group("gloo", init_method=init, rank=0, world_size=world, timeout=td)
        except Exception as exc:
            for p in processes:
                p.kill()
            raise RankFailure(f"the tensor-parallel ranks did not join: {exc}") from exc
    t = time.perf_counter()
    try:
        for r in range(1, world):
            shard = _shard(model, kind, TPGroup(r, world))
            dist.send_object_list([kind, _model_state(shard), shard.tp.vocab], dst=r)
            del shard
        shard = _shard(model, kind, TPGroup(0, world))
        _ready(shard, kind)
        dist.barrier()                                   # every worker holds its shard
    except Exception as exc:
        for p in processes:
            p.kill()
        _leave_group()
        raise RankFailure(f"sending the shards failed: {exc}") from exc
    torch.set_num_threads(per_rank)
    log.info("tensor parallel: %d ranks (gloo, %d threads each), shards sent in %.1f s", world, per_rank,
             time.perf_counter() - t)
    return ParallelModel(shard, Leader(shard.tp, processes, timeout), kind)


def _shard(model, kind: str, tp: TPGroup):
    return {"encoder": shard_encoder, "decoder": shard_decoder, "prenorm": shard_prenorm}[kind](model, tp)


# ---------------------------------------------------------------------- ranks > 0
def run_worker(rank: int, world: int) -> None:
    """A worker rank's life, inside an initialized process group: receive the shard, then run every
    step rank 0 broadcasts until it says stop. A failed collective (rank 0 gone, or past the
    timeout) raises and ends the process."""
    got = [None, None, None]
    dist.recv_object_list(got, src=0)
    kind, state, vocab = got
    model = _rebuild(kind, state, TPGroup(rank, world, vocab))
    _ready(model, kind)
    dist.barrier()
    cache = None
    while True:
        msg, tensors, scalars = _receive()
        if msg == _STOP:
            return
        if msg == _ENCODE:
            model.forward(_packed_from_wire(tensors, scalars))
        elif msg == _CACHE:
            cache = model.allocate_cache(*scalars)
        elif msg == _DECODE:
            model.forward(_step_from_wire(tensors, scalars), cache)


def _spawned_worker(rank: int, world: int, init: str, threads: int, timeout: float, parent: int) -> None:
    torch.set_num_threads(threads)

    def orphan_watch():                  # rank 0's process is gone: nobody will stop this one
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=orphan_watch, daemon=True).start()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        run_worker(rank, world)
    finally:
        _leave_group()


def run_worker_from_env(threads: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Entry point of a torchrun-started rank > 0 (`turboserve serve` under torchrun): join the group,
    serve rank 0's steps, exit 0 on stop."""
    rank, world = torchrun_rank(), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(rank_threads(threads, world))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        run_worker(rank, world)
    finally:
        _leave_group()
    return 0
