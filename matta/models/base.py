"""`NestedLM`: what every M-nested language model shares, whatever its blocks are.

A nested LM holds a Student inside a TA (paper 3.2): one token embedding of the TA's width
(the Student reads its first `student_width` features), a stack `blocks` in which the
layers listed in `ta_only_layers` run for the TA alone (depth nesting), a final
`NestedLayerNorm`, and the tied output head `lm_head_weight` (the Student's head is its
first `student_width` columns). This class runs the streams through that stack, both or
either one alone, and owns the bookkeeping every caller needs: widths, depth, parameter
and FLOP counts, and the optimizer's parameter groups.

A subclass builds the modules in `__init__` (setting `config`, `nest`, `ta_config`, `wte`,
`drop`, `blocks`, `ta_only_layers`, `student_layers`), and provides `embed`, `final_norm`
and `stream_shape`. Each block has a bool `ta_only` and `forward(x_s, x_ta, **kwargs) ->
(y_s, y_ta)`, in which either input may be None (that stream is not computed and its
output is None). A block may hand a stream's output as a pair (x, r) meaning x + r, leaving
the residual add to the next block's first norm, which fuses it (GPT-2's blocks do, and take
such pairs as inputs). Every stream goes through the block's `forward`, so module hooks (FSDP's
gathering of sharded weights among them) see every use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import count_parameters

STREAMS = ("student", "ta")


def _added(x):
    """A block's output as one tensor: a pair (x, r) (see the module docstring) added up."""
    return x[0] + x[1] if isinstance(x, tuple) else x


@dataclass(frozen=True)
class StreamShape:
    """The model one stream computes: its layers, residual width, FFN (or GAU expansion)
    width, and the parameters a token meets in matrix products (head included)."""

    n_layer: int
    d_model: int
    ffn: int
    matmul_parameters: int


def pick_output(out, output=None):
    """One logits tensor of a model's output: a plain model's `out` itself; of a nested
    model's (Student, TA) pair, `out[output]` (0: the Student, 1: the TA)."""
    if isinstance(out, (tuple, list)):
        if output is None:
            raise TypeError("the model returns several logits; pass output=0 (Student) or output=1 (TA)")
        return out[output]
    return out


def check_stream(stream):
    if stream not in (None, *STREAMS):
        raise ValueError(f"stream must be None (both), 'student' or 'ta', got {stream!r}")


class NestedLM(nn.Module):
    """Base class of NestedGPT2 and NestedGAU (see the module docstring)."""

    architecture = ""  # names the model family in run directories ("gpt2", "gau")
    embedding_parameters: tuple[str, ...] = ()  # left out of non-embedding counts

    # -- what subclasses provide ------------------------------------------------------------

    def embed(self, idx, report=None) -> torch.Tensor:
        """Input vectors of the TA's width (B, T, ta_width), before dropout; ids outside the
        vocabulary are handled by `embed_tokens` (an error, or NaN rows filed in `report`)."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def stream_shape(self, stream: str) -> StreamShape:
        raise NotImplementedError

    def attention_flops_per_token(self, stream: str, seq_len: int) -> float:
        """Training FLOPs per token of the attention score and mixing products (6x forward)."""
        shape = self.stream_shape(stream)
        return 12.0 * shape.n_layer * shape.d_model * seq_len

    # -- widths and depth -------------------------------------------------------------------

    @property
    def student_width(self) -> int:
        return self.config.n_embd

    @property
    def ta_width(self) -> int:
        return self.ta_config.n_embd

    @property
    def depth(self) -> int:
        """Layers in the TA's stack (TA-only layers included)."""
        return len(self.blocks)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied head over the true vocabulary, (vocab_size, ta_width): a view of the
        (padded) token embedding. The Student's head is its first student_width columns."""
        return self.wte.weight[: self.config.vocab_size]

    # -- the streams ------------------------------------------------------------------------

    def hidden_states(self, idx, stream=None, report=None, **block_kwargs):
        """(h_s, h_ta): the final normalised hidden states of the Student and the TA.

        `stream="student"` or `"ta"` computes that stream alone and returns None for the
        other (a run that trains one model pays for one); None computes both, sharing
        every nested layer's op between them. `report` (a `DeferredReport`) receives the
        device-side check of the token ids where that check is deferred (see `embed_tokens`).
        """
        check_stream(stream)
        run_s, run_ta = stream != "ta", stream != "student"
        x = self.embed(idx, report)
        d_s = self.student_width
        x_s = self.drop(x if d_s == self.ta_width else x[..., :d_s]) if run_s else None
        x_ta = self.drop(x) if run_ta else None
        for block in self.blocks:
            if not block.ta_only:
                x_s, x_ta = block(x_s, x_ta, **block_kwargs)
            elif run_ta:
                _, x_ta = block(None, x_ta, **block_kwargs)
        norm = self.final_norm
        # The last add stays apart: the final norm writes fp32 under autocast, where the
        # fused norm serves a narrower residual only when it writes that dtype.
        return (norm.forward_student(_added(x_s)) if run_s else None,
                norm.forward_ta(_added(x_ta)) if run_ta else None)

    def lm_logits(self, h_s, h_ta):
        """Logits over the true vocabulary from `hidden_states` (None stays None)."""
        head = self.lm_head_weight
        return (None if h_s is None else F.linear(h_s, head[:, : h_s.shape[-1]]),
                None if h_ta is None else F.linear(h_ta, head))

    # -- counts -----------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Distinct parameter elements; non_embedding leaves out the embeddings (the tied head)."""
        return count_parameters(self, self.embedding_parameters if non_embedding else ())

    def ta_only_parameters(self) -> list[nn.Parameter]:
        """Parameters only the TA-only layers use: the Student's stream never reaches them."""
        return [p for i in self.ta_only_layers for p in self.blocks[i].parameters()]

    def flops_per_token(self, seq_len: int, streams=STREAMS) -> float:
        """Training FLOPs (forward + backward) per token of the given streams: 6 per matmul
        parameter (head included) plus the attention products (the PaLM / nanoGPT count)."""
        total = 0.0
        for stream in streams:
            total += 6.0 * self.stream_shape(stream).matmul_parameters + self.attention_flops_per_token(stream, seq_len)
        return total

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups: matrices (and embeddings) decay, vectors (biases, norms) do not.
        Frozen parameters (requires_grad False) are left out."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
