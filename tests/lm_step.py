"""Shared by tests/test_lm_runtime.py and its gloo processes: a tiny random Llama pair (1 layer each, vocabulary 64)
under token_ce + token_kl, 8 token sequences of different lengths (padding labelled -100), and one optimizer step
of kdgraph's own step loop (SGD, lr 1, no momentum: the step changes each parameter by minus its gradient).

Run as a torchrun worker: ``python -m torch.distributed.run --nproc_per_node=2 tests/lm_step.py OUT BATCH ACCUM``
writes rank 0's student state after one step to OUT.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdgraph  # noqa: E402
from kdgraph.train.distributed import DistEnv, setup, teardown  # noqa: E402
from kdgraph.train.monitor import Monitor  # noqa: E402
from kdgraph.train.steps import LoopSettings, RunProgress, SkipCounter, StepLoop, make_stage_run  # noqa: E402
from kdgraph.train.token_count import data_batch_inputs  # noqa: E402

VOCAB, SEQ = 64, 12
LENGTHS = [12, 3, 7, 12, 5, 9, 2, 11]  # real tokens of each sequence; the rest is padding (-100)


def _llama(hidden: int) -> dict:
    return {"model": "hf:AutoModelForCausalLM",
            "kwargs": {"config": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 2 * hidden,
                                  "max_position_embeddings": 32}}}


def spec_dict(losses=None) -> dict:
    return {"name": "lm_step",
            "input": {"named": {"input_ids": {"shape": [SEQ], "dtype": "int64", "high": VOCAB},
                                "attention_mask": {"shape": [SEQ], "dtype": "int64"}}},
            "teacher": _llama(32), "student": _llama(16),
            "stages": [{"name": "main", "epochs": 1, "batch_size": 8, "train": ["student"],
                        "optimizer": {"type": "sgd", "lr": 1.0, "momentum": 0.0},
                        "losses": losses or [
                            {"name": "ce", "type": "token_ce", "weight": 0.5},
                            {"name": "kd", "type": "token_kl", "weight": 0.5,
                             "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "data": {"dataset": "synthetic"}}


class Sequences(Dataset):
    """8 sequences of LENGTHS real tokens, right-padded to SEQ (attention 0, label -100)."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ), generator=g)
        self.mask = (torch.arange(SEQ)[None] < torch.tensor(LENGTHS)[:, None]).long()
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    def batch(self) -> dict:
        return {"input_ids": self.ids, "attention_mask": self.mask, "labels": self.labels}


def one_step(d, batch_size: int, accumulate: int, env: DistEnv = DistEnv()) -> dict[str, torch.Tensor]:
    """The student's state after one optimizer step of kdgraph's step loop over the 8 sequences, in
    ``accumulate`` micro-batches of ``batch_size`` per rank (the student is restored first by the caller)."""
    stage = d.spec.stages[0].model_copy(update={"batch_size": batch_size, "accumulate": accumulate,
                                                "reference_world_size": env.world_size})
    run = make_stage_run("main", 0, stage, d, d.student, Sequences(), env=env, workers=0, seed=0, amp="off",
                         save=False, evaluate="never", batch_inputs=data_batch_inputs(d))
    loop = StepLoop(env, Monitor(None, enabled=False, progress=False, tensorboard=False),
                    LoopSettings(plot=False), RunProgress(started=0.0), SkipCounter())
    steps = run.loader.sampler.per_rank // batch_size
    assert steps == accumulate, (steps, accumulate)  # one optimizer step
    run.loader.sampler.set_epoch(0)
    d.train()
    loop._steps(run, 0, 0, steps, None)
    return {k: v.detach().clone() for k, v in d.student.state_dict().items()}


if __name__ == "__main__":
    out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    env = setup("cpu")
    torch.manual_seed(0)
    d = kdgraph.compile(kdgraph.load_spec(spec_dict()))
    d.student.load_state_dict(torch.load(out + ".init.pt"))
    d.teacher.load_state_dict(torch.load(out + ".teacher.pt"))
    state = one_step(d, batch, accum, env)
    if env.rank == 0:
        torch.save(state, out)
    teardown(env)
