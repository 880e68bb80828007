"""One forward of a Llama/Mistral/Qwen2 decoder over decode rows and prompt chunks, on slot KV.

The tokens of a step are one flat batch [N, hidden]: one token for each decode row (rows 0..B-1
of the slot cache), then chunks of prompts (each in its own row, positions start..start+c). The
linear layers see all N rows at once, so prompt chunks ride on the weight reads the decode rows
pay anyway; attention is split: the decode rows attend over their own lengths (a padding mask,
no left padding), each chunk causally over its row. Rotary tables, the decode mask and the KV
indices are built once per step, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_serve.engine import cpu_gemv
from llava_serve.engine.decoder_weights import DecoderWeights, LayerWeights, Linear
from llava_serve.engine.slots import KVSlots


@dataclass
class PromptChunk:
    embeds: torch.Tensor  # [c, hidden]
    start: int  # position of the first embedding
    want_logits: bool  # the chunk ends the prompt: its last position is sampled
    row: int  # its KV row


@dataclass
class StepInputs:
    """Per-step tensors shared by every layer."""

    rows: int  # decode rows
    positions: torch.Tensor  # [B] each decode row's position
    cos: torch.Tensor  # [N, 1, head_dim] (compiled rows: the prompt chunks' rows only)
    sin: torch.Tensor
    kv_index: torch.Tensor  # [B * kv_heads] where each decode row's new key/value goes, as rows of the
    # flat [rows * kv_heads * cols, head_dim] cache (index_copy_: ~10 us, advanced indexing ~135 us)
    decode_len: int  # longest decode row after this step
    mask: torch.Tensor | None  # [B, 1, 1, decode_len], 0 or -inf (an additive mask is ~15% faster in SDPA)
    lengths: torch.Tensor  # [B] each decode row's length after this step (the compiled attention's mask)
    chunks: list[PromptChunk]


class DecoderForward:
    def __init__(self, weights: DecoderWeights, kv: KVSlots, max_len: int) -> None:
        self.w = weights
        self.kv = kv
        self.gqa = weights.heads != weights.kv_heads
        self.q_width = weights.heads * weights.head_dim
        self.kv_width = weights.kv_heads * weights.head_dim
        self.cos, self.sin = rotary_tables(weights, max_len)
        # torch's CPU flash kernel is ~3.7x slower in bfloat16 than in float32 at one query per row
        # (8 rows x 16 heads x 400 positions: 16.6 vs 4.4 ms); two batched matmuls are not (4.7 ms)
        self.manual_decode = weights.embed.device.type == "cpu" and weights.embed.dtype != torch.float32
        # a decode step of one row and nothing else goes through every layer in one compiled call
        self.row_step = RowStep(weights) if RowStep.applies(weights) else None
        # float32 decode rows attend through the compiled kernel where it is loaded: torch's CPU flash
        # kernel is built for long runs of queries and took ~1.4 ms a layer at 16 rows x ~150
        # positions (bench checkpoint, 16-row decode step in process: 66-81 -> 49-55 ms). The same
        # kernel does their rotary and cache write, and norms and SwiGLU of every row are compiled
        # too: ~10 torch ops a layer, each 10-100 us at 16 rows, become three calls
        self.kernel_attention = weights.row_step and weights.embed.dtype == torch.float32
        # int8 / int4: every step with several rows (decode rows and prompt chunks) runs in one compiled call
        self.quantized_steps = weights.quantization is not None and self.row_step is not None

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int], chunks: list[PromptChunk]) -> torch.Tensor:
        """Logits [B + chunks that end their prompt, vocab]: the decode rows', then each such
        chunk's last position, in order."""
        if self.row_step is not None and len(tokens) == 1 and not chunks:
            x = self.row_step(tokens[0], positions[0], self.kv, self.cos, self.sin)
            return self.w.lm_head(self._norm(x, self.w.norm))
        if self.quantized_steps and self.row_step is not None:
            x = self._embed(tokens, chunks).to(torch.float32, copy=True)  # updated in place
            all_pos, cache_rows = list(positions), list(range(len(tokens)))
            for chunk in chunks:
                c = chunk.embeds.shape[0]
                all_pos.extend(range(chunk.start, chunk.start + c))
                cache_rows.extend([chunk.row] * c)
            self.row_step.rows(x, all_pos, cache_rows, self.kv, self.cos, self.sin)
        else:
            step = self._inputs(tokens, positions, chunks)
            x = self._embed(tokens, chunks)
            for layer, keys, values in zip(self.w.layers, self.kv.keys, self.kv.values):
                x = self._layer(layer, keys, values, x, step)
        if chunks:
            keep = list(range(len(tokens)))
            end = len(tokens)
            for chunk in chunks:
                end += chunk.embeds.shape[0]
                if chunk.want_logits:
                    keep.append(end - 1)
            x = x[keep] if len(keep) < x.shape[0] else x
        return self.w.lm_head(self._norm(x, self.w.norm))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernel_attention:
            return cpu_gemv.rms_norm(x, weight, self.w.eps)
        return rms_norm(x, weight, self.w.eps)

    def _inputs(self, tokens: list[int], positions: list[int], chunks: list[PromptChunk]) -> StepInputs:
        device = self.w.embed.device
        all_pos = list(positions)
        for chunk in chunks:
            all_pos.extend(range(chunk.start, chunk.start + chunk.embeds.shape[0]))
        pos = torch.tensor(all_pos, device=device)
        rows = len(tokens)
        decode_pos = pos[:rows]
        decode_len = max(positions) + 1 if rows else 0
        if self.kernel_attention:  # the decode rows' rotary, cache write and mask are in the kernel
            chunk_pos = pos[rows:]
            return StepInputs(
                rows=rows,
                positions=decode_pos,
                cos=self.cos[chunk_pos].unsqueeze(1),
                sin=self.sin[chunk_pos].unsqueeze(1),
                kv_index=decode_pos,
                decode_len=decode_len,
                mask=None,
                lengths=decode_pos + 1,
                chunks=chunks,
            )
        mask = None
        if rows:
            beyond = torch.arange(decode_len, device=device) > decode_pos[:, None]
            # float32 where decode_attention adds it to float32 scores (made once a step, not per layer)
            mask_dtype = torch.float32 if self.manual_decode else self.w.embed.dtype
            mask = torch.zeros(beyond.shape, dtype=mask_dtype, device=device).masked_fill_(beyond, float("-inf"))
            mask = mask.view(rows, 1, 1, decode_len)
        return StepInputs(
            rows=rows,
            positions=decode_pos,
            cos=self.cos[pos].unsqueeze(1),
            sin=self.sin[pos].unsqueeze(1),
            kv_index=self._kv_index(decode_pos),
            decode_len=decode_len,
            mask=mask,
            lengths=decode_pos + 1,
            chunks=chunks,
        )

    def _kv_index(self, positions: torch.Tensor) -> torch.Tensor:
        heads = self.w.kv_heads
        row_heads = torch.arange(positions.shape[0] * heads, device=positions.device).view(-1, heads)
        return (row_heads * self.kv.cols + positions[:, None]).reshape(-1)

    def _embed(self, tokens: list[int], chunks: list[PromptChunk]) -> torch.Tensor:
        parts = []
        if tokens:
            parts.append(F.embedding(torch.tensor(tokens, device=self.w.embed.device), self.w.embed))
        parts.extend(chunk.embeds.to(self.w.embed.dtype) for chunk in chunks)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _layer(
        self, layer: LayerWeights, keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor, step: StepInputs
    ) -> torch.Tensor:
        h = self._norm(x, layer.input_norm)
        qkv = layer.qkv(h)
        b = step.rows
        outs = []
        if self.kernel_attention:  # decode rows: rotary, cache write and attention in one call
            if b:
                shape = (self.w.heads, self.w.kv_heads)
                outs.append(
                    cpu_gemv.decode_rows_attention(qkv[:b], self.cos, self.sin, step.positions, (keys, values), shape)
                )
            if step.chunks:
                q, k, v = self._rotated(qkv[b:], step)
                outs.append(self._chunks_attention(q, k, v, keys, values, step.chunks))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        else:
            q, k, v = self._rotated(qkv, step)
            attn = self._attention(q, k, v, keys, values, step)
        x = x + layer.o(attn)
        h = self._norm(x, layer.post_norm)
        if self.kernel_attention:
            return x + layer.down(cpu_gemv.silu_mul(layer.gate_up(h)))
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    def _rotated(self, qkv: torch.Tensor, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, d], k and v [n, kv_heads, d] from QKV rows, rotary applied (step.cos/sin rows)."""
        n, d = qkv.shape[0], self.w.head_dim
        qk = qkv[:, : self.q_width + self.kv_width].view(n, -1, d)
        qk = qk * step.cos + rotate_half(qk) * step.sin
        v = qkv[:, self.q_width + self.kv_width :].view(n, self.w.kv_heads, d)
        return qk[:, : self.w.heads], qk[:, self.w.heads :], v

    def _attention(self, q, k, v, keys: torch.Tensor, values: torch.Tensor, step: StepInputs) -> torch.Tensor:
        b = step.rows
        outs = []
        if b:
            d = self.w.head_dim
            keys.view(-1, d).index_copy_(0, step.kv_index, k[:b].reshape(-1, d))
            values.view(-1, d).index_copy_(0, step.kv_index, v[:b].reshape(-1, d))
            k_rows, v_rows = keys[:b, :, : step.decode_len], values[:b, :, : step.decode_len]
            if self.manual_decode:
                outs.append(decode_attention(q[:b], k_rows, v_rows, step.mask))
            else:
                out = F.scaled_dot_product_attention(
                    q[:b].unsqueeze(2), k_rows, v_rows, attn_mask=step.mask, enable_gqa=self.gqa
                )
                outs.append(out.reshape(b, self.q_width))
        if step.chunks:
            outs.append(self._chunks_attention(q[b:], k[b:], v[b:], keys, values, step.chunks))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _chunks_attention(self, q, k, v, keys: torch.Tensor, values: torch.Tensor, chunks: list[PromptChunk]):
        """Each prompt chunk's rows (in order, from row 0 of q, k, v) causally over its cache row."""
        outs = []
        at = 0
        for chunk in chunks:
            c = chunk.embeds.shape[0]
            sl = slice(at, at + c)
            outs.append(self._chunk_attention(q[sl], k[sl], v[sl], keys, values, chunk.row, chunk.start))
            at += c
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _chunk_attention(self, q, k, v, keys: torch.Tensor, values: torch.Tensor, row: int, start: int):
        c = q.shape[0]
        end = start + c
        keys[row, :, start:end] = k.transpose(0, 1)
        values[row, :, start:end] = v.transpose(0, 1)
        mask = None
        if start:  # queries see the cached prefix and the chunk up to themselves
            mask = torch.arange(end, device=q.device) <= torch.arange(start, end, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys[row : row + 1, :, :end],
            values[row : row + 1, :, :end],
            attn_mask=mask,
            is_causal=not start,
            enable_gqa=self.gqa,
        )
        return out[0].transpose(0, 1).reshape(c, self.q_width)


class RowStep:
    """A decode step of one row through all layers in one call of the compiled kernel
    (cpu_gemv.decode_row): norms, QKV, rotary, the cache write, attention, output, MLP, with no
    Python or torch dispatch between them. At one row a step is the weight stream; the ~350 small
    torch ops of the layer-by-layer path (norms, rotary, SDPA's set-up, slicing) cost ~5 ms of a
    ~25 ms step on the bench checkpoint. Used for float32 and bfloat16 decoders on CPU whose weights
    stream from memory (decoder_weights.GEMV_MIN_BYTES) and that have no bias but QKV's."""

    def __init__(self, w: DecoderWeights) -> None:
        self.w = w
        layers = w.layers
        self.args = (
            [layer.input_norm for layer in layers],
            [layer.qkv.weight for layer in layers],
            [layer.qkv.bias for layer in layers if layer.qkv.bias is not None],  # all or none (applies())
            [layer.o.weight for layer in layers],
            [layer.post_norm for layer in layers],
            [layer.gate_up.weight for layer in layers],
            [layer.down.weight for layer in layers],
            [s for layer in layers for lin in _linears(layer) if (s := lin.scale) is not None],
        )

    @staticmethod
    def applies(w: DecoderWeights) -> bool:
        if not w.row_step or not w.layers:
            return False
        layers = w.layers
        if any(lin.bias is not None for layer in layers for lin in (layer.o, layer.gate_up, layer.down)):
            return False
        qkv_biases = [layer.qkv.bias for layer in layers if layer.qkv.bias is not None]
        if qkv_biases and len(qkv_biases) != len(layers):
            return False
        tensors = [t for layer in layers for t in (layer.input_norm, layer.post_norm)] + qkv_biases
        linears = [lin for layer in layers for lin in _linears(layer)]
        dtype = w.embed.dtype
        floats = all(t.dtype == dtype for t in tensors) and all(
            lin.weight.dtype == dtype or (w.quantization is not None and lin.scale is not None) for lin in linears
        )
        tensors += [lin.weight for lin in linears]
        return (
            dtype in (torch.float32, torch.bfloat16)
            and floats
            and all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
        )

    def rows(
        self,
        x: torch.Tensor,
        positions: list[int],
        cache_rows: list[int],
        kv: KVSlots,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """A step of several rows (int8 / int4 weights: cpu_gemv.decode_rows_q8), in place on x [N, hidden]
        (float32): row i is at positions[i] of cache row cache_rows[i]."""
        w = self.w
        rows = (torch.tensor(positions), torch.tensor(cache_rows))
        cpu_gemv.decode_rows_q8(x, list(self.args), kv, (cos, sin), rows, (w.heads, w.kv_heads, w.eps))

    def __call__(self, token: int, pos: int, kv: KVSlots, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        w = self.w
        x = w.embed[token].to(torch.float32, copy=True)  # the residual stream stays float32 in the kernel
        norms, qkv, qkv_b, o, post, gate_up, down, scales = self.args
        cpu_gemv.decode_row(
            x,
            [norms, qkv, qkv_b, o, post, gate_up, down, scales],
            kv,
            cos[pos].float(),
            sin[pos].float(),
            pos,
            (w.heads, w.kv_heads, w.eps),
        )
        return x.view(1, -1).to(w.embed.dtype)


def _linears(layer: LayerWeights) -> tuple[Linear, Linear, Linear, Linear]:
    return layer.qkv, layer.o, layer.gate_up, layer.down


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
    """One query per row [B, heads, d] over [B, kv_heads, L, d] as two batched matmuls (the query
    heads of a KV head side by side, so grouped-query attention needs no copy), softmax in float32.
    Scores are taken as keys @ queries ([L, group] per KV head), not queries @ keys.T: the cache
    rows are views with the cache's column stride, which a transposed operand would have to copy
    (bfloat16, 16 rows x 16 heads x 262 positions: 1.7 ms against 2.3 with the copy)."""
    b, heads, d = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(b, kv_heads, heads // kv_heads, d)
    scores = torch.matmul(keys, grouped.transpose(-1, -2)).float() * d**-0.5  # [B, kv_heads, L, group]
    if mask is not None:
        scores = scores + mask.float().transpose(-1, -2)  # [B, 1, L, 1]; float() is a no-op for the engine's mask
    probs = scores.softmax(-2).to(values.dtype)
    return torch.matmul(probs.transpose(-1, -2), values).reshape(b, heads * d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: torch's fused kernel gives the same bits in float32 (checked), not in
    half precision, where the variance is taken in float32 and the result rounded before the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(w: DecoderWeights, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, as transformers' rotary embedding computes them (float32, then cast)."""
    positions = torch.arange(max_len, device=w.inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * w.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    dtype = w.embed.dtype
    return (emb.cos() * w.rope_scaling).to(dtype), (emb.sin() * w.rope_scaling).to(dtype)
