"""A stage's ``on_policy:`` setting: GKD's on-policy distillation (a share of batches completed by the student).

    stages:
      - name: main
        on_policy: {fraction: 0.5, max_new_tokens: 32, temperature: 1.0, token_budget: 200000}

R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD,
ICLR 2024): with probability ``fraction`` (their lambda) a batch's completions are sampled from the student and the
teacher scores them through the stage's token losses; the other batches are the data's own. ``generator: teacher``
makes the teacher write them instead (sequence-level KD, Kim & Rush 2016). How the trainer does it:
:mod:`kdgraph.train.on_policy`.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import Float, Int, _Strict

__all__ = ["OnPolicySpec"]


class OnPolicySpec(_Strict):
    """Which batches get generated completions, and how they are generated."""

    fraction: Float = Field(0.5, ge=0, le=1, description="share of the stage's batches whose completions are "
                                                         "generated (GKD's lambda), chosen by a seeded draw per step")
    max_new_tokens: Int = Field(32, ge=1, le=65536, description="tokens generated per sequence at most (also capped "
                                                                "so a sequence keeps the batch's length)")
    temperature: Float = Field(1.0, ge=0, description="sampling temperature of the generation; 0: greedy")
    top_k: Optional[Int] = Field(None, ge=1, description="sample from the top_k most likely tokens only; unset: "
                                                         "from the whole vocabulary (as TRL's GKD)")
    prompt_tokens: Optional[Int] = Field(None, ge=1, description="the prompt is each sequence's first prompt_tokens "
                                         "tokens; unset: the tokens before its first scored label (labels -100 "
                                         "on a prompt/completion pair's prompt)")
    token_budget: Optional[Int] = Field(None, ge=1, description="generated tokens per process for the stage at "
                                        "most; once spent, batches stay as the data gives them. Unset: no limit")
    generator: Literal["student", "teacher"] = Field(
        "student", description="who writes the completions: the student (on-policy, GKD) or the teacher "
                               "(sequence-level KD)")
