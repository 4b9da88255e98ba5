"""One training process of the data-parallel tests (tests/test_distributed.py), launched by ``torchrun``,
``accelerate launch`` or plain ``python`` (one process).

Trains NOLA on the q and v slices of a tiny GPT-2 built from a config with ``transformers.Trainer`` (which wraps the
model in DDP itself when the launcher started several processes), then every rank writes what the test compares:

- ``coefficients_rank{R}.safetensors``: the rank's trainable tensors after training;
- ``rank{R}.json``: a SHA-256 per basis buffer of the rank's ``nola_basis`` store, how many basis buffers existed when
  training started (0 means DDP had nothing to broadcast: each rank generated its basis itself), the logged losses;
- ``adapter/`` (through ``Trainer.save_model``) and ``checkpoint-{steps}/`` (Trainer's own checkpoint).

With ``--fsdp2 root|per_block`` the same training runs in a plain loop on a model sharded by torch's FSDP2
``fully_shard`` (gloo on CPU), and the coefficients are gathered into a full state dict before they are written.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT --per_device_batch 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

# Tiny model, adapter and data, shared with the test so it can rebuild the basis on its own.
# No dropout: its masks come from each process's RNG, so one process and two would train on different noise.
MODEL_CONFIG = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
ADAPTER = dict(r=4, num_basis_A=24, num_basis_B=20, basis_seed=7, nola_alpha=4)
MODEL_SEED = 0
NUM_SEQUENCES = 24
PAD_ID = 0


def training_sequences() -> list[dict]:
    """Deterministic sequences of 6..13 tokens: uneven lengths, so the ranks' batches hold different numbers of label
    tokens and the equivalence with one process depends on Trainer averaging the loss over all ranks' tokens."""
    generator = torch.Generator().manual_seed(3)
    examples = []
    for i in range(NUM_SEQUENCES):
        length = 6 + (i * 5) % 8
        start = int(torch.randint(1, 96, (1,), generator=generator))
        step = 1 + i % 3
        ids = (1 + (start + step * torch.arange(length)) % 95).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return examples


def pad_batch(features: list[dict]) -> dict:
    """Right padding; padded positions are masked from attention and loss."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = [f["input_ids"] + [PAD_ID] * (width - len(f["input_ids"])) for f in features]
    labels = [f["labels"] + [-100] * (width - len(f["labels"])) for f in features]
    attention = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention)}


def build_model(basis_mode: str = "shared"):
    """The tiny GPT-2 (same random weights in every process) with NOLA on the q and v thirds of ``c_attn``."""
    import peft_nola  # noqa: F401  (registers NOLA with peft)
    from peft import get_peft_model
    from peft_nola import GPT2_QV_SLICES, NolaConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(MODEL_SEED)
    base = GPT2LMHeadModel(GPT2Config(**MODEL_CONFIG))
    # transformers 5.23 derives loss_type from the class name, and "GPT2LMHeadModel" matches none, so Trainer counts
    # the label tokens for num_items_in_batch without the causal shift (one token per sequence too many) and the
    # loss comes out scaled by N / (N + batch). Naming the loss makes Trainer count what the loss averages over.
    base.loss_type = "ForCausalLM"
    config = NolaConfig(target_modules=["c_attn"], output_slices=GPT2_QV_SLICES, fan_in_fan_out=True,
                        task_type="CAUSAL_LM", basis_mode=basis_mode, **ADAPTER)
    return get_peft_model(base, config)


def basis_digest(model) -> dict[str, dict]:
    """store key -> SHA-256 of the buffer's bytes, dtype and shape."""
    store = model.base_model.nola_basis
    return {key: {"sha256": hashlib.sha256(buffer.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
                  "dtype": str(buffer.dtype), "shape": list(buffer.shape)} for key, buffer in store.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    # Plain SGD with a large step: unlike Adam's sign-like first steps, the update is proportional to the gradient, so a
    # wrong loss scale across processes (a sum instead of a mean, per-rank token means) would show.
    parser.add_argument("--learning_rate", type=float, default=5.0)
    parser.add_argument("--fsdp2", choices=["root", "per_block"],
                        help="shard with torch FSDP2 (fully_shard) in a plain loop instead of Trainer's DDP: the "
                             "whole model as one unit, or each GPT-2 block as its own unit (the usual auto-wrap)")
    parser.add_argument("--basis_mode", default="shared", choices=["shared", "per_layer", "per_layer_cached"])
    args = parser.parse_args(argv)
    if args.fsdp2:
        return train_fsdp2(args)

    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(args.basis_mode)
    store = model.base_model.nola_basis
    seen_at_start: list[int] = []

    class RecordStoreAtStart(TrainerCallback):
        # on_train_begin runs after Trainer wrapped the model in DDP: an empty store here means DDP's buffer
        # broadcast (at wrap time and before each forward) cannot have touched the basis.
        def on_train_begin(self, *_, **__):
            seen_at_start.append(len(store))

    training_args = TrainingArguments(
        output_dir=str(args.out),
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        # Same order in one process and in several: global batch t is examples [t*B, (t+1)*B) either way.
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.steps,
        seed=11,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=training_sequences(), data_collator=pad_batch,
                      callbacks=[RecordStoreAtStart()])
    trainer.train()
    trainer.save_model(str(args.out / "adapter"))

    rank = training_args.process_index
    coefficients = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(coefficients, str(args.out / f"coefficients_rank{rank}.safetensors"))
    report = {
        "rank": rank,
        "world_size": training_args.world_size,
        "basis_buffers_at_train_begin": seen_at_start,
        "basis": basis_digest(model),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "global_step": trainer.state.global_step,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def train_fsdp2(args) -> None:
    """The same training as the Trainer path (SGD, constant lr, sequential global batches, loss averaged over all
    label tokens of the global batch) with the model sharded by ``fully_shard`` on a CPU/gloo mesh; then the
    coefficients are gathered into a full state dict, which every rank dumps and rank 0 saves as the adapter."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.basis_mode)
    mesh = init_device_mesh("cpu", (world,))
    if args.fsdp2 == "per_block":
        for block in model.base_model.model.transformer.h:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    basis_at_start = [len(model.base_model.nola_basis)]
    args.out.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=args.learning_rate)
    examples = training_sequences()
    global_batch = args.per_device_batch * world
    losses = []
    for step in range(args.steps):
        start = step * global_batch + rank * args.per_device_batch
        batch = pad_batch(examples[start : start + args.per_device_batch])
        # Token-mean over the global batch: each rank divides its token sum by the global count; FSDP's gradient
        # reduce-scatter averages over ranks, hence the factor world.
        tokens = batch["labels"][:, 1:].ne(-100).sum()
        dist.all_reduce(tokens)
        loss = model(**batch, num_items_in_batch=tokens).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach() / world
        dist.all_reduce(logged)
        losses.append(logged.item())

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    coefficients = {name: full[name].detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(coefficients, str(args.out / f"coefficients_rank{rank}.safetensors"))
    report = {
        "rank": rank,
        "world_size": world,
        "basis_buffers_at_train_begin": basis_at_start,
        "basis": basis_digest(model),
        "basis_buffer_types": sorted({type(b).__name__ for b in model.base_model.nola_basis.values()}),
        "coefficient_shards": {name: [list(p.shape), list(p.to_local().shape)] for name, p in
                               model.named_parameters() if p.requires_grad and isinstance(p, DTensor)},
        "losses": losses,
        "global_step": args.steps,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    if rank == 0:
        # save_pretrained on the sharded model would see DTensor shards: hand it the gathered state dict.
        model.save_pretrained(str(args.out / "adapter"), state_dict=full)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make peft_nola importable
    main()
