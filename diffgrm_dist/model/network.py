"""DiffGRM: history encoder + bidirectional masked-diffusion decoder over SID digits.

The whole model in one file. Shapes: B users, L history slots, n digits, d model width.

- Vocabulary: digit ``i`` has its own table of ``sizes[i]`` code embeddings (all digits
  live in one ``nn.Embedding`` at offsets), plus one PAD row; each digit also has a
  learned mask embedding.
- Encoder: an item is its n digit embeddings concatenated (n*d) -> MLP -> d, plus a learned
  position; pre-LN Transformer blocks with a key padding mask.
- Diffusion decoder: n slots, one per digit. A slot shows its code embedding when the digit
  is known and its mask embedding otherwise; full bidirectional self-attention over the
  slots, cross-attention to the encoder output; logits of digit i are dot products with
  digit i's code table (tied weights).
- Autoregressive decoder (TIGER-style baseline, ``decoder="autoregressive"``): the same
  blocks with a causal mask over [BOS, digit 0, ..., digit n-2]; at inference one slot per
  step against a cache of the earlier slots' keys/values (``autoregress_step``).
- Dense head (SASRec-style baseline, ``decoder="dense"``): the encoder state of the most
  recent history slot against a learned embedding per item, a full softmax over the
  catalogue. It tells whether the encoder and the training loop learn at all.

History slots are left padded and positions count back from the most recent slot, so a
batch padded only to its own longest history gives the same result as one padded to
``max_history``.

Cross-attention keys/values are exposed (``cross_kv``) so beam search computes them once
per user and reuses them for every beam. No distributed code lives here.

On accelerators: logits are computed in fp32 even under bf16 autocast (beam scores sum
log-probabilities over digits, and bf16's 8-bit mantissa would round them), attention runs
in slices of at most ``ATTENTION_BATCH_LIMIT`` (rows x heads) on a GPU because fused kernels
reject larger grids (cuDNN failed at 256 users x 256 beams), and no method reads a tensor's value
on the host, so a forward never waits on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffgrm_dist.core.config import ModelConfig

# Rows x heads per attention call, by device type. cuDNN's fused attention failed on an H200
# at 65,536 rows x 4 heads and ran at 8,192 x 4 (CUDA grids stop at 65,535 blocks in their
# y/z dimensions). CPU kernels take any batch, and slicing would move their float sums by an
# ulp, so the CPU is not sliced.
ATTENTION_BATCH_LIMIT: dict[str, int] = {"cuda": 1 << 15}


@dataclass(frozen=True)
class SidSpec:
    """Shape of the semantic IDs the model reads and writes."""

    sizes: tuple[int, ...]  # codes per digit (the extra digit may have fewer)
    max_history: int
    items: int = 0  # catalogue size: the output layer of the dense head

    @property
    def digits(self) -> int:
        return len(self.sizes)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) -> keys, values as (B, heads, S, d/heads)."""
        b, s, d = x.shape
        k, v = self.kv(x).view(b, s, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """``mask``: bool, broadcastable to (B, heads, T, S), True where attention is allowed."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k, v = kv
        y = sliced_attention(q, k, v, mask, causal and mask is None, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool, dropout: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over the batch in slices of at most the device's
    ``ATTENTION_BATCH_LIMIT`` rows x heads (rows are independent: the same result as one call,
    up to the kernel's float rounding)."""
    limit = ATTENTION_BATCH_LIMIT.get(q.device.type)
    rows = max(1, limit // q.shape[1]) if limit else q.shape[0]
    if q.shape[0] <= rows:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
    out = []
    for lo in range(0, q.shape[0], rows):
        part = None if mask is None else (mask if mask.shape[0] == 1 else mask[lo:lo + rows])
        out.append(F.scaled_dot_product_attention(q[lo:lo + rows], k[lo:lo + rows], v[lo:lo + rows],
                                                  attn_mask=part, is_causal=causal, dropout_p=dropout))
    return torch.cat(out)


class MLP(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.mlp = MLP(cfg.d_model, cfg.ffn, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, self.attn.project_kv(h), mask=mask))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.mlp = MLP(cfg.d_model, cfg.ffn, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor, causal: bool, group: int = 1) -> torch.Tensor:
        """x: (M*group, n, d), rows grouped by memory row. Self-attention stays within each
        row's n slots; for cross-attention the group's slots are one query sequence of
        length group*n against that memory row, so keys/values are never copied per row."""
        h = self.ln1(x)
        x = x + self.drop(self.self_attn(h, self.self_attn.project_kv(h), causal=causal))
        return self._cross_and_mlp(x, cross_kv, memory_mask, group)

    def step(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
             cross_kv: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor,
             group: int = 1) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Incremental causal form of ``forward``: x (R, 1, d) is each row's newest slot, and
        ``past`` the self-attention keys/values of its earlier slots (None: the first).
        Returns the slot's output and the keys/values extended by it (the KV cache)."""
        h = self.ln1(x)
        k, v = self.self_attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.drop(self.self_attn(h, (k, v)))  # the newest slot sees every earlier one
        return self._cross_and_mlp(x, cross_kv, memory_mask, group), (k, v)

    def _cross_and_mlp(self, x: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor],
                       memory_mask: torch.Tensor, group: int) -> torch.Tensor:
        rows, n, d = x.shape
        q = self.ln2(x).view(rows // group, group * n, d)
        x = x + self.drop(self.cross_attn(q, cross_kv, mask=memory_mask).view(rows, n, d))
        return x + self.mlp(self.ln3(x))


def autocast_type(device: torch.device) -> str:
    """The ``torch.autocast`` device type for tensors on ``device``: CUDA's own, else the CPU's."""
    return "cuda" if device.type == "cuda" else "cpu"


def fp32(x: torch.Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device: the block computes in the dtype of its inputs."""
    return torch.autocast(autocast_type(x.device), enabled=False)


def fp32_scores(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(..., d) states against a (K, d) table -> (..., K) fp32 dot products, even under bf16
    autocast: beam scores sum these log-probabilities over digits."""
    with fp32(h):
        return h.float() @ table.float().T


@dataclass
class Memory:
    """Encoder output for a batch of users, in the form the decoder consumes.

    ``kv[l]`` are layer l's cross-attention keys/values, ``mask`` (B, 1, 1, L) marks real
    history slots. Decoder rows share a memory row by grouping (see ``denoise``).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    last: torch.Tensor  # (B, d) encoder state of the most recent history slot

    def select(self, index: torch.Tensor) -> Memory:
        return Memory([(k[index], v[index]) for k, v in self.kv], self.mask[index], self.last[index])


class DiffGRM(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: SidSpec) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.heads={cfg.heads}")
        self.cfg, self.spec = cfg, spec
        d, n = cfg.d_model, spec.digits
        self.digit_start = (0, *itertools.accumulate(spec.sizes))[:-1]  # host copy: no device read
        self.register_buffer("offsets", torch.tensor(self.digit_start), persistent=False)
        self.pad = int(sum(spec.sizes))
        self.codes = nn.Embedding(self.pad + 1, d, padding_idx=self.pad)
        self.item_mlp = nn.Sequential(nn.Linear(n * d, d), nn.ReLU(), nn.Linear(d, d))
        self.history_pos = nn.Embedding(spec.max_history, d)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_ln = nn.LayerNorm(d)
        self.mask_emb = nn.Parameter(torch.zeros(n, d))  # one mask embedding per digit
        self.digit_pos = nn.Parameter(torch.zeros(n, d)) if cfg.digit_pos else None
        self.bos = nn.Parameter(torch.zeros(d))  # autoregressive decoder only
        dense = cfg.decoder == "dense"
        if dense and spec.items < 1:
            raise ValueError("model.decoder=dense needs the catalogue size (SidSpec.items)")
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(0 if dense else cfg.decoder_layers))
        self.decoder_ln = nn.LayerNorm(d)
        self.item_emb = nn.Embedding(spec.items, d) if dense else None
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        for p in (self.mask_emb, self.digit_pos, self.bos):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    # ------------------------------------------------------------------ encoder
    def encode(self, history: torch.Tensor, history_mask: torch.Tensor) -> Memory:
        """history: (B, L, n) codes (anything where masked out), history_mask: (B, L) bool,
        L <= max_history slots, left padded (the most recent item in the last slot)."""
        b, length, n = history.shape
        tokens = torch.where(history_mask[..., None], history + self.offsets, self.pad)
        items = self.item_mlp(self.codes(tokens).reshape(b, length, -1))
        # Position counted back from the most recent (last) slot: padding-width independent.
        x = self.drop(items + self.history_pos.weight[self.spec.max_history - length:])
        # Users with no history at all would attend to nothing; let them see slot 0.
        keys = history_mask.clone()
        keys[:, 0] |= ~history_mask.any(dim=1)
        attn_mask = keys[:, None, None, :]
        for block in self.encoder:
            x = block(x, attn_mask)
        memory = self.encoder_ln(x)
        return Memory([blk.cross_attn.project_kv(memory) for blk in self.decoder], attn_mask,
                      memory[:, -1])

    # ------------------------------------------------------------------ decoders
    def code_table(self, digit: int) -> torch.Tensor:
        start = self.digit_start[digit]
        return self.codes.weight[start:start + self.spec.sizes[digit]]

    def stacked_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Slot states h (B, s, d) of digits 0..s-1 (s <= n) -> (B, s, K_max) fp32 logits
        against each digit's code table; codes beyond a digit's size are -inf."""
        sizes = self.spec.sizes[:h.shape[1]]
        if len(set(self.spec.sizes)) == 1:
            table = self.codes.weight[:self.pad].view(self.spec.digits, sizes[0], -1)[:len(sizes)]
            with fp32(h):
                return torch.einsum("bnd,nkd->bnk", h.float(), table.float())
        out = h.new_full((h.shape[0], len(sizes), max(self.spec.sizes)), float("-inf"), dtype=torch.float32)
        for i, size in enumerate(sizes):
            out[:, i, :size] = fp32_scores(h[:, i], self.code_table(i))
        return out

    def denoise(self, memory: Memory, codes: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Diffusion decoder: (R, n) codes with (R, n) bool ``masked`` -> (R, n, K_max) logits.

        R is a multiple of the memory's rows: rows [m*G, (m+1)*G) read memory row m (the n
        views of one training example, or the beams of one user at inference)."""
        group = codes.shape[0] // memory.mask.shape[0]
        shown = self.codes(torch.where(masked, self.pad, codes + self.offsets))
        x = torch.where(masked[..., None], self.mask_emb.expand_as(shown), shown)
        x = self.with_digit_pos(x, 0, codes.shape[1])
        x = self.drop(x)
        for block, kv in zip(self.decoder, memory.kv):
            x = block(x, kv, memory.mask, causal=False, group=group)
        return self.stacked_logits(self.decoder_ln(x))

    def with_digit_pos(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``x`` (..., stop - start, d) plus the digit positions of slots start..stop-1
        (``model.digit_pos``; unchanged without them)."""
        return x if self.digit_pos is None else x + self.digit_pos[start:stop]

    def autoregress(self, memory: Memory, codes: torch.Tensor) -> torch.Tensor:
        """AR decoder, teacher forced: (R, t) codes of the first t digits -> (R, t+1, K_max)
        logits for digits 0..t (grouped by memory row as in ``denoise``)."""
        r, t = codes.shape
        group = r // memory.mask.shape[0]
        prev = self.codes(codes + self.offsets[:t])
        x = self.with_digit_pos(torch.cat([self.bos.expand(r, 1, -1), prev], dim=1), 0, t + 1)
        x = self.drop(x)
        for block, kv in zip(self.decoder, memory.kv):
            x = block(x, kv, memory.mask, causal=True, group=group)
        return self.stacked_logits(self.decoder_ln(x))

    def autoregress_step(self, memory: Memory, prev: torch.Tensor | None, step: int,
                         past: list[tuple[torch.Tensor, torch.Tensor]] | None
                         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """AR decoder with a KV cache: the slot of digit ``step`` only. ``prev`` (R,) is the
        code of digit ``step - 1`` (None at step 0, where the slot is BOS), ``past`` each
        layer's cached keys/values of slots 0..step-1. Returns (R, K_max) logits of digit
        ``step`` (as ``autoregress(...)[:, step]``) and the extended cache; O(step) work
        per slot instead of re-running the prefix."""
        rows = memory.mask.shape[0] if prev is None else prev.shape[0]
        group = rows // memory.mask.shape[0]
        x = self.bos.expand(rows, 1, -1) if prev is None else self.codes(prev + self.digit_start[step - 1])[:, None]
        x = self.drop(self.with_digit_pos(x, step, step + 1))
        cache = []
        for i, (block, kv) in enumerate(zip(self.decoder, memory.kv)):
            x, layer_kv = block.step(x, None if past is None else past[i], kv, memory.mask, group)
            cache.append(layer_kv)
        h = self.decoder_ln(x[:, 0])
        size, width = self.spec.sizes[step], max(self.spec.sizes)
        logits = fp32_scores(h, self.code_table(step))
        if size < width:
            logits = torch.cat([logits, logits.new_full((rows, width - size), float("-inf"))], dim=1)
        return logits, cache

    def item_logits(self, memory: Memory) -> torch.Tensor:
        """Dense head: (B, items) fp32 logits of every catalogue item against its learned embedding."""
        return fp32_scores(self.decoder_ln(memory.last), self.item_emb.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
